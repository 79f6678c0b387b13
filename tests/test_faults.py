"""Fault injection: damaged files, two writers at once, folders that cannot be written, a tokenizer too large for
the model, resume with other settings and on another number of ranks. Each test asserts the state afterwards
(the weights, the cache file, what was trained) and the message, not only that something was raised.

Signals to real training processes are in test_preemption.py (SIGTERM, SIGUSR1: the weights, the rows and
the logged metrics of a stopped-and-resumed run equal an uninterrupted one's). Tiny Llama from conftest.py,
the ASCII tokenizer; runs of a few steps; subprocesses only where a process must die or run beside another.
We run as root, which ignores permission bits: an unwritable folder is a path through a regular file.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import RecordBatches, ascii_tokenizer, data_module, ids, quiet_trainer, rows
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from dpo_lightning import DPOModule, ExportPretrained, PreferenceDataModule
from dpo_lightning.callbacks import PreemptionCheckpoint
from dpo_lightning.training.checkpoints import NamedCheckpointIO
from dpo_lightning.training.refcache import save_table


def validate(model: DPOModule, root, dm=None) -> dict[str, float]:
    trainer = quiet_trainer(root)
    trainer.validate(model, dm or data_module(8, eval_n=6))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def caught(fn) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in record]


# --- the reference cache -------------------------------------------------------------------------------------

def read(path) -> dict[str, torch.Tensor]:
    """A cache file's tensors, copied out of the file (safetensors maps it): the file is rewritten next."""
    return {name: tensor.clone() for name, tensor in load_file(path).items()}


CORRUPTIONS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:-9]),
    "garbage": lambda path: path.write_bytes(b"not a safetensors file at all" * 10),
    "empty": lambda path: path.write_bytes(b""),
    "too_few_rows": lambda path: save_file({"logps": read(path)["logps"][:-1].contiguous()}, path),
    "extra_table": lambda path: save_file({**read(path), "other": torch.zeros(2)}, path),
    "wrong_key": lambda path: save_file({"val": read(path)["logps"]}, path),
    "nan": lambda path: save_file({"logps": read(path)["logps"].index_fill(0, torch.tensor([1]), float("nan"))}, path),
}


def test_a_damaged_reference_cache_file_is_named_set_aside_and_scored_again(tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    model = lambda: DPOModule(tiny_llama, precompute_ref_log_probs=True, ref_logps_cache_dir=str(cache))  # noqa: E731
    expected = validate(model(), tmp_path)
    (path,) = cache.iterdir()
    table = read(path)["logps"]
    assert table.shape == (6, 2) and torch.isfinite(table).all()
    for name, corrupt in CORRUPTIONS.items():
        corrupt(path)
        metrics, messages = caught(lambda: validate(model(), tmp_path))
        named = [m for m in messages if str(path) in m and "set aside" in m]
        assert len(named) == 1, (name, messages)
        aside = [p for p in cache.iterdir() if p.name.endswith(".bad")]
        assert len(aside) == 1 and aside[0].name in named[0], name
        aside[0].unlink()
        assert load_file(path).keys() == {"logps"}, name  # scored again and saved whole
        torch.testing.assert_close(load_file(path)["logps"], table, msg=name)
        assert metrics == pytest.approx(expected, rel=1e-6, abs=1e-7), name


def _save_many(path: str, value: float, n: int) -> None:
    for _ in range(n):
        save_table(torch.full((64, 2), value), path)


def test_two_processes_saving_the_same_table_both_succeed_and_leave_a_whole_file(tmp_path):
    path = str(tmp_path / "cache" / "table.safetensors")
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_save_many, args=(path, value, 2000)) for value in (1.0, 2.0)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert [writer.exitcode for writer in writers] == [0, 0]  # before: FileNotFoundError on the shared .partial
    table = read(path)["logps"]
    assert table.shape == (64, 2) and table.unique().numel() == 1 and table[0, 0].item() in (1.0, 2.0)
    assert os.listdir(tmp_path / "cache") == ["table.safetensors"]  # no temporary file left behind


