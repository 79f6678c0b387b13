"""Exact resume: a run stopped mid-epoch, or at an epoch's last batch, and resumed from its checkpoint trains on
the same batches, in the same order, and ends at the same weights as a run that was never stopped; online, it
also samples the same completions and logs the same metrics.

Tiny Llama from conftest.py, 24 pairs in batches of 4: 6 steps an epoch, 10 steps cross an epoch boundary;
20 pairs (or prompts) with 2 micro-batches a step: 3 steps an epoch, the last of a single micro-batch.
"""

import lightning as L
import pytest
import torch
from conftest import RecordBatches, data_module, quiet_trainer, rows
from lightning.pytorch.callbacks import ModelCheckpoint

from dpo_lightning import DPOModule
from dpo_lightning.data.loaders import EvalSampler


def fit(tiny_llama, root, max_steps, ckpt_path=None, callbacks=(), dataset=None, n=24, **trainer):
    L.seed_everything(0)
    record = RecordBatches()
    model = DPOModule(tiny_llama, learning_rate=1e-2, warmup_steps=3)
    data = data_module(n, eval_n=0, dataset=dataset)
    quiet_trainer(root, max_steps=max_steps, callbacks=[record, *callbacks], **trainer).fit(model, data,
                                                                                          ckpt_path=ckpt_path)
    return model, record.batches


def test_resumed_mid_epoch_run_sees_each_batch_once_and_reaches_the_same_weights(tiny_llama, tmp_path):
    straight, seen_straight = fit(tiny_llama, tmp_path / "straight", 10)
    every_4 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _, seen_before = fit(tiny_llama, tmp_path / "first", 4, callbacks=[every_4])
    resumed, seen_after = fit(tiny_llama, tmp_path / "second", 10, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert seen_before + seen_after == seen_straight  # nothing skipped, nothing twice, same order
    assert sorted(sum(seen_straight[:6], [])) == list(range(24))  # epoch 1: every pair once
    for name, weight in straight.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[name], weight)

    # The same checkpoint on other pairs (one response changed) is refused before any step.
    other = rows(24)
    other["chosen"][5] += " changed"
    with pytest.raises(ValueError, match="the checkpoint was trained on other data: its train split had 24 pairs"):
        fit(tiny_llama, tmp_path / "third", 10, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt", dataset=other)


def test_a_checkpoint_at_an_epochs_last_batch_resumes_with_the_next_epoch(tiny_llama, tmp_path):
    # 20 pairs in batches of 4, two micro-batches a step: 5 batches an epoch, the last a step of its own, so the
    # step-3 checkpoint is saved at epoch 0's last batch. Lightning resumes it at epoch 1, which must be epoch 1's
    # order from its start (the saved position was epoch 0's end), not an empty epoch and then epoch 2.
    straight, seen_straight = fit(tiny_llama, tmp_path / "straight", 5, n=20, accumulate_grad_batches=2)
    every_3 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _, seen_before = fit(tiny_llama, tmp_path / "first", 3, callbacks=[every_3], n=20, accumulate_grad_batches=2)
    resumed, seen_after = fit(tiny_llama, tmp_path / "second", 5, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt",
                              n=20, accumulate_grad_batches=2)
    assert len(seen_before) == 5 and sorted(sum(seen_before, [])) == list(range(20))  # the checkpoint ends epoch 0
    assert seen_before + seen_after == seen_straight
    for name, weight in straight.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[name], weight)


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(len(c)) for c in completions]


class StepMetrics(L.Callback):
    """The logged loss and mean reward of each optimizer step, by step."""

    def __init__(self):
        self.logged = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.is_last_batch:
            self.logged[trainer.global_step - 1] = {name: float(trainer.callback_metrics[name])
                                                    for name in ("train/loss", "train/objective/scores")}


def fit_online(tiny_llama, root, max_steps, ckpt_path=None, callbacks=()):
    # 20 prompts in batches of 4, 2 micro-batches a step, 3 completions each: 5 batches an epoch, 3 steps.
    L.seed_everything(0)
    record, metrics = RecordBatches(), StepMetrics()
    model = DPOModule(tiny_llama, learning_rate=1e-2, online={"reward_funcs": "test_resume.length_reward",
                                                              "num_samples": 3, "max_new_tokens": 6})
    quiet_trainer(root, max_steps=max_steps, callbacks=[record, metrics, *callbacks], accumulate_grad_batches=2,
                  log_every_n_steps=1).fit(model, data_module(20, eval_n=0, max_length=32, max_prompt_length=16),
                                           ckpt_path=ckpt_path)
    return model, record.batches, metrics.logged


