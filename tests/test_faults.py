"""Fault injection: damaged files, two writers at once, folders that cannot be written, a tokenizer too large for
the model, resume with other settings and on another number of ranks; online DPO's rewards that fail at a step
(raise, or return strings, NaN, a wrong count), prompts that all tie, prompts longer than max_length. Each test
asserts the state afterwards (the weights, the cache file, what was trained) and the message, not only that
something was raised.

Signals to real training processes are in test_preemption.py (SIGTERM, SIGUSR1: the weights, the rows and
the logged metrics of a stopped-and-resumed run equal an uninterrupted one's). Tiny Llama from conftest.py,
the ASCII tokenizer; runs of a few steps; subprocesses only where a process must die or run beside another.
We run as root, which ignores permission bits: an unwritable folder is a path through a regular file.
"""

import csv
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
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file, save_file

from dpo_lightning import DPOModule, ExportPretrained, PreferenceDataModule
from dpo_lightning.callbacks import PreemptionCheckpoint
from dpo_lightning.cli.main import cli_main
from dpo_lightning.online.rewards import RewardError
from dpo_lightning.training.checkpoints import NamedCheckpointIO
from dpo_lightning.training.refcache import save_table
from dpo_lightning.utils.atomic import atomic_path

ROOT = Path(__file__).resolve().parents[1]


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


def test_a_folder_written_atomically_replaces_the_earlier_one_whole_and_an_error_leaves_it(tmp_path):
    out = tmp_path / "export"
    with atomic_path(out) as partial:
        os.mkdir(partial)
        Path(partial, "weights").write_text("old")
        Path(partial, "stale").write_text("only in the old one")
    with pytest.raises(RuntimeError), atomic_path(out) as partial:
        os.mkdir(partial)
        Path(partial, "weights").write_text("half")
        raise RuntimeError("the writer failed")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"weights": "old", "stale": "only in the old one"}
    with atomic_path(out) as partial:
        os.mkdir(partial)
        Path(partial, "weights").write_text("new")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"weights": "new"}  # nothing of the old one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder beside it


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


# --- online DPO: a reward that fails at step N, prompts that all tie, prompts longer than max_length -------------
# The rewards are named by import path (`test_faults.<name>`), as a config names them; the test sets `FAILURE`.

CALLS: list[tuple[list[str], list[str]]] = []  # what each reward call saw: (prompts, completions)
FAILURE = {"kind": "raises", "at": 3}  # what `failing_reward` does from its `at`-th call on
def _down(completions: list[str]):
    raise RuntimeError("the scoring service is down")


FAILURES = {
    "raises": _down,
    "strings": lambda completions: ["good"] * len(completions),
    "nan": lambda completions: [float("nan")] + [1.0] * (len(completions) - 1),
    "too few": lambda completions: [1.0] * (len(completions) - 1),
    "None": lambda completions: None,
    "one number": lambda completions: 3.0,
    "complex": lambda completions: [1j] * len(completions),
}
# What the error says of each, after naming the entry, the setting and the step: the reward's own message.
SAYS = {"raises": "raised at training step 2: RuntimeError: the scoring service is down",
        "strings": "returned 'good' \\(str\\) for completion 0, not a number at training step 2",
        "nan": "returned nan for completion 0 .*, not a finite number at training step 2",
        "too few": "returned 11 scores for 12 completions at training step 2",
        "None": "returned a NoneType, not one number per completion at training step 2",
        "one number": "returned a float, not one number per completion at training step 2",
        "complex": "returned 1j \\(complex\\) for completion 0, not a number at training step 2"}


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    CALLS.append((list(prompts), list(completions)))
    return [float(len(c)) for c in completions]


def failing_reward(prompts: list[str], completions: list[str]):
    """`length_reward` until its `FAILURE["at"]`-th call, then `FAILURES[FAILURE["kind"]]`."""
    scores = length_reward(prompts, completions)
    return FAILURES[FAILURE["kind"]](completions) if len(CALLS) >= FAILURE["at"] else scores