def test_train_and_val_with_the_same_pairs_share_one_cache_file(tiny_llama, tmp_path):
    # A common smoke test: validate, then fit on the same cache, then fit again with another beta (read only).
    cache = str(tmp_path / "cache")
    dm = lambda: data_module(8, eval_n=8)  # noqa: E731: the same 8 pairs in both splits
    validate(DPOModule(tiny_llama, precompute_ref_log_probs=True, ref_logps_cache_dir=cache), tmp_path, dm())
    for beta in (0.1, 0.2):
        record = RecordBatches()
        quiet_trainer(tmp_path, max_steps=2, callbacks=[record]).fit(
            DPOModule(tiny_llama, beta=beta, precompute_ref_log_probs=True, ref_logps_cache_dir=cache), dm())
        assert len(record.batches) == 2  # before: KeyError: 'train'
    assert len(os.listdir(cache)) == 1


def test_a_data_file_edited_with_its_size_and_time_kept_is_read_again(tmp_path):
    # A sync tool or `touch -r` restores the timestamp; before, the `datasets` cache of the old rows was served.
    path = tmp_path / "pairs.jsonl"

    def write(first_chosen: str) -> None:
        data = rows(8)
        data["chosen"][0] = first_chosen
        path.write_text("".join(json.dumps({k: data[k][i] for k in data}) + "\n" for i in range(8)))

    def first_chosen_ids() -> list[int]:
        dm = PreferenceDataModule(dataset=str(path), tokenizer=ascii_tokenizer(), max_length=48, max_prompt_length=24,
                                  batch_size=4)
        dm.prepare_data()
        dm.setup("fit")
        (row,) = [row for row in dm.train_data if row["row_id"] == 0]
        return row["chosen_input_ids"]

    write(" xy")
    stat = path.stat()
    assert first_chosen_ids()[:3] == ids(" xy")
    write(" zw")  # the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert first_chosen_ids()[:3] == ids(" zw")


# --- folders, checkpoints, the tokenizer: before any compute ------------------------------------------------

@pytest.mark.parametrize("setting", ["cache", "checkpoint", "export", "preemption"])
def test_an_unwritable_folder_stops_the_run_at_setup_naming_the_setting(tiny_llama, tmp_path, setting):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file: nothing can be created below it")
    folder = str(blocker / "out")
    model_kwargs = dict(precompute_ref_log_probs=True, ref_logps_cache_dir=folder) if setting == "cache" else {}
    callbacks = {"cache": [], "checkpoint": [ModelCheckpoint(dirpath=folder)], "export": [ExportPretrained(folder)],
                 "preemption": [PreemptionCheckpoint(dirpath=folder)]}[setting]
    names = {"cache": "--model.ref_logps_cache_dir", "checkpoint": "ModelCheckpoint's dirpath",
             "export": "ExportPretrained's dirpath", "preemption": "PreemptionCheckpoint's dirpath"}
    record = RecordBatches()
    model = DPOModule(tiny_llama, learning_rate=1e-2, **model_kwargs)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    with pytest.raises(ValueError, match=f"{names[setting]}.*cannot write to {folder}: {blocker} is a file"):
        quiet_trainer(tmp_path, max_steps=2, callbacks=[record, *callbacks]).fit(model, data_module(8))
    assert record.batches == []  # nothing trained, nothing scored
    for name, value in model.policy.state_dict().items():
        assert torch.equal(value, before[name])


def test_a_tokenizer_larger_than_the_embedding_stops_at_setup_naming_both_sizes(tiny_llama, tmp_path):
    tokenizer = ascii_tokenizer()
    rows_in_model = DPOModule(tiny_llama).policy.get_input_embeddings().num_embeddings
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<extra_{i}>" for i in range(
        rows_in_model - len(tokenizer) + 1)]})
    largest = len(tokenizer) - 1
    assert largest == rows_in_model  # one id past the last row
    dm = data_module(8, tokenizer=tokenizer)
    record = RecordBatches()
    with pytest.raises(ValueError, match=f"largest token id is {largest} .* input embedding has {rows_in_model} rows"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[record]).fit(DPOModule(tiny_llama), dm)
    assert record.batches == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_checkpoint_is_named(tiny_llama, tmp_path, damage):
    path = tmp_path / "good.ckpt"
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(DPOModule(tiny_llama, learning_rate=1e-2), data_module(8))
    trainer.save_checkpoint(path)
    bad = tmp_path / f"{damage}.ckpt"
    data = path.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(ValueError, match=f"cannot read the checkpoint {bad} .*truncated, empty or not a checkpoint"):
        quiet_trainer(tmp_path, max_steps=2).fit(DPOModule(tiny_llama, learning_rate=1e-2), data_module(8),
                                                 ckpt_path=bad)


