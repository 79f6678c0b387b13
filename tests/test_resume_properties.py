"""Exact resume as a property: for any number of pairs, batch size, gradient accumulation and step at which a
checkpoint is saved (mid-epoch, at an epoch's last batch full or partial, in a later epoch), the resumed run's
optimizer steps see the same pairs, in the same order, as a run that was never stopped.

What the loader hands out is what matters, so the search runs a stand-in module that only records each
micro-batch's row ids (a few milliseconds a step) with the real data module and checkpoints; one end-to-end case
per kind of epoch end runs `DPOModule` and compares the weights too. Tiny models and rows from conftest.py.
"""

import lightning as L
import pytest
import torch
from conftest import data_module, quiet_trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from dpo_lightning import DPOModule


class RowIds(L.LightningModule):
    """Records (optimizer step, row ids) of every micro-batch; one weight, so that there is a step to take."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, batch["row_ids"].tolist()))
        return self.weight * batch["row_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: L.LightningModule, root, n: int, batch_size: int, accumulate: int, max_steps: int, stop: int = 0,
        ckpt_path=None) -> L.LightningModule:
    L.seed_everything(0)
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=stop, save_top_k=-1)] if stop else []
    quiet_trainer(root, max_steps=max_steps, accumulate_grad_batches=accumulate, callbacks=callbacks).fit(
        module, data_module(n, eval_n=0, batch_size=batch_size), ckpt_path=ckpt_path)
    return module


def by_step(seen: list[tuple[int, list[int]]]) -> list[list[list[int]]]:
    """The micro-batches' row ids grouped by the optimizer step they belong to, in step order."""
    steps: dict[int, list[list[int]]] = {}
    for step, rows in seen:
        steps.setdefault(step, []).append(rows)
    assert sorted(steps) == list(range(len(steps)))  # no step without a micro-batch, none out of order
    return [steps[step] for step in sorted(steps)]


def steps_per_epoch(n: int, batch_size: int, accumulate: int) -> int:
    batches = -(-n // batch_size)  # the last batch may be partial
    return -(-batches // accumulate)  # Lightning steps at the epoch's end whatever the accumulation count


@st.composite
def runs(draw):
    """(pairs, batch size, accumulation, stop step, steps after it): stops anywhere in the first three epochs."""
    n, batch_size, accumulate = draw(st.integers(2, 11)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    per_epoch = steps_per_epoch(n, batch_size, accumulate)
    return n, batch_size, accumulate, draw(st.integers(1, 3 * per_epoch)), draw(st.integers(1, per_epoch + 1))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=runs())
def test_a_run_resumed_at_any_step_sees_each_steps_pairs_as_the_unbroken_run(run, tmp_path_factory):
    n, batch_size, accumulate, stop, more = run
    root = tmp_path_factory.mktemp("run")
    straight = by_step(fit(RowIds(), root / "straight", n, batch_size, accumulate, stop + more).seen)
    first = by_step(fit(RowIds(), root / "first", n, batch_size, accumulate, stop, stop=stop).seen)
    (checkpoint,) = (root / "first" / "ckpt").glob("*.ckpt")
    resumed = fit(RowIds(), root / "second", n, batch_size, accumulate, stop + more, ckpt_path=checkpoint)
    assert first == straight[:stop]
    assert [rows for _, rows in resumed.seen] == [rows for step in straight[stop:] for rows in step]
    per_epoch = steps_per_epoch(n, batch_size, accumulate)
    assert len(straight) < per_epoch or sorted(sum(sum(straight[:per_epoch], []), [])) == list(range(n))  # once each


@pytest.mark.parametrize("n", [20, 22], ids=["full-last-batch", "partial-last-batch"])
def test_dpo_resumed_at_an_epochs_last_batch_reaches_the_unbroken_runs_weights(tiny_llama, tmp_path, n):
    # Batches of 4, two a step: 20 pairs end epoch 0 with a full batch alone in step 3, 22 with a batch of 2.
    def dpo():
        return DPOModule(tiny_llama, learning_rate=1e-2, warmup_steps=2)

    straight = fit(dpo(), tmp_path / "straight", n, 4, 2, 5)
    fit(dpo(), tmp_path / "first", n, 4, 2, 3, stop=3)
    resumed = fit(dpo(), tmp_path / "second", n, 4, 2, 5, ckpt_path=tmp_path / "first" / "ckpt" / "epoch=0-step=3.ckpt")
    for name, weight in straight.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[name], weight)