def tensor_reward(prompts: list[str], completions: list[str]) -> torch.Tensor:
    """`length_reward` as a float64 column (N, 1), as a reward model's head gives it."""
    return torch.tensor(length_reward(prompts, completions), dtype=torch.float64)[:, None]


def constant_reward(prompts: list[str], completions: list[str]) -> list[float]:
    CALLS.append((list(prompts), list(completions)))
    return [1.0] * len(completions)


def tied_at_call_2_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """`length_reward`, except that every completion scores 1 at the second call (step 1): a step of ties."""
    scores = length_reward(prompts, completions)
    return [1.0] * len(completions) if len(CALLS) == 2 else scores


class Steps(L.Callback):
    """The policy's weights after each optimizer step, and each micro-batch's trained batch (the pairs)."""

    def __init__(self):
        self.weights, self.batches = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in outputs["batch"].items() if isinstance(v, torch.Tensor)})
        self.weights.append({k: v.clone() for k, v in module.policy.state_dict().items()})


def fit_online(policy, root, reward: str, steps: Steps | None = None, dataset=None, logger=False,
               **data_options) -> Steps:
    """3 online steps of 4 prompts, 3 samples each, rewarded by `test_faults.<reward>`; `steps` records them
    (`steps.start`: the weights before, `steps.model`, `steps.data`), also when the run raises."""
    L.seed_everything(0)
    CALLS.clear()
    steps = steps or Steps()
    steps.model = DPOModule(policy, learning_rate=1e-2, online={"reward_funcs": f"test_faults.{reward}",
                                                                "num_samples": 3, "max_new_tokens": 6})
    steps.start = {k: v.clone() for k, v in steps.model.policy.state_dict().items()}
    steps.data = data_module(12, eval_n=0, dataset=dataset, **{"max_length": 32, "max_prompt_length": 16,
                                                                **data_options})
    trainer = quiet_trainer(root, max_steps=3, callbacks=[steps], log_every_n_steps=1, logger=logger)
    trainer.fit(steps.model, steps.data)
    return steps


def metrics_csv(root) -> list[dict[str, str]]:
    with open(next(Path(root).rglob("metrics.csv"))) as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.mark.parametrize("kind", FAILURES)
def test_a_reward_that_fails_at_step_n_stops_naming_the_entry_the_setting_the_step_and_its_message(tiny_llama,
                                                                                                    tmp_path, kind):
    FAILURE.update(kind=kind, at=3)  # the third call: step 2, after two steps trained
    says = f"--model.online.reward_funcs entry 'test_faults.failing_reward' {SAYS[kind]}"
    steps = Steps()
    with pytest.raises(RewardError, match=says) as error:
        fit_online(tiny_llama, tmp_path, "failing_reward", steps)
    assert len(CALLS) == 3 and "Nothing was trained on these completions" in str(error.value)
    assert len(steps.weights) == 2  # steps 0 and 1 trained; step 2 stopped before its forward
    for name, value in steps.model.policy.state_dict().items():
        assert torch.equal(value, steps.weights[-1][name]), name


def test_a_reward_returning_a_float_tensor_trains_as_the_same_scores_in_a_list(tiny_llama, tmp_path):
    as_list, as_tensor = (fit_online(tiny_llama, tmp_path / reward, reward) for reward in ("length_reward",
                                                                                           "tensor_reward"))
    for name, value in as_list.weights[-1].items():
        assert torch.equal(as_tensor.weights[-1][name], value), name


def test_a_missing_reward_module_named_on_the_command_line_is_named_as_the_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--model.online.reward_funcs entry 'no_such_module.score': cannot import the "
                                         "module 'no_such_module'.*PYTHONPATH"):
        cli_main(["fit", "--config", str(ROOT / "configs" / "online_quickstart.yaml"),
                  "--model.online.reward_funcs", "no_such_module.score", "--trainer.max_steps", "1"])


