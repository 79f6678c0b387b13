"""`Throughput`: tokens per second, padding fraction and the FLOPs count behind MFU, checked by hand.

Counts on layouts built by the collators from pairs small enough to count on paper; N of a tiny Llama
worked out from its shapes; under 2-process DDP (gloo) with gradient accumulation and uneven batches, the
logged values equal the sums over both ranks divided once (each rank's clock is faked so its step time
is known), not a mean of per-rank rates; the quickstart's metrics.csv carries them. No network.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ascii_tokenizer
from lightning.pytorch.loggers import CSVLogger

from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.data.batches import collate_pairs
from dpo_lightning.data.packing import collate_shared
from dpo_lightning.training.throughput import count_tokens, flops_per_token, matmul_params

A = {"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 2], "rejected_input_ids": [8, 9, 2]}  # 2 + 2 + 3 = 7
B = {"prompt_input_ids": [5], "chosen_input_ids": [7], "rejected_input_ids": [8]}  # 1 + 1 + 1 = 3


@pytest.mark.parametrize("batch, expected", [
    # padded: rows A+chosen (4), A+rejected (5), B+chosen (2), B+rejected (2), each padded to 5.
    (collate_pairs([A, B], pad_token_id=0), [4 + 5 + 2 + 2, 4 * 5, 4]),
    (collate_pairs([A], pad_token_id=0), [4 + 5, 2 * 5, 2]),
    # shared: one row per pair, [prompt | chosen | rejected], padded to the longest pair (7).
    (collate_shared([A, B], pad_token_id=0), [7 + 3, 2 * 7, 2]),
    # packed into rows of 10: both pairs in one row, no padding at all.
    (collate_shared([A, B], pad_token_id=0, packing=True, max_tokens_per_row=10), [10, 10, 1]),
])
def test_tokens_and_positions_per_layout(batch, expected):
    assert count_tokens(batch).tolist() == expected  # tokens, positions, rows


def test_flops_count_the_output_head_and_the_reference_forward(tiny_llama):
    # tiny_llama: vocab 128, d 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads (k, v are 64 x 32), untied head.
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k v, o, gate up down, 2 norms
    n = 2 * per_layer + 64 + 128 * 64  # layers, final norm, head (the input embedding is a lookup)
    module = DPOModule(tiny_llama)
    assert matmul_params(module.policy) == n
    attention = 4 * 2 * 64 * 10  # 4 L d T forward, T = 10 tokens per row
    assert flops_per_token(module, 10) == 3 * (2 * n + attention) + (2 * n + attention)
    assert flops_per_token(DPOModule(tiny_llama, loss_type="simpo"), 10) == 3 * (2 * n + attention)  # reference-free
    module.ref.tables["train"] = torch.zeros(4, 2)  # precomputed reference log-probs: no reference forward
    assert flops_per_token(module, 10) == 3 * (2 * n + attention)


def uneven_rows(n: int) -> dict[str, list[str]]:
    return {"prompt": [f"Q{i}:" + "x" * (i % 5) for i in range(n)], "chosen": [" y" * (1 + i % 3) for i in range(n)],
            "rejected": [" n" * (1 + i % 4) for i in range(n)]}


class RecordBatches(L.Callback):
    """Each rank's own count of mask ones and positions per optimizer step, written to `<out>/rank_<r>.json`."""

    def __init__(self, out: Path):
        self.out, self.steps = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.steps.append([0, 0])
        self.steps[-1][0] += int(batch["attention_mask"].sum())
        self.steps[-1][1] += batch["attention_mask"].numel()

    def on_train_end(self, trainer, pl_module):
        (self.out / f"rank_{trainer.global_rank}.json").write_text(json.dumps(self.steps))


