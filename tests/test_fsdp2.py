"""FSDP2 (`fully_shard` under Lightning's `ModelParallelStrategy`, `DPOModule.configure_model`) on CPU with gloo:
torch 2.13 and Lightning 2.6.6 run it there, unlike FSDP1 (tests/test_fsdp.py), offline and online (each rank
samples with the whole weights gathered, then trains sharded). Tiny models from conftest.py; no network. Each run is a subprocess executing this file, because Lightning's launcher re-runs the command
that started it.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch


def run(mode: str, policy: str, reference: str, devices: int, out: Path, trainer: dict | None = None,
        model: dict | None = None, **data) -> subprocess.CompletedProcess:
    """One run of this file's `__main__`; `trainer`, `model` and `data`: Trainer, DPOModule and PreferenceDataModule
    settings over its defaults (JSON)."""
    return subprocess.run([sys.executable, __file__, mode, policy, reference, str(devices), str(out), json.dumps(data),
                           json.dumps(trainer or {}), json.dumps(model or {})], capture_output=True, text=True,
                          timeout=600, cwd=out.parent)


def test_two_sharded_ranks_train_the_weights_of_one_unsharded_process(tiny_llama, other_llama, tmp_path):
    # 3 steps of 4 pairs: one process with batches of 4, unsharded, or two FSDP2 ranks with 2 each. Llama's
    # head is untied, so the lean log-probs (the default) call the decoder's and the head's units apart.
    for devices in (1, 2):
        done = run("train", tiny_llama, other_llama, devices, tmp_path / f"{devices}.json")
        assert done.returncode == 0, done.stderr[-3000:]
    single, sharded = (json.loads((tmp_path / f"{n}.json").read_text()) for n in (1, 2))
    assert sharded["sharded_units"] == 2 * (2 + 2)  # policy and reference: 2 layers, decoder, head
    assert abs(single["train/rewards/margins"]) > 1e-4  # the reference differs: the metrics are not step-0 zeros
    assert single["train/grad_norm"] > 1e-3  # the whole gradient's norm: the shards' parts summed over the ranks
    for name, value in single.items():
        if name.startswith("train/") and not name.endswith("pairs_per_row"):  # packing's own: rows per rank
            assert abs(sharded[name] - value) <= 1e-4 * abs(value) + 1e-5, name
    trained_single, trained_sharded = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in (1, 2))
    start = torch.load(tmp_path / "1.start.pt", weights_only=True)
    assert all(not torch.equal(trained_single[k], start[k]) for k in start)  # every weight moved
    # AdamW moves each weight by up to lr = 1e-3 a step whatever its gradient's size, so for a gradient near
    # 0 the reduce-scatter's other summation order shows; 1e-4 is a tenth of one step's move.
    for name, weight in trained_single.items():
        torch.testing.assert_close(trained_sharded[name], weight, rtol=1e-4, atol=1e-4, msg=name)


def text_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Length, then the characters: ties are rare, so each rank's share of the pairs is the one process's (a rank's
    loss is a mean over its own pairs, as under DDP)."""
    return [len(c) + sum(map(ord, c)) % 89 / 89 for c in completions]


