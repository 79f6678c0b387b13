"""Which pairs each rank sees: a training DataLoader whose position is saved in every checkpoint (exact
mid-epoch resume), and a validation sampler that gives every pair to exactly one rank.

A resumed run must train on the next unseen batch, in the order an uninterrupted run would have used,
so that it ends at the same weights. The shuffle order here is a function of (seed, epoch) alone, and
the checkpoint records the epoch and how many pairs of its global order were trained on (so any number
of ranks resumes at the same pair); Lightning calls the
loader's `state_dict`/`load_state_dict` itself. Under DDP each rank takes every `world_size`-th index
of the same permutation, as `DistributedSampler` does: the permutation is filled up with its first pairs
to a multiple of `world_size`, so when the last global batch would not fill every rank, the ranks short
of pairs train again on the epoch's first ones (one process trains a smaller last batch instead).

The seed is `data_seed`'s: `--data.seed`, else the global seed (`seed_everything`), as TRL's `data_seed` defaults
to its `seed`. A checkpoint records it; resuming with another one is refused, since the order would differ.

Validation must not repeat pairs: its metrics are exact means over the split. Lightning would wrap the
val loader in a padding `DistributedSampler`; `EvalSampler` is one that does not pad, so ranks may get
one pair (and one batch) more than others. That is safe for DDP in evaluation: its forward syncs buffers
only on the first no-grad batch, and the metrics sync sums of fixed shape (training/metrics.py).
"""

import os

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, DistributedSampler

# The data order's seed where neither data.seed nor seed_everything gives one (the CLI's seed_everything default).
FALLBACK_SEED = 42


def data_seed(seed: int | None) -> int:
    """The seed of the training order, the `eval_fraction` split and the stream shuffle: `seed` (data.seed), else
    the global seed `seed_everything` set (Lightning's PL_GLOBAL_SEED, which it hands to every DDP rank), else 42."""
    return seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", FALLBACK_SEED))


class EpochSampler(DistributedSampler):
    """This rank's share of a permutation drawn from (seed, epoch) alone, minus the batches already done.

    A `DistributedSampler`, so Lightning keeps it under DDP instead of wrapping it; the epoch comes from
    the Trainer's progress rather than `set_epoch`, whose count is off by one after a restore.
    """

    def __init__(self, data: Dataset, loader: "ResumableLoader", world_size: int, rank: int, seed: int):
        super().__init__(data, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.loader = loader

    def __iter__(self):
        epoch, pairs_done = self.loader.position()
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        order += order[: self.total_size - len(order)]  # pad to equal shares, as DistributedSampler does
        # Global batch k holds order[k * B * W: (k + 1) * B * W], rank r every W-th pair of it from r.
        return iter(order[pairs_done:][self.rank::self.num_replicas])


class ResumableLoader(DataLoader):
    """A shuffling DataLoader whose position Lightning saves in checkpoints, for exact mid-epoch resume.

    The checkpoint records the epoch and how many of its pairs were trained on, in the epoch's global order
    (from the Trainer's own progress, which unlike a count of batches handed out is not ahead by prefetched
    batches); the first epoch after a restore skips exactly those, on any number of ranks. Resumed on
    another number of ranks, the Trainer's count of this epoch's batches is converted to the new batches
    too. Lightning calls `state_dict`/`load_state_dict`.
    """

    def __init__(self, data: Dataset, batch_size: int, seed: int, trainer: L.Trainer, **kwargs):
        self.trainer, self.restored = trainer, None
        sampler = EpochSampler(data, self, trainer.world_size, trainer.global_rank, seed)
        super().__init__(data, batch_size=batch_size, sampler=sampler, **kwargs)

    def position(self) -> tuple[int, int]:
        """(epoch, pairs of its global order already trained on) for the iteration that is starting."""
        restored, self.restored, epoch = self.restored, None, self.trainer.current_epoch
        # A checkpoint saved at an epoch's last batch resumes at the next epoch (Lightning counts that one done):
        # the saved position belongs to the finished epoch, not to this one.
        return restored if restored is not None and restored[0] == epoch else (epoch, 0)

    def state_dict(self) -> dict[str, int]:
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches_done": batches,
                "pairs_done": batches * self.batch_size * self.trainer.world_size, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Checkpoints from before `pairs_done` were resumed on their own number of ranks.
        pairs = state.get("pairs_done", state["batches_done"] * self.batch_size * self.trainer.world_size)
        per_batch = self.batch_size * self.trainer.world_size
        if state.get("seed", self.sampler.seed) != self.sampler.seed:  # checkpoints before the seed was saved: as given
            raise ValueError(f"the checkpoint's data order was drawn from seed {state['seed']}, this run's from seed "
                             f"{self.sampler.seed} (data.seed, else seed_everything): resume with --data.seed "
                             f"{state['seed']} (or --seed_everything {state['seed']}) to train on the pairs it had left")
        if pairs % per_batch:
            raise ValueError(f"the checkpoint stopped {pairs} pairs into epoch {state['epoch']}, not a whole number "
                             f"of this run's global batches ({self.batch_size} pairs x {self.trainer.world_size} "
                             "ranks): resume with a number of ranks (or --data.batch_size) that divides it")
        self.restored = (state["epoch"], pairs)
        # The Trainer counts this epoch's batches per rank: on another number of ranks, in the new batches.
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        shift = pairs // per_batch - state["batches_done"]
        for counter in ("ready", "started", "processed", "completed"):
            setattr(progress, counter, getattr(progress, counter) + shift)


class EvalSampler(DistributedSampler):
    """This rank's share of an evaluation split, in order, each pair on exactly one rank (no padding).

    A `DistributedSampler`, so Lightning keeps it instead of wrapping the loader in a padding one.
    """

    def __init__(self, data: Dataset, world_size: int, rank: int):
        if len(data) < world_size:
            raise ValueError(f"the validation split has {len(data)} pairs for {world_size} ranks: every rank needs "
                             "one (DDP's first forward is a collective); add pairs or use fewer devices")
        super().__init__(data, num_replicas=world_size, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(data), world_size))
        self.total_size = len(data)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))
