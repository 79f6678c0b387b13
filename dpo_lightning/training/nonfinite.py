"""What a NaN or infinite loss does, in training (`--model.nonfinite_loss`) and in validation.

Training: the loss never reaches the weights. `finite_on_every_rank` stops the run naming the step and the batch's
rows (`stop`), or says the optimizer step is skipped (`skip`; `DPOModule` then drops its gradients); every rank
decides alike, or DDP's gradient all-reduce would hang.
Validation: nothing to protect, but nothing to hide either. A pair's NaN stays in every metric its value enters
(`metrics.make_metrics`: torchmetrics would drop it, and the split's mean would silently cover the other pairs
only), and `NonFiniteRows` names the rows of those pairs once per validation run, on each rank its own.
"""

import warnings

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


def finite_on_every_rank(loss: Tensor, batch: dict[str, Tensor], trainer: L.Trainer | None, mode: str,
                         warn: bool) -> bool:
    """Whether the training `loss` is finite on every rank; if not, raise naming the step and the batch's rows
    (`mode` "stop"), or (`mode` "skip") return False, warning first where `warn` (once per skipped step)."""
    bad = (~torch.isfinite(loss.detach())).float()
    if trainer is not None:
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
    if bad.item() == 0:
        return True
    rows = batch["row_ids"].tolist() if "row_ids" in batch else "unknown"
    where = (f"step {trainer.global_step}, batch {trainer.fit_loop.epoch_loop.batch_idx} of epoch "
             f"{trainer.current_epoch}" if trainer is not None else "step 0, batch ?")
    message = f"non-finite training loss ({loss.item()} on this rank) at {where}, rows {rows}"
    if mode == "stop":
        raise FloatingPointError(f"{message}. The weights were not updated. Check these rows with "
                                 "`dpo-lightning inspect-data`; try a lower learning rate, bf16 instead of "
                                 "fp16, or --model.nonfinite_loss skip")
    if warn:
        rank_zero_warn(f"{message}: this optimizer step is skipped on every rank (--model.nonfinite_loss skip)")
    return False


class NonFiniteRows:
    """The validation rows whose pair has a non-finite loss or log-prob, named in one warning per validation run."""

    def __init__(self):
        self.rows: list[int | str] = []

    def update(self, pair_losses: Tensor, policy_logps: Tensor, batch: dict[str, Tensor]) -> None:
        """Note the rows of one batch's pairs (B,) whose loss, chosen or rejected log-prob (2B,) is not finite."""
        chosen, rejected = policy_logps.detach().chunk(2)
        bad = ~(pair_losses.detach().isfinite() & chosen.isfinite() & rejected.isfinite())
        if bad.any():
            rows = batch["row_ids"][bad.to(batch["row_ids"].device)].tolist() if "row_ids" in batch else None
            self.rows.extend(rows or ["unknown"] * int(bad.sum()))

    def warn(self, rank: int, world_size: int) -> None:
        """Warn about the rows noted since the last call (this rank's: each validation pair is on one rank only)."""
        if self.rows:
            where = f" on rank {rank}" if world_size > 1 else ""
            warnings.warn(f"validation{where}: {len(self.rows)} pair(s) with a non-finite loss or log-prob, rows "
                          f"{self.rows}: val/loss and the val/ means their non-finite values enter are NaN. Check these rows with `dpo-lightning inspect-data`; an attention kernel or "
                          "fp16 that overflows can cause it too")
        self.rows = []