def test_online_two_sharded_ranks_sample_and_train_as_one_unsharded_process(tiny_llama, tmp_path):
    # Online DPO, 3 steps of 4 prompts, 3 completions each, the reference refreshed at step 2, then the greedy
    # reward of the 4 validation prompts. Each FSDP2 rank completes its own 2 prompts with the whole weights
    # gathered, then trains sharded; a completion's random stream is its own (keyed by row and sample), so the
    # two ranks sample exactly what the one process samples for the same prompts.
    for devices in (1, 2):  # validation first, as the CLI's default (FSDP2 then met the decoder alone first)
        done = run("online", tiny_llama, "", devices, tmp_path / f"{devices}.json", trainer={"num_sanity_val_steps": 2})
        assert done.returncode == 0, done.stderr[-3000:]
    single, sharded = (json.loads((tmp_path / f"{n}.json").read_text()) for n in (1, 2))
    assert sharded["sharded_units"] == 2 * (2 + 2)
    assert single["train/objective/ties"] == 0 and single["val/reward/greedy"] > 0
    # Not packing's rows per rank, the wall-time share, nor the correlation of margins a few 1e-3 wide with the
    # lengths (its float32 rounding is of the order of the tolerance).
    compared = [name for name in single if name.startswith(("train/", "val/")) and not name.endswith(
        ("pairs_per_row", "generate_share", "margin_length_corr"))]
    assert {"train/loss", "train/objective/scores", "train/objective/scores_margin", "val/reward/greedy"} <= set(
        compared)
    for name in compared:
        assert abs(sharded[name] - single[name]) <= 1e-4 * abs(single[name]) + 1e-5, name
    trained_single, trained_sharded = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in (1, 2))
    for name, weight in trained_single.items():
        torch.testing.assert_close(trained_sharded[name], weight, rtol=1e-4, atol=1e-4, msg=name)
    references = [torch.load(tmp_path / f"{n}.ref.pt", weights_only=True) for n in (1, 2)]
    for name, weight in references[0].items():  # refreshed to the policy after step 1, on every rank's shards
        torch.testing.assert_close(references[1][name], weight, rtol=1e-4, atol=1e-4, msg=name)
    assert any(not torch.equal(references[0][name], weight) for name, weight in trained_single.items())


def test_online_a_tied_head_trains_sharded_on_the_shared_layout_it_chose_before_sharding(tiny_gpt2, tmp_path):
    # GPT-2's head is tied (full logits, lean_logps false), so its embedding lies in the causal LM's root unit: the
    # shared layout's check, which calls the decoder alone, met its shards at the first batch (validation's) and
    # refused the layout that `auto` had chosen before sharding.
    done = run("online", tiny_gpt2, "", 2, tmp_path / "tied.json", trainer={"num_sanity_val_steps": 2},
               model={"lean_logps": False})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch layout: shared (prefix sharing, packed (--data.prefix_sharing auto" in done.stderr + done.stdout
    trained, start = (torch.load(tmp_path / name, weights_only=True) for name in ("tied.pt", "tied.start.pt"))
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_a_tied_head_with_lean_logps_names_the_fix(tiny_gpt2, tmp_path):
    # GPT-2 ties its head to the embedding: the head alone cannot gather a weight the decoder's unit owns.
    done = run("train", tiny_gpt2, "", 2, tmp_path / "tied.json")
    assert done.returncode != 0 and "--model.lean_logps false" in done.stderr


if __name__ == "__main__":
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import ascii_tokenizer, rows

    from dpo_lightning import DPOModule, GreedyReward, PreferenceDataModule

    mode, policy, reference, devices, out = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4]), \
        Path(sys.argv[5])
    online = mode == "online"
    data = PreferenceDataModule(dataset=rows(12), eval_dataset=rows(4) if online else None, tokenizer=ascii_tokenizer(),
                                max_length=48, max_prompt_length=24, batch_size=4 // devices, eval_fraction=0.0,
                                **json.loads(sys.argv[6]))
    model = DPOModule(policy, ref_model_name_or_path=reference, learning_rate=1e-3, online={
        "reward_funcs": "test_fsdp2.text_reward", "num_samples": 3, "max_new_tokens": 6,
        "ref_model_sync_steps": 2} if online else None, **json.loads(sys.argv[8]))
    start = {k: v.clone() for k, v in model.policy.state_dict().items()}
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[GreedyReward("test_fsdp2.text_reward", max_new_tokens=6)] if online else [],
                        **{"max_steps": 3, "log_every_n_steps": 1, "num_sanity_val_steps": 0, "limit_val_batches": None if online else 0,
                           **json.loads(sys.argv[7])})
    trainer.fit(model, data)
    weights, reference = ({k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in m.state_dict().items()}
                          for m in (model.policy, model.reference))
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics["sharded_units"] = sum(isinstance(m, FSDPModule) for m in model.modules())
        out.write_text(json.dumps(metrics))
        torch.save(weights, out.with_suffix(".pt"))
        torch.save(start, out.with_suffix(".start.pt"))
        torch.save(reference, out.with_suffix(".ref.pt"))
