"""The MoE router's load-balancing loss (`router_aux_loss_coef`, logged as `aux_loss`), against the model's own.

The oracle is a plain forward of the model with `output_router_logits=True` on the padded batch of the same pairs
(chosen rows, then rejected rows, right-padded), its `aux_loss`; the DPO part is each sequence's own forward
(test_architectures.py). On tiny Mixtral, Qwen2-MoE and OLMoE (plus Qwen3-Next under the `architectures` marker):
- the module's batch value equals the oracle on padded, prefix-shared and packed batches of the same pairs (in bf16,
  weights or autocast, to its rounding);
- TRL's semantics: None takes the config's coefficient, 0 turns it off, a coefficient on a dense model or on
  Llama-4 (whose forward computes no aux_loss) is refused by name, and Llama-4's unset one trains without it;
- gradient checkpointing keeps its gradients; the CLI trains with it and logs `aux_loss`; a checkpoint reloads it;
- two optimizer steps of two accumulated micro-batches each (SGD) equal the oracle's steps, with each
  micro-batch's loss + coef x aux, and the logged `aux_loss`, `loss` and `val/aux_loss` are the batch means;
- under DDP (3 gloo ranks, 8 pairs: micro-batches of 2 and 1 pairs, accumulated), the step equals the oracle's
  mean over ranks and `aux_loss` the mean over every rank's micro-batches: not multiplied by the world size.
DDP runs as a subprocess executing this file, as tests/test_ddp.py does. No network.
"""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_lightning import DPOModule
from dpo_lightning.cli.main import cli_main
from dpo_lightning.data.batches import collate_pairs
from dpo_lightning.data.packing import collate_shared

from conftest import BF16_RTOL, ascii_tokenizer, data_module, quiet_trainer
from conftest import rows as text_rows
from test_architectures import ARCHITECTURES, BETA, LR, dpo_loss, oracle_logps, plain_aux_loss, tiny_model

MOE = ["mixtral", "qwen2_moe", "olmoe", pytest.param("qwen3_next", marks=pytest.mark.architectures)]
COEF = 0.5  # large enough that the router term moves the weights well past the comparison's tolerance


def pairs(n: int) -> list[dict]:
    generator = torch.Generator().manual_seed(5)

    def tokens(length: int) -> list[int]:
        return torch.randint(3, 128, (length,), generator=generator).tolist()

    return [{"prompt_input_ids": tokens(5 + 3 * i), "chosen_input_ids": tokens(2 + i), "rejected_input_ids": tokens(6 - i)}
            for i in range(n)]


@pytest.mark.parametrize("name", MOE)
def test_the_batch_router_loss_is_the_models_own_in_every_layout(name):
    module = DPOModule(tiny_model(name), router_aux_loss_coef=COEF, learning_rate=1e-3)
    rows = pairs(3)
    with torch.no_grad():
        expected = plain_aux_loss(module.policy.eval(), rows)
        for batch in (collate_pairs(rows, 0), collate_shared(rows, 0),
                      collate_shared(rows, 0, packing=True, max_tokens_per_row=100)):
            aux = module.scorer(module.policy, batch, module.objective.router).aux_loss
            torch.testing.assert_close(aux, expected, rtol=1e-5, atol=1e-6)
            # At step 0 the policy is its reference: every reward 0, the DPO loss log 2, plus coef x aux.
            loss = module._shared_step(batch, "val")
            torch.testing.assert_close(loss, torch.log(torch.tensor(2.0)) + COEF * expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bf16", ["weights", "autocast"])
def test_bf16_router_loss_is_the_models_own_to_bf16_rounding(bf16):
    model = tiny_model("olmoe").to(torch.bfloat16 if bf16 == "weights" else torch.float32)
    module = DPOModule(model, router_aux_loss_coef=COEF)  # its check against the model's own loss passes in bf16
    rows = pairs(3)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16 == "autocast"):
        expected = plain_aux_loss(module.policy.eval(), rows).float()
        aux = module.scorer(module.policy, collate_shared(rows, 0, packing=True, max_tokens_per_row=100),
                            module.objective.router).aux_loss
    assert aux.dtype == torch.float32
    torch.testing.assert_close(aux, expected, rtol=BF16_RTOL, atol=0)


