"""Exact resume: a run stopped mid-epoch and resumed from its checkpoint trains on the same batches, in
the same order, and ends at the same weights as a run that was never stopped.

Tiny Llama from conftest.py, 24 pairs in batches of 4: 6 steps an epoch, 10 steps cross an epoch boundary.
"""

import lightning as L
import pytest
import torch
from conftest import ascii_tokenizer, rows
from lightning.pytorch.callbacks import ModelCheckpoint

from dpo_lightning import DPOModule, PreferenceDataModule


class RecordBatches(L.Callback):
    """The row ids of every training batch: which pairs were seen, in which order."""

    def __init__(self):
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(batch["row_ids"].tolist())


def fit(tiny_llama, root, max_steps, ckpt_path=None, callbacks=(), dataset=None):
    L.seed_everything(0)
    record = RecordBatches()
    model = DPOModule(tiny_llama, learning_rate=1e-2, warmup_steps=3)
    data = PreferenceDataModule(dataset=dataset or rows(24), tokenizer=ascii_tokenizer(), max_length=48,
                                max_prompt_length=24, batch_size=4)
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record, *callbacks])
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, record.seen


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
