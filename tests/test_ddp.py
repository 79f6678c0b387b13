"""`Trainer(strategy="ddp", devices=2)` on CPU (gloo) equals one process: validation metrics, and the
training metrics and weights after training with the same global batch.

The policy and the reference are two different tiny models, so every metric is far from its step-0
value; 8 validation pairs in batches of 3 split unevenly across batches, so a mean of batch means
would differ from the exact mean the metrics must give. Each run is a subprocess executing this file,
because Lightning's DDP launcher re-runs the command that started it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run(policy: str, reference: str, devices: int, out: Path, precompute_in: Path | None = None) -> dict[str, float]:
    subprocess.run([sys.executable, __file__, policy, reference, str(devices), str(out), str(precompute_in or "")],
                   check=True, timeout=600, cwd=out.parent)
    return json.loads(out.read_text())


@pytest.mark.parametrize("precompute", [False, True], ids=["padded", "packed-with-precomputed-reference"])
def test_ddp_equals_single_process(tiny_llama, other_llama, tmp_path, precompute):
    # Validation metrics before training, then 3 steps of 4 pairs: one process with batches of 4 or two
    # with 2 each (the same pairs each step: each rank takes every other index of the same permutation).
    # Precomputed, each rank scores half the pairs and every rank gets the whole table; those DDP runs
    # also pack their pairs (prefix sharing), against the single process's padded batches.
    single = run(tiny_llama, other_llama, 1, tmp_path / "single.json")
    ddp = run(tiny_llama, other_llama, 2, tmp_path / "ddp.json", tmp_path / "cache" if precompute else None)
    if precompute:
        assert len(list((tmp_path / "cache").iterdir())) == 2  # train and val tables, written once by rank 0
    assert set(single["val"]) == set(ddp["val"]) and "val/rewards/margin_length_corr" in single["val"]
    assert abs(single["val"]["val/rewards/margins"]) > 1e-3  # the two models really differ
    for name, value in single["val"].items():
        assert ddp["val"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    # The last step's training metrics, reduced over both ranks in one all-reduce.
    assert len(single["train"]) == 12 and set(single["train"]) == set(ddp["train"])
    for name, value in single["train"].items():
        assert ddp["train"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    trained_single = torch.load(tmp_path / "single.pt", weights_only=True)
    trained_ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    start = torch.load(tmp_path / "single.start.pt", weights_only=True)
    assert any(not torch.equal(trained_single[k], start[k]) for k in start)  # training moved the weights
    for name, weight in trained_single.items():
        torch.testing.assert_close(trained_ddp[name], weight, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    import lightning as L

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import ascii_tokenizer, rows

    from dpo_lightning import DPOModule, PreferenceDataModule

    policy, reference, devices, out, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
    data = PreferenceDataModule(dataset=rows(16), eval_dataset=rows(8), tokenizer=ascii_tokenizer(), max_length=48,
                                max_prompt_length=24, batch_size=4 // devices, eval_batch_size=3,
                                prefix_sharing=bool(cache), packing=bool(cache))
    model = DPOModule(policy, ref_model_name_or_path=reference, learning_rate=1e-3,
                      precompute_ref_log_probs=bool(cache), ref_logps_cache_dir=cache or None)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=3,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    start = {k: v.clone() for k, v in model.policy.state_dict().items()}
    metrics = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_progress_bar=False, enable_model_summary=False).validate(model, data, verbose=False)[0]
    trainer.fit(model, data)
    if trainer.is_global_zero:
        def compared(values: dict, stage: str) -> dict:  # the metrics both layouts have (not packing's own)
            return {k: float(v) for k, v in values.items() if k.startswith(stage) and not k.endswith("pairs_per_row")}

        out.write_text(json.dumps({"val": compared(metrics, "val/"), "train": compared(trainer.callback_metrics,
                                                                                        "train/")}))
        torch.save(model.policy.state_dict(), out.with_suffix(".pt"))
        torch.save(start, out.with_suffix(".start.pt"))