def test_gradient_checkpointing_keeps_the_router_loss_gradients():
    # The router logits are read inside checkpointed layers, whose activations backward recomputes.
    grads = []
    for checkpointing in (False, True):
        module = DPOModule(tiny_model("olmoe"), router_aux_loss_coef=COEF, gradient_checkpointing=checkpointing)
        with torch.no_grad():
            module.policy.lm_head.weight.mul_(1.5)  # the policy differs from its reference
        module._shared_step(collate_shared(pairs(3), 0, packing=True, max_tokens_per_row=100), "train").backward()
        grads.append({n: p.grad for n, p in module.policy.named_parameters()})
    assert grads[0]["model.layers.0.mlp.gate.weight"].abs().sum() > 0  # the router trains
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_coefficient_follows_trl(tiny_llama):
    config_coef = tiny_model("olmoe").config.router_aux_loss_coef
    assert config_coef > 0
    assert DPOModule(tiny_model("olmoe")).objective.router_aux_loss_coef == config_coef  # None: the config's
    assert DPOModule(tiny_model("olmoe"), router_aux_loss_coef=COEF).objective.router_aux_loss_coef == COEF
    off = DPOModule(tiny_model("olmoe"), router_aux_loss_coef=0.0)
    assert off.objective.router is None and "aux_loss" not in off.train_metrics
    assert DPOModule(tiny_llama).objective.router is None  # dense: nothing to add
    with pytest.raises(ValueError, match=r"--model.router_aux_loss_coef 0.1: LlamaForCausalLM is not a mixture-of-"
                                         r"experts model that returns its router logits .* remove the setting"):
        DPOModule(tiny_llama, router_aux_loss_coef=0.1)


def test_a_coefficient_that_is_not_a_finite_number_is_refused_by_name():
    # NaN passed the check (NaN < 0 is False), then every batch's loss was NaN and the run blamed the data's rows;
    # the text "0.01" from a notebook failed inside the check with a bare TypeError. numpy's floats are numbers.
    moe = tiny_model("olmoe")
    for bad in (float("nan"), float("inf"), -1.0, "0.01", True):
        with pytest.raises(ValueError, match=re.escape(f"--model.router_aux_loss_coef {bad!r}: must be a finite "
                                                       "number >= 0")):
            DPOModule(moe, router_aux_loss_coef=bad)
    assert DPOModule(moe, router_aux_loss_coef=np.float32(0.25)).objective.router_aux_loss_coef == 0.25


def test_a_moe_whose_config_returns_no_router_logits_is_named_so():
    # Gemma 4's MoE block routes inside its layers and returns no router logits (no output_router_logits in its
    # config): it is a mixture of experts, so "is no mixture-of-experts model" named the wrong reason.
    settings = copy.deepcopy(ARCHITECTURES["gemma4"])
    settings["text_config"].update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    with pytest.raises(ValueError, match=r"--model.router_aux_loss_coef 0.01: Gemma4ForConditionalGeneration is not "
                                         r"a mixture-of-experts model that returns its router logits \(its config "
                                         r"has no output_router_logits\)"):
        DPOModule(AutoModelForCausalLM.from_config(config), router_aux_loss_coef=0.01)


def test_llama4_whose_forward_computes_no_router_loss(tmp_path):
    # Llama-4's config declares router_aux_loss_coef 0.001, but its causal LM returns aux_loss None (TRL then
    # crashes adding None): unset, training goes on without it; set, it is refused by name.
    with pytest.warns(UserWarning, match=r"router_aux_loss_coef \(unset: the config's 0.001\): Llama4ForCausalLM's "
                                         r"forward computes no load-balancing loss .* training without it"):
        module = DPOModule(tiny_model("llama4_text"))
    assert module.objective.router is None
    with pytest.raises(ValueError, match=r"--model.router_aux_loss_coef 0.01: Llama4ForCausalLM's forward computes "
                                         r"no load-balancing loss .* Set it to 0"):
        DPOModule(tiny_model("llama4_text"), router_aux_loss_coef=0.01)