@pytest.mark.parametrize("at", [2, 3], ids=["mid-epoch", "epoch-end"])
def test_online_resume_with_accumulation_samples_trains_and_logs_as_the_unbroken_run(tiny_llama, tmp_path, at):
    straight, seen_straight, logged_straight = fit_online(tiny_llama, tmp_path / "straight", 5)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=at, save_top_k=-1)
    _, seen_before, _ = fit_online(tiny_llama, tmp_path / "first", at, callbacks=[every])
    resumed, seen_after, logged_after = fit_online(tiny_llama, tmp_path / "second", 5,
                                                   ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={at}.ckpt")
    assert seen_before + seen_after == seen_straight
    assert sorted(logged_after) == list(range(at, 5))
    for step, values in logged_after.items():  # the same completions, scores and loss, step by step
        assert values == pytest.approx(logged_straight[step], rel=1e-6, abs=1e-7), step
    for name, weight in straight.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[name], weight)


@pytest.mark.parametrize("n_pairs, world_size", [(7, 3), (8, 2), (5, 5), (9, 4)])
def test_eval_sampler_gives_every_pair_to_exactly_one_rank(n_pairs, world_size):
    # Rank r takes pairs r, r + world_size, ...: no padding, so shares differ by at most one pair.
    shares = [list(EvalSampler(list(range(n_pairs)), world_size, rank)) for rank in range(world_size)]
    assert sorted(sum(shares, [])) == list(range(n_pairs))
    assert [len(share) for share in shares] == [len(range(r, n_pairs, world_size)) for r in range(world_size)]
    assert [len(EvalSampler(list(range(n_pairs)), world_size, r)) for r in range(world_size)] == [
        len(share) for share in shares]


def test_eval_sampler_refuses_fewer_pairs_than_ranks():
    with pytest.raises(ValueError, match="the validation split has 2 pairs for 3 ranks: .* use fewer devices"):
        EvalSampler([0, 1], 3, 0)


def train_order(tmp_path, monkeypatch, global_seed, **data):
    """The first epoch's batches (row ids) and the rows held out, for a run seeded with `global_seed`
    (seed_everything; None: never called)."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # restored after the test: seed_everything sets it
    if global_seed is not None:
        L.seed_everything(global_seed)
    dm = data_module(24, eval_n=0, **data)
    dm.trainer = quiet_trainer(tmp_path)
    dm.setup("fit")
    held_out = sorted(row["prompt_input_ids"] for row in dm.val_data) if dm.val_data is not None else []
    return [batch["row_ids"].tolist() for batch in dm.train_dataloader()], held_out


def test_the_global_seed_decides_the_data_order_unless_data_seed_is_given(tmp_path, monkeypatch):
    # TRL's data_seed defaults to its seed, and a Lightning user's seed_everything seeds everything: a run seeded 1
    # and one seeded 2 must not train on the same order, nor hold out the same rows.
    one, two = (train_order(tmp_path, monkeypatch, seed, eval_fraction=0.25) for seed in (1, 2))
    assert one[0] != two[0] and one[1] != two[1]
    assert one == train_order(tmp_path, monkeypatch, 1, eval_fraction=0.25)  # and the same seed, the same order
    # data.seed, where given, decides alone; seed_everything(7) without it is data.seed 7.
    seven = train_order(tmp_path, monkeypatch, 1, seed=7)
    assert seven == train_order(tmp_path, monkeypatch, 2, seed=7) == train_order(tmp_path, monkeypatch, 7)
    # Neither given: a fixed order (the CLI's seed_everything default, 42), the same in every process.
    assert train_order(tmp_path, monkeypatch, None) == train_order(tmp_path, monkeypatch, 42)


def test_a_resume_under_another_global_seed_is_refused_not_reordered(tiny_llama, tmp_path, monkeypatch):
    # The order of the epoch a checkpoint stopped in comes from the run's seed: resumed under another, the pairs
    # it had left are not the ones it would train, so the resume stops and says which seed to give.
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    every_4 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(tiny_llama, tmp_path / "first", 4, callbacks=[every_4])  # seed_everything(0)
    L.seed_everything(5)
    model, data = DPOModule(tiny_llama), data_module(24, eval_n=0)
    with pytest.raises(ValueError, match="drawn from seed 0, this run's from seed 5.*--data.seed 0"):
        quiet_trainer(tmp_path / "second", max_steps=10).fit(model, data,
                                                              ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
