"""`DPOModule` with tiny models saved to temp folders: the step-0 identity, the frozen reference,
checkpoints without the reference that resume to the same weights, the Hugging Face export, and bf16.

Models are 2-layer Llama / GPT-2 built from configs (conftest.py); no network.
"""

import math

import lightning as L
import pytest
import torch
from conftest import ascii_tokenizer, rows
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning import DPOModule, ExportPretrained, PreferenceDataModule
from dpo_lightning.losses import ipo_loss, sequence_logps


def data_module(n: int = 16, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(dataset=rows(n), eval_dataset=rows(4), tokenizer=ascii_tokenizer(), max_length=48,
                                max_prompt_length=24, batch_size=4, **kwargs)


def trainer(tmp_path, max_steps: int = 4, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def first_batch(dm: PreferenceDataModule) -> dict[str, torch.Tensor]:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_step_zero_loss_is_ln2_rewards_zero_accuracy_half(fixture, request):
    # GPT-2 has dropout 0.1 and the module is in train mode: equal only because dropout is disabled.
    model = DPOModule(request.getfixturevalue(fixture), beta=0.1)
    loss = model._shared_step(first_batch(data_module()), "train")
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    metrics = {name: m.compute() for name, m in model.train_metrics.items()}
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/rejected"] == 0 and metrics["rewards/margins"] == 0
    assert metrics["rewards/accuracies"] == 0.5  # ties count half, see DPOModule._log_metrics


def test_ipo_uses_per_token_mean_log_probs(tiny_llama):
    model = DPOModule(tiny_llama, loss_type="ipo", beta=0.1)
    batch = first_batch(data_module())
    with torch.no_grad():
        model.policy.lm_head.weight.mul_(1.5)  # make the policy differ from the reference
        loss = model._shared_step(batch, "val")
        logps, n = [], None
        for m in (model.policy, model.reference):
            s, n = sequence_logps(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"])
            logps.append(s / n)
    expected, _, _ = ipo_loss(*logps[0].chunk(2), *logps[1].chunk(2), beta=0.1)
    torch.testing.assert_close(loss, expected.mean())


def test_training_moves_the_policy_and_never_the_reference(tiny_llama, tmp_path):
    model = DPOModule(tiny_llama, learning_rate=1e-2)
    before_policy = {k: v.clone() for k, v in model.policy.state_dict().items()}
    before_ref = {k: v.clone() for k, v in model.reference.state_dict().items()}
    t = trainer(tmp_path)
    t.fit(model, data_module())
    assert all(torch.equal(before_ref[k], v) for k, v in model.reference.state_dict().items())
    assert not all(torch.equal(before_policy[k], v) for k, v in model.policy.state_dict().items())
    assert not model.reference.training and not any(p.requires_grad for p in model.reference.parameters())
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.policy.parameters()}


def test_checkpoint_holds_only_the_policy_and_reloads_to_the_same_weights(tiny_llama, tmp_path):
    model = DPOModule(tiny_llama, learning_rate=1e-2)
    t = trainer(tmp_path)
    t.fit(model, data_module())
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert saved and all(k.startswith("policy.") for k in saved)
    reloaded = DPOModule.load_from_checkpoint(path, weights_only=True)
    for k, v in model.policy.state_dict().items():
        torch.testing.assert_close(reloaded.policy.state_dict()[k], v, rtol=0, atol=0)
    # The reference is rebuilt from its source: the starting weights, not the trained ones.
    start = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for k, v in start.state_dict().items():
        torch.testing.assert_close(reloaded.reference.state_dict()[k], v, rtol=0, atol=0)


def test_export_loads_with_from_pretrained(tiny_gpt2, tmp_path):
    model = DPOModule(tiny_gpt2, learning_rate=1e-2)
    dm = data_module()
    trainer(tmp_path, callbacks=[ExportPretrained(str(tmp_path / "hf"))]).fit(model, dm)
    assert (tmp_path / "hf" / "model.safetensors").exists() and not list((tmp_path / "hf").glob("*.bin"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for k, v in load_file(tmp_path / "hf" / "model.safetensors").items():
        torch.testing.assert_close(v, model.policy.state_dict()[k])
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in model.policy.parameters())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [97, 98]
    assert tokenizer.pad_token == tokenizer.eos_token  # pad = eos was set for training and saved


def test_tokenizer_defaults_to_the_models(tiny_llama, tmp_path):
    dm = PreferenceDataModule(dataset=rows(8), max_length=48, max_prompt_length=24, batch_size=4)
    trainer(tmp_path, max_steps=1).fit(DPOModule(tiny_llama), dm)
    assert dm.tokenizer.name_or_path == tiny_llama
    assert dm.train_data[0]["prompt_input_ids"][0] == dm.tokenizer.bos_token_id  # the Llama stand-in adds BOS


def test_bf16_mixed_runs_on_cpu_with_float32_log_probs(tiny_llama, tmp_path):
    model = DPOModule(tiny_llama, learning_rate=1e-3)
    seen = []
    original = model._sequence_logps

    def spy(m, batch):
        out = original(m, batch)
        seen.append(out[0].dtype)
        return out

    model._sequence_logps = spy
    trainer(tmp_path, max_steps=2, precision="bf16-mixed").fit(model, data_module())
    assert seen and set(seen) == {torch.float32}
    assert torch.isfinite(torch.stack([p.detach().float().sum() for p in model.policy.parameters()])).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "--model.beta must be > 0"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing only applies to loss_type 'sigmoid'"),
    ({"loss_type": "kto"}, r"--model.loss_type must be one of \['hinge', 'ipo', 'sigmoid'\]"),
])
def test_bad_arguments_fail_at_construction_naming_the_flag(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPOModule(tiny_llama, **kwargs)
