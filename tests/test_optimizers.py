"""`DPOModule.configure_optimizers` and `lr_factor`: what the optimizer does to the weights at a step.

Every expected value is worked out from the optimizer's published update rule, in the test: warm-up
then constant, linear or cosine factors; one AdamW, RMSprop or SGD step from a fresh state, with the
weight decay applied to matrices only; an optimizer given in YAML (`class_path` + `init_args`) through
the CLI, with `learning_rate` and `weight_decay` still applying; bitsandbytes' 8-bit AdamW where it
runs (it does on this CPU). Tiny models from conftest.py; no network.
"""

import functools
import math

import lightning as L
import pytest
import torch
import yaml
from conftest import ascii_tokenizer, rows
from datasets import Dataset

from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.cli.main import cli_main
from dpo_lightning.tools.migrate import from_trl
from dpo_lightning.training.optim import lr_factor


@pytest.mark.parametrize("kind, expected", [
    # warmup 4: (s + 1) / 5 for s < 4; then 10 steps to total 14: progress p = (s - 4) / 10.
    ("constant", [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.2, 0.4, 0.6, 0.8, 1.0, 0.9, 0.5, 0.0]),  # 1 - p at s = 4, 5, 9, 14
    ("cosine", [0.2, 0.4, 0.6, 0.8, 1.0, 0.5 * (1 + math.cos(math.pi * 0.1)), 0.5, 0.0]),  # (1 + cos(pi p)) / 2
])
def test_lr_factor_warms_up_then_follows_its_schedule(kind, expected):
    steps = [0, 1, 2, 3, 4, 5, 9, 14]
    got = [lr_factor(s, warmup_steps=4, total_steps=14, kind=kind) for s in steps]
    assert got == pytest.approx(expected, abs=1e-12)
    assert lr_factor(20, warmup_steps=4, total_steps=14, kind=kind) == pytest.approx(expected[-1])  # past the end


class RecordStep(L.Callback):
    """The weights and gradients just before each optimizer step, and the learning rate it used."""

    seen: list[dict] = []  # class-level: the CLI builds its own instance from the config

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        RecordStep.seen.append({"lr": [g["lr"] for g in optimizer.param_groups],
                                "weights": {n: p.detach().clone() for n, p in pl_module.policy.named_parameters()},
                                "grads": {n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters()
                                          if p.grad is not None}})


def data() -> PreferenceDataModule:
    return PreferenceDataModule(dataset=rows(8), tokenizer=ascii_tokenizer(add_bos=True), max_length=48,
                                max_prompt_length=24, batch_size=4)


def one_step(model: DPOModule, steps: int = 1) -> DPOModule:
    RecordStep.seen = []
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=[RecordStep()]).fit(model, data())
    return model


def test_adamw_first_step_decays_matrices_only(tiny_llama):
    # Step 1 of AdamW from zero moments: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps),
    # after the decoupled decay p <- p (1 - lr * wd). Matrices decay, norm weights (1-D) do not.
    lr, wd = 1e-3, 0.5
    model = one_step(DPOModule(tiny_llama, learning_rate=lr, weight_decay=wd))
    before, grads = RecordStep.seen[0]["weights"], RecordStep.seen[0]["grads"]
    decayed = 0
    for name, after in model.policy.named_parameters():
        p, g = before[name], grads[name]
        decay = wd if p.dim() >= 2 else 0.0
        decayed += p.dim() >= 2
        expected = p * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after.detach(), expected, rtol=1e-5, atol=1e-6)
    assert decayed and decayed < len(before)  # both groups were exercised


def test_rmsprop_first_step_is_ten_learning_rates_against_the_gradient(tiny_llama):
    # The seed recipe's optimizer. v = (1 - alpha) g^2 = 0.01 g^2 from v = 0, so the update is
    # lr * g / (0.1 |g| + eps): 10 lr in the direction of -g wherever |g| >> eps.
    lr = 1e-4
    model = one_step(DPOModule(tiny_llama, optimizer="rmsprop", learning_rate=lr, warmup_steps=0))
    assert isinstance(model.trainer.optimizers[0], torch.optim.RMSprop)
    before, grads = RecordStep.seen[0]["weights"], RecordStep.seen[0]["grads"]
    for name, after in model.policy.named_parameters():
        g = grads[name]
        torch.testing.assert_close(after.detach(), before[name] - lr * g / (0.1 * g.abs() + 1e-8), rtol=1e-5, atol=1e-7)