def test_under_ddp_the_rates_are_sums_over_ranks_divided_once(tiny_llama, tmp_path):
    subprocess.run([sys.executable, __file__, tiny_llama, str(tmp_path)], check=True, timeout=300, cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/tokens_per_second")]
    assert len(logged) == len(ranks[0]) == 3  # 3 optimizer steps, logged at each
    for row, step0, step1 in zip(logged, *ranks):
        tokens, positions = step0[0] + step1[0], step0[1] + step1[1]
        seconds = (1.0 + 2.0) / 2  # the fake clocks: a step takes 1 s on rank 0 and 2 s on rank 1
        assert float(row["train/tokens_per_second"]) == pytest.approx(tokens / seconds, rel=1e-12)
        assert float(row["train/tokens_per_second_per_rank"]) == pytest.approx(tokens / seconds / 2, rel=1e-12)
        assert float(row["train/padding_fraction"]) == pytest.approx(1 - tokens / positions, rel=1e-12)
        # not a mean of per-rank rates, which would weigh the slow rank's tokens less
        assert float(row["train/tokens_per_second"]) != pytest.approx(step0[0] / 1.0 + step1[0] / 2.0)
    assert "train/mfu" not in logged[0]  # a CPU: no peak to compare with


def test_mfu_is_model_flops_over_the_peak_when_the_device_has_one(tiny_llama, tmp_path, monkeypatch):
    # No GPU here: give the CPU a peak of 1 GFLOP/s and a clock where every step takes 2 s.
    import dpo_lightning.training.throughput as throughput

    ticks = iter(range(0, 1000, 1))
    monkeypatch.setattr(throughput, "perf_counter", lambda: 2.0 * next(ticks))
    monkeypatch.setattr(throughput.Throughput, "_peak_flops", staticmethod(lambda trainer: 1e9))
    record = RecordBatches(tmp_path)
    data = PreferenceDataModule(dataset=uneven_rows(8), tokenizer=ascii_tokenizer(add_bos=True), max_length=48,
                                max_prompt_length=24, batch_size=4, prefix_sharing=False)  # rows counted by hand
    module = DPOModule(tiny_llama)
    L.Trainer(max_steps=2, log_every_n_steps=1, limit_val_batches=0, logger=CSVLogger(tmp_path),
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[record]).fit(module, data)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        logged = [float(r["train/mfu"]) for r in csv.DictReader(f) if r.get("train/mfu")]
    rows_per_step = 2 * 4  # chosen and rejected rows of 4 pairs
    expected = [tokens * flops_per_token(module, tokens / rows_per_step) / 2.0 / 1e9 for tokens, _ in record.steps]
    assert logged == pytest.approx(expected, rel=1e-12) and len(logged) == 2


def test_quickstart_metrics_csv_has_the_throughput_columns(tmp_path, monkeypatch):
    from dpo_lightning.cli.main import cli_main

    cli = cli_main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"),
                    "--trainer.max_steps=10", "--trainer.limit_val_batches=1", "--trainer.callbacks=[]",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    with open(Path(cli.trainer.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/tokens_per_second")]
    assert [r["step"] for r in rows] == ["9"]  # log_every_n_steps 10: the row of step 10's train metrics
    assert float(rows[0]["train/tokens_per_second"]) > 0 and 0 < float(rows[0]["train/padding_fraction"]) < 1


if __name__ == "__main__":
    model_path, out = sys.argv[1], Path(sys.argv[2])
    import dpo_lightning.training.throughput as throughput

    clock = {"t": 0.0}

    def fake_clock() -> float:  # each call advances rank r's clock by r + 1 s: start, end -> a step of r + 1 s
        clock["t"] += torch.distributed.get_rank() + 1 if torch.distributed.is_initialized() else 1
        return clock["t"]

    throughput.perf_counter = fake_clock
    data = PreferenceDataModule(dataset=uneven_rows(22), tokenizer=ascii_tokenizer(add_bos=True), max_length=48,
                                max_prompt_length=24, batch_size=2,  # 11 rows per rank: 6 batches, the last of 1
                                prefix_sharing=False)  # the padded layout: RecordBatches counts its mask
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, accumulate_grad_batches=2,
                        log_every_n_steps=1, limit_val_batches=0, logger=CSVLogger(out), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordBatches(out)])
    trainer.fit(DPOModule(model_path, learning_rate=1e-3), data)
