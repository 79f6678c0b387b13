"""Exact resume: a run stopped mid-epoch and resumed from its checkpoint trains on the same batches, in
the same order, and ends at the same weights as a run that was never stopped.

Tiny Llama from conftest.py, 24 pairs in batches of 4: 6 steps an epoch, 10 steps cross an epoch boundary.
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