def test_every_prompt_tied_logs_the_ties_and_scores_and_nothing_undefined(tiny_llama, tmp_path):
    steps = fit_online(tiny_llama, tmp_path, "constant_reward", logger=CSVLogger(tmp_path, name="logs"))
    rows = metrics_csv(tmp_path)
    train = [row for row in rows if any(name.startswith("train/") for name in row)]
    assert len(CALLS) == 3 and len(train) >= 3
    for row in rows:
        assert not [name for name, value in row.items() if value.lower() == "nan"], row
    by_step = {}
    for row in train:
        by_step.setdefault(int(row["step"]), {}).update(row)
    for step in range(3):  # every prompt tied: the share is 1, the score is the constant, no pair metric at all
        assert float(by_step[step]["train/objective/ties"]) == 1.0
        assert float(by_step[step]["train/objective/scores"]) == 1.0
        assert not [name for name in by_step[step] if name.startswith(tuple(f"train/{pair}" for pair in (
            "loss", "logps", "logits", "lengths", "rewards", "grad_norm", "learning_rate")))]
        assert "train/objective/scores_margin" not in by_step[step]
    for name, value in steps.model.policy.state_dict().items():  # nothing to train on: nothing trained
        assert torch.equal(value, steps.start[name]), name


def test_a_step_whose_prompts_all_tie_moves_no_weight(tiny_llama, tmp_path):
    # Step 1 ties everywhere. AdamW would still move every weight on its zero gradient (the moments of step 0),
    # so a step with no pair is skipped as a whole, and steps 0 and 2 train.
    steps = fit_online(tiny_llama, tmp_path, "tied_at_call_2_reward", logger=CSVLogger(tmp_path, name="logs"))
    first, tied, last = steps.weights
    assert all(torch.equal(tied[name], first[name]) for name in first)
    assert not all(torch.equal(first[name], steps.start[name]) for name in first)
    assert not all(torch.equal(last[name], tied[name]) for name in first)
    logged = {}
    for row in metrics_csv(tmp_path):
        logged.setdefault(int(row["step"]), {}).update(row)
    assert "train/loss" in logged[0] and "train/loss" in logged[2] and "train/loss" not in logged[1]
    assert float(logged[1]["train/objective/ties"]) == 1.0


def test_prompts_longer_than_max_length_are_cut_before_sampling_so_every_pair_keeps_a_response(tiny_llama, tmp_path):
    # Prompts of 21-30 characters, 22-31 tokens with BOS, against max_length 24: rule 3 keeps max_prompt_length 16
    # tokens of each (BOS, then its last 15 characters: keep_end) before the policy completes it, so a pair trains
    # on the prompt its completions were sampled from, and its responses keep 24 - 16 = 8 tokens at most, 1 at least.
    letters = "abcdefghijklmnopqrstuvwxyz"
    prompts = [f"say {(letters * 2)[i:i + 15 + i % 10]}{i % 10}?" for i in range(12)]
    assert {len(prompt) for prompt in prompts} == set(range(21, 31))
    cut = {tuple([1] + ids(prompt)[-15:]) for prompt in prompts}  # the oracle: rule 3's cut, written out
    tokenizer = ascii_tokenizer(add_bos=True)
    steps = fit_online(tiny_llama, tmp_path, "length_reward", dataset={"prompt": prompts}, max_length=24,
                       max_prompt_length=16, prefix_sharing=False, tokenizer=tokenizer)
    assert steps.data.summary["train"]["truncated"] == 12
    for (seen, _), batch in zip(CALLS, steps.batches):
        assert set(seen) <= set(prompts)  # the reward reads each prompt as written, uncut
        mask, labels = batch["attention_mask"].bool(), batch["labels"]
        for row in range(len(labels)):
            response = labels[row][labels[row] != -100].tolist()
            sequence = batch["input_ids"][row][mask[row]].tolist()
            assert 1 <= len(response) <= 8 and len(sequence) <= 24
            assert tuple(sequence[:len(sequence) - len(response)]) in cut  # trained on the prompt it sampled from
    for weights in steps.weights:
        assert all(torch.isfinite(value).all() for value in weights.values())


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