def _save_forever(path: str) -> None:
    io = NamedCheckpointIO(TorchCheckpointIO())  # the IO DPOModule gives the strategy at setup (preflight.py)
    state = {"weights": torch.randn(2_000_000), "step": 0}
    while True:
        state["step"] += 1
        io.save_checkpoint(state, path)


def test_a_checkpoint_save_killed_with_sigkill_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    writer = multiprocessing.get_context("fork").Process(target=_save_forever, args=(str(path),))
    writer.start()
    deadline = time.monotonic() + 120
    while not path.exists() or torch.load(path, weights_only=True)["step"] < 3:  # mid-way through a later save
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(timeout=60)
    assert writer.exitcode == -signal.SIGKILL
    checkpoint = torch.load(path, weights_only=True)  # the last whole save, never a part of one
    assert checkpoint["step"] >= 3 and checkpoint["weights"].shape == (2_000_000,)


# --- resume with other settings ----------------------------------------------------------------------------

class LearningRates(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append([group["lr"] for group in trainer.optimizers[0].param_groups])


def test_resume_with_changed_settings_says_what_changed_and_the_learning_rate_takes_effect(tiny_llama, tmp_path):
    every_2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    quiet_trainer(tmp_path, max_steps=2, callbacks=[every_2]).fit(DPOModule(tiny_llama, learning_rate=1e-3),
                                                                 data_module(16))
    rates = LearningRates()
    model = DPOModule(tiny_llama, learning_rate=1e-2, beta=0.2)
    _, messages = caught(lambda: quiet_trainer(tmp_path, max_steps=4, callbacks=[rates]).fit(
        model, data_module(16), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    (message,) = [m for m in messages if "other settings" in m]
    assert "beta 0.1 -> 0.2" in message and "learning_rate 0.001 -> 0.01" in message
    assert rates.seen == [[1e-2, 1e-2]] * 2  # before: the checkpoint's 1e-3 went on silently


def test_a_one_process_checkpoint_resumed_on_two_ranks_trains_every_remaining_pair_once(tiny_llama, tmp_path):
    # 24 pairs in batches of 4: one process stops after 2 steps (8 pairs); 2 DDP ranks (gloo) resume and
    # train 2 steps of 8 pairs, which must be the 16 pairs left, in the epoch's order (before: 8 were skipped).
    straight = RecordBatches()
    quiet_trainer(tmp_path / "straight", max_steps=6, callbacks=[straight]).fit(
        DPOModule(tiny_llama, learning_rate=1e-2), data_module(24, eval_n=0))
    every_2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    quiet_trainer(tmp_path / "first", max_steps=2, callbacks=[every_2]).fit(
        DPOModule(tiny_llama, learning_rate=1e-2), data_module(24, eval_n=0))
    subprocess.run([sys.executable, __file__, tiny_llama, str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"),
                    str(tmp_path / "ddp")], check=True, timeout=600, cwd=tmp_path)
    ranks = [json.loads((tmp_path / "ddp" / f"rows.rank{r}.json").read_text()) for r in range(2)]
    assert [len(batches) for batches in ranks] == [2, 2]
    for step in range(2):  # global batch of step 2 + step: two of the straight run's batches of 4
        trained = sorted(ranks[0][step] + ranks[1][step])
        assert trained == sorted(straight.batches[2 + 2 * step] + straight.batches[3 + 2 * step]), step


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import RecordBatches as Record, data_module as data  # noqa: F811: the subprocess's own imports

    policy, ckpt, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[record])
    trainer.fit(DPOModule(policy, learning_rate=1e-2), data(24, eval_n=0), ckpt_path=ckpt)
    out.mkdir(exist_ok=True)
    (out / f"rows.rank{trainer.global_rank}.json").write_text(json.dumps(record.batches))