def test_the_cli_trains_with_it_and_a_checkpoint_reloads_it(tmp_path):
    folder = tmp_path / "olmoe"
    tiny_model("olmoe").save_pretrained(folder)
    ascii_tokenizer().save_pretrained(folder)
    train = tmp_path / "train.jsonl"
    Dataset.from_dict(text_rows(8)).to_json(train)
    cli = cli_main(["fit", f"--model.model_name_or_path={folder}", f"--model.router_aux_loss_coef={COEF}",
                    f"--data.dataset={train}", f"--data.eval_dataset={train}", "--data.max_length=48",
                    "--data.max_prompt_length=24", "--data.batch_size=4", "--trainer.max_steps=2",
                    "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path}",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    header = (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/aux_loss", "val/aux_loss"} <= set(header)
    reloaded = DPOModule.load_from_checkpoint(next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt")))
    assert reloaded.objective.router_aux_loss_coef == COEF
    rows = pairs(2)
    with torch.no_grad():
        aux = reloaded.scorer(reloaded.policy, collate_pairs(rows, 0), reloaded.objective.router).aux_loss
        torch.testing.assert_close(aux, plain_aux_loss(reloaded.policy.eval(), rows), rtol=1e-5, atol=1e-6)


class Steps(L.Callback):
    """Each micro-batch's rows and each optimizer step's logged metrics; validation batches' rows."""

    def __init__(self):
        self.rows, self.val_rows, self.logged = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.rows.append(batch["row_ids"].tolist())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val_rows.append(batch["row_ids"].tolist())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx % 2 == 1:  # the end of an optimizer step of 2 micro-batches
            self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def oracle_step(policy: torch.nn.Module, reference: torch.nn.Module, optimizer: torch.optim.Optimizer,
                micro_batches: list[list[list[dict]]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One SGD step whose gradient is the mean over ranks (outer list) of the sum over each rank's micro-batches of
    the gradient of (DPO loss + COEF x aux) / micro-batches, as DDP and accumulation make it. Returns each
    micro-batch's aux loss and pair losses."""
    optimizer.zero_grad()
    auxes, pair_losses = [], []
    for rank in micro_batches:
        for rows in rank:
            with torch.no_grad():
                reference_logps = oracle_logps(reference, rows)
            policy_logps = oracle_logps(policy, rows)
            (pc, pr), (rc, rr) = policy_logps.chunk(2), reference_logps.chunk(2)
            losses = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr)))
            aux = plain_aux_loss(policy, rows)
            ((dpo_loss(policy_logps, reference_logps) + COEF * aux) / len(rank) / len(micro_batches)).backward()
            auxes.append(aux.detach())
            pair_losses.append(losses.detach())
    optimizer.step()
    return auxes, pair_losses


def test_accumulated_steps_add_each_micro_batchs_router_loss(tmp_path):
    module = DPOModule(tiny_model("olmoe"), beta=BETA, learning_rate=LR, optimizer=torch.optim.SGD,
                       router_aux_loss_coef=COEF)
    start = copy.deepcopy(module.policy)
    data = data_module(8, eval_n=4, batch_size=2, eval_batch_size=2)  # `auto`: packed prefix sharing
    steps = Steps()
    validated = quiet_trainer(tmp_path, callbacks=[steps]).validate(module, data, verbose=False)[0]
    trainer = quiet_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[steps], limit_val_batches=0,
                            enable_checkpointing=False)
    trainer.fit(module, data)
    assert data.layout.name == "shared"

    policy, reference = copy.deepcopy(start).eval(), copy.deepcopy(start).eval()
    val_by_id = {row["row_id"]: row for row in data.val_data}
    with torch.no_grad():
        val_aux = [plain_aux_loss(policy, [val_by_id[i] for i in ids]) for ids in steps.val_rows]
    torch.testing.assert_close(validated["val/aux_loss"], torch.stack(val_aux).mean().item(), rtol=1e-5, atol=1e-7)
    by_id = {row["row_id"]: row for row in data.train_data}
    optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    for step, logged in enumerate(steps.logged):
        micro = [[by_id[i] for i in ids] for ids in steps.rows[2 * step : 2 * step + 2]]
        auxes, pair_losses = oracle_step(policy, reference, optimizer, [micro])
        aux = torch.stack(auxes).mean().item()
        assert logged["train/aux_loss"] == pytest.approx(aux, rel=1e-5)
        assert logged["train/loss"] == pytest.approx(torch.cat(pair_losses).mean().item() + COEF * aux, rel=1e-5)
    for (name, trained), expected in zip(module.policy.named_parameters(), policy.parameters()):
        step = expected.detach() - dict(start.named_parameters())[name]
        torch.testing.assert_close(trained.detach() - dict(start.named_parameters())[name], step, rtol=1e-3,
                                   atol=1e-3 * step.abs().max().item() + 1e-7, msg=name)


def test_ddp_ranks_average_their_router_losses_without_world_size_scaling(tmp_path):
    out = tmp_path / "ddp.json"
    subprocess.run([sys.executable, __file__, str(out)], check=True, timeout=900, cwd=tmp_path)
    result = json.loads(out.read_text())
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(3)]
    trained = torch.load(out.with_suffix(".pt"), weights_only=True)
    start = tiny_model("olmoe")  # the runs' starting weights: the same seed
    data = data_module(8, eval_n=5, batch_size=2, eval_batch_size=2, prefix_sharing=False)
    data.setup("fit")
    by_id = {row["row_id"]: row for row in (*data.train_data, *data.val_data)}
    assert [len(ids) for rank in ranks for ids in rank["train"]] == [2, 1] * 3  # 9 slots for 8 pairs: uneven

    policy, reference = copy.deepcopy(start).eval(), copy.deepcopy(start).eval()
    with torch.no_grad():
        val_aux = [plain_aux_loss(policy, [by_id[i] for i in ids]) for rank in ranks for ids in rank["val"]]
    assert result["val/aux_loss"] == pytest.approx(torch.stack(val_aux).mean().item(), rel=1e-5)
    optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    auxes, _ = oracle_step(policy, reference, optimizer, [[[by_id[i] for i in ids] for ids in rank["train"]]
                                                          for rank in ranks])
    assert result["train/aux_loss"] == pytest.approx(torch.stack(auxes).mean().item(), rel=1e-5)
    for (name, before), expected in zip(start.named_parameters(), policy.parameters()):
        step = expected.detach() - before.detach()
        torch.testing.assert_close(trained[name] - before.detach(), step, rtol=1e-3,
                                   atol=1e-3 * step.abs().max().item() + 1e-7, msg=name)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    out = Path(sys.argv[1])
    module = DPOModule(tiny_model("olmoe"), beta=BETA, learning_rate=LR, optimizer=torch.optim.SGD,
                       router_aux_loss_coef=COEF)
    steps = Steps()
    options = {"accelerator": "cpu", "devices": 3, "strategy": "ddp", "logger": False, "enable_progress_bar": False,
               "enable_model_summary": False, "enable_checkpointing": False, "callbacks": [steps]}
    data = data_module(8, eval_n=5, batch_size=2, eval_batch_size=2, prefix_sharing=False)
    validated = L.Trainer(**options).validate(module, data, verbose=False)[0]
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, num_sanity_val_steps=0, limit_val_batches=0, **options)
    trainer.fit(module, data)
    out.with_suffix(f".rank{trainer.global_rank}.json").write_text(json.dumps({"train": steps.rows,
                                                                               "val": steps.val_rows}))
    if trainer.is_global_zero:
        out.write_text(json.dumps({"val/aux_loss": validated["val/aux_loss"], **steps.logged[0]}))
        torch.save({k: v.detach() for k, v in module.policy.named_parameters()}, out.with_suffix(".pt"))