def test_warm_up_sets_the_rate_each_step_uses(tiny_llama):
    one_step(DPOModule(tiny_llama, learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear"), steps=4)
    # (s + 1) / 3 during warm-up, then linear decay over the remaining 4 - 2 = 2 steps: 1 - (s - 2) / 2.
    assert [step["lr"][0] for step in RecordStep.seen] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.5e-3])
    assert all(step["lr"][0] == step["lr"][1] for step in RecordStep.seen)  # both groups


def test_lora_trains_only_the_adapter(tiny_llama):
    model = one_step(DPOModule(tiny_llama, lora_r=4, lora_target_modules=["q_proj"], learning_rate=1e-3))
    optimized = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    trainable = {id(p) for p in model.policy.parameters() if p.requires_grad}
    assert optimized == trainable and len(trainable) == 2 * 2  # lora_A and lora_B of q_proj in 2 layers


def fit_with_optimizer(tiny_llama, tmp_path, optimizer: dict, **model_args) -> DPOModule:
    """One step through the CLI with `model.optimizer` given in a YAML config, as a LightningCLI user writes it."""
    train = tmp_path / "train.jsonl"
    Dataset.from_dict(rows(8)).to_json(train)
    config = {"model": {"model_name_or_path": tiny_llama, "optimizer": optimizer, **model_args},
              "data": {"dataset": str(train), "max_length": 48, "max_prompt_length": 24, "batch_size": 4},
              "trainer": {"max_steps": 1, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
                          "default_root_dir": str(tmp_path),  # where LightningCLI writes its config.yaml
                          "enable_progress_bar": False, "enable_model_summary": False,
                          "callbacks": [{"class_path": "test_optimizers.RecordStep"}]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    RecordStep.seen = []
    return cli_main(["fit", "--config", str(tmp_path / "config.yaml")]).model


def test_a_torch_optimizer_from_yaml_keeps_learning_rate_and_weight_decay(tiny_llama, tmp_path):
    # SGD with momentum, step 1: buffer = g + wd * p (coupled decay, matrices only), p <- p - lr * buffer.
    # init_args' lr 5.0 loses to --model.learning_rate, as the docstring says.
    lr, wd = 1e-2, 0.25
    model = fit_with_optimizer(tiny_llama, tmp_path, {"class_path": "torch.optim.SGD",
                                                      "init_args": {"momentum": 0.9, "lr": 5.0}},
                               learning_rate=lr, weight_decay=wd)
    optimizer = model.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    before, grads = RecordStep.seen[0]["weights"], RecordStep.seen[0]["grads"]
    for name, after in model.policy.named_parameters():
        p = before[name]
        expected = p - lr * (grads[name] + (wd if p.dim() >= 2 else 0.0) * p)
        torch.testing.assert_close(after.detach(), expected, rtol=1e-6, atol=1e-7)
    assert model.hparams.optimizer["class_path"] == "torch.optim.SGD"  # saved as plain data, not a pickle


def test_bitsandbytes_8bit_adamw_from_yaml(tiny_llama, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    lr = 1e-3
    model = fit_with_optimizer(tiny_llama, tmp_path, {"class_path": "bitsandbytes.optim.AdamW8bit"}, learning_rate=lr)
    optimizer = model.trainer.optimizers[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    embedding = model.policy.get_input_embeddings().weight  # 128 x 64 = 8192 >= bnb's 4096 for 8-bit state
    assert optimizer.state[embedding]["state1"].dtype == torch.uint8  # the moments are 8-bit
    # Step 1 moves each weight by about lr in the direction of -g (Adam's first step), within 8-bit rounding.
    before, grads = RecordStep.seen[0]["weights"], RecordStep.seen[0]["grads"]
    name = next(n for n, p in model.policy.named_parameters() if p is embedding)
    moved, g = embedding.detach() - before[name], grads[name]
    big = g.abs() > 1e-6
    torch.testing.assert_close(moved[big], -lr * g[big].sign(), rtol=0.1, atol=1e-4)


@pytest.mark.parametrize("optim, class_path", [("adamw_8bit", "bitsandbytes.optim.AdamW8bit"),
                                                ("paged_adamw_8bit", "bitsandbytes.optim.PagedAdamW8bit")])
def test_from_trl_maps_8bit_adamw_to_bitsandbytes(optim, class_path):
    assert from_trl({"optim": optim}).config["model"]["optimizer"] == {"class_path": class_path}


def test_from_python_a_callable_or_its_dict_builds_the_same_optimizer(tiny_llama):
    for spec in (functools.partial(torch.optim.SGD, momentum=0.5),
                 {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.5}}):
        optimizer = one_step(DPOModule(tiny_llama, optimizer=spec, learning_rate=1e-3)).trainer.optimizers[0]
        assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.5
        assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3]
