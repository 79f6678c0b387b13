"""DDP on CPU (gloo) against one process, on splits that do not divide by the ranks: 1, 2 and 3 ranks.

29 training pairs, 6 pairs per global micro-batch (6 x 1, 3 x 2 or 2 x 3 ranks), gradient accumulation 2,
3 optimizer steps; the first micro-batch of step 1 has NaN log-probs on rank 0 (`nonfinite_loss: skip`).
7 validation pairs in batches of 2 per rank. The 3-rank run also packs its pairs (prefix sharing) and
precomputes the reference, against the others' padded batches and live reference. The policy and the
reference are two different tiny models, so every metric is far from its step-0 value.

- Validation metrics equal one process's, although the ranks hold 3, 2 and 2 pairs: no pair counted twice. The
  margin/length correlation over the ranks is the correlation of all 7 pairs (its sums are float64 and summed
  exactly); between runs, each pair's margin agrees to float32 rounding of its log-probs (the 3-rank run packs its
  pairs, another attention layout), which 7 pairs' correlation magnifies to a few 1e-6 on some CPUs.
- Step 1 is skipped on every rank: no weight moves and nothing is logged for it.
- Steps 0 and 1 hold the same 12 pairs in every run: same weights and training metrics.
- Step 2 is the last, uneven one: 5 pairs left. One process trains on those 5; with 2 or 3 ranks every
  rank needs a batch, and the ranks short of pairs take the epoch's first pair again (resume.EvalSampler's
  sibling, `EpochSampler`, pads as `DistributedSampler` does), so both train on the same 6 pairs.

Each run is a subprocess executing this file, because Lightning's DDP launcher re-runs the command that
started it.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICES = (1, 2, 3)


def run(policy: str, reference: str, devices: int, out: Path, cache: Path | None = None) -> dict:
    subprocess.run([sys.executable, __file__, policy, reference, str(devices), str(out), str(cache or "")],
                   check=True, timeout=900, cwd=out.parent)
    result = json.loads(out.read_text())
    result["rows"] = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(devices)]
    result["weights"] = torch.load(out.with_suffix(".pt"), weights_only=True)  # after each optimizer step
    result["val_pairs"] = {row: values for r in range(devices)  # row id -> (margin, length difference)
                           for row, values in json.loads(out.with_suffix(f".pairs.rank{r}.json").read_text())}
    return result


def pearson(pairs: dict[int, list[float]]) -> float:
    """The correlation of margin with length difference over `pairs`, two-pass, in Python's float64."""
    xs, ys = zip(*pairs.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


def global_batches(result: dict) -> list[list[int]]:
    """Each global micro-batch's rows: the ranks' micro-batches of the same index, together."""
    return [sorted(sum((rank[i] for rank in result["rows"]), [])) for i in range(len(result["rows"][0]))]


def assert_same(a: dict, b: dict, rel: float, what: str) -> None:
    assert set(a) == set(b), what
    for name, value in a.items():
        assert b[name] == pytest.approx(value, rel=rel, abs=rel / 10), f"{what}: {name}"


def assert_same_weights(a: dict, b: dict) -> None:
    # AdamW's first update is lr * g / (|g| + eps): where a gradient is near 0, float rounding of the
    # gradient's sum (other ranks, other order) moves it by a fraction of lr = 1e-3; 1e-5 is 1% of one step.
    for name, weight in a.items():
        torch.testing.assert_close(b[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_on_uneven_splits_equals_one_process(tiny_llama, other_llama, tmp_path):
    runs = {n: run(tiny_llama, other_llama, n, tmp_path / f"ddp{n}.json", tmp_path / "cache" if n == 3 else None)
            for n in DEVICES}
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and val tables, written once by rank 0
    single = runs[1]

    # Validation: 7 pairs, exact means over all of them whatever the ranks.
    assert abs(single["val"]["val/rewards/margins"]) > 1e-3 and "val/rewards/margin_length_corr" in single["val"]
    corr = "val/rewards/margin_length_corr"
    for n in DEVICES:  # the 7 pairs' correlation, whichever rank held each
        assert sorted(runs[n]["val_pairs"]) == list(range(7))
        assert runs[n]["val"][corr] == pytest.approx(pearson(runs[n]["val_pairs"]), rel=1e-6), n
    for n in DEVICES[1:]:
        assert runs[n]["val_pairs_per_rank"] == ([4, 3] if n == 2 else [3, 2, 2])  # the 7 pairs, none twice
        assert_same({k: v for k, v in single["val"].items() if k != corr},
                    {k: v for k, v in runs[n]["val"].items() if k != corr}, 1e-5, f"val, {n} ranks")
        for row, (margin, length_difference) in single["val_pairs"].items():
            # beta 0.1 x 4 log-probs of about -30, each to float32 rounding (2e-6) and a few ulps of another layout
            assert runs[n]["val_pairs"][row] == [pytest.approx(margin, abs=1e-5), length_difference], (n, row)

    # The same pairs in every global micro-batch but the last; there the ranks repeat the epoch's first pair.
    batches = global_batches(single)
    assert [len(b) for b in batches] == [6, 6, 6, 6, 5] and sorted(sum(batches, [])) == list(range(29))
    first_pair = single["rows"][0][0][0]
    for n in DEVICES[1:]:
        assert global_batches(runs[n])[:4] == batches[:4], n
        assert global_batches(runs[n])[4] == sorted(batches[4] + [first_pair]), n

    for n, result in runs.items():
        assert sorted(result["train"]) == ["0", "2"], n  # step 1 was skipped: nothing logged for it
        weights = result["weights"]
        assert all(torch.equal(weights[1][k], weights[0][k]) for k in weights[0]), n  # ... and no weight moved
        assert any(not torch.equal(weights[2][k], weights[1][k]) for k in weights[0]), n
    assert {"train/grad_norm", "train/learning_rate"} <= set(single["train"]["0"])  # compared like the rest
    for n in DEVICES[1:]:
        assert_same(single["train"]["0"], runs[n]["train"]["0"], 1e-4, f"train step 0, {n} ranks")
        assert_same_weights(single["weights"][1], runs[n]["weights"][1])
    # The uneven last step: 2 and 3 ranks trained on the same 6 pairs, one process on 5 of them.
    assert_same(runs[2]["train"]["2"], runs[3]["train"]["2"], 1e-4, "train step 2, 2 vs 3 ranks")
    assert_same_weights(runs[2]["weights"][2], runs[3]["weights"][2])
    assert single["train"]["2"]["train/lengths/chosen"] != pytest.approx(runs[2]["train"]["2"]["train/lengths/chosen"])


def test_a_data_error_stops_every_rank_with_our_error(tiny_llama, tmp_path):
    # PKU-SafeRLHF rows without --data.label_column, 2 gloo ranks: rank 0 raised in prepare_data while rank 1 waited
    # for it at the barrier before setup, and the run ended with rank 1's "Connection closed by peer".
    rows = [{"prompt": f"Q{i}?", "response_0": " yes", "response_1": " no", "better_response_id": i % 2,
             "safer_response_id": 1} for i in range(4)]
    (tmp_path / "pku.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = subprocess.run([sys.executable, "-m", "dpo_lightning.cli", "fit", "--model.model_name_or_path", tiny_llama,
                           "--data.dataset", str(tmp_path / "pku.jsonl"), "--trainer.strategy", "ddp",
                           "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "1",
                           "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                           f"--trainer.default_root_dir={tmp_path}"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode != 0 and "Connection closed by peer" not in done.stderr, done.stderr[-3000:]
    # Our own error, as the command line prints it (one line); each rank that ends with an error (rank 0 may stop
    # rank 1 first) ends with ours, never with a traceback or another error.
    error = "dpo-lightning: train data has PKU-SafeRLHF's two labels ['better_response_id', 'safer_response_id']"
    assert error in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Error: " not in done.stderr, done.stderr[-3000:]


if __name__ == "__main__":
    import lightning as L

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import data_module
    from test_nonfinite import PoisonedStep

    from dpo_lightning.training.metrics import MarginLengthCorrelation
    from dpo_lightning.utils.steps import ends_optimizer_step

    class Record(L.Callback):
        """This rank's rows per micro-batch (train and val) and, on rank 0, the weights after each step."""

        def __init__(self):
            self.rows, self.val_rows, self.weights = [], [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.rows.append(batch["row_ids"].tolist())

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            self.val_rows.append(batch["row_ids"].tolist())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if ends_optimizer_step(trainer, batch_idx):
                self.weights.append({k: v.clone() for k, v in module.policy.state_dict().items()})

    class Logged(PoisonedStep):
        """Records each training step's logged metrics (not packing's own pairs_per_row)."""

        def log(self, name, value, *args, **kwargs):
            if name.startswith("train/") and not name.endswith("pairs_per_row"):
                self.__dict__.setdefault("train_logs", {}).setdefault(str(self.global_step), {})[name] = float(value)
            return super().log(name, value, *args, **kwargs)

    policy, reference, devices, out, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
    data = data_module(29, eval_n=7, batch_size=6 // devices, eval_batch_size=2, prefix_sharing=bool(cache),
                       packing=bool(cache))
    margins = []  # each batch's (margins, length differences), as the correlation metric receives them
    update = MarginLengthCorrelation.update  # (a metric binds its update when built: patched before the model)
    MarginLengthCorrelation.update = lambda self, x, y: margins.append((x.tolist(), y.tolist())) or update(self, x, y)
    model = Logged(policy, ref_model_name_or_path=reference, learning_rate=1e-3, nonfinite_loss="skip",
                   precompute_ref_log_probs=bool(cache), ref_logps_cache_dir=cache or None)
    record = Record()
    options = {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto", "logger": False,
               "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
    metrics = L.Trainer(callbacks=[record], **options).validate(model, data, verbose=False)[0]
    pairs = [(row, [x, y]) for rows, (xs, ys) in zip(record.val_rows, margins) for row, x, y in zip(rows, xs, ys)]
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, num_sanity_val_steps=0, limit_val_batches=0,
                        log_every_n_steps=1,
                        callbacks=[record], **options)
    val_rows = record.val_rows
    trainer.fit(model, data)
    out.with_suffix(f".rank{trainer.global_rank}.json").write_text(json.dumps(record.rows))
    out.with_suffix(f".pairs.rank{trainer.global_rank}.json").write_text(json.dumps(pairs))
    gathered = trainer.strategy.all_gather(torch.tensor(len(sum(val_rows, []))))  # each rank's validation pairs
    if trainer.is_global_zero:
        out.write_text(json.dumps({"val": {k: float(v) for k, v in metrics.items() if not k.endswith("pairs_per_row")},
                                   "train": model.train_logs, "val_pairs_per_rank": gathered.view(-1).tolist()}))
        torch.save(record.weights, out.with_suffix(".pt"))
