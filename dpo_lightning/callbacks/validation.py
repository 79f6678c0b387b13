"""`ValidationSummary`: validate once before training, log it as step 0, and print every validation at the end of fit."""

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class ValidationSummary(L.Callback):
    """Validate once before training, log it as step 0, and print every validation at the end of fit.

    Lightning's sanity check runs validation before the first step but throws its results away; with
    `num_sanity_val_steps=-1` it covers the whole split, and this callback keeps it as the step-0 point
    of the curves (where policy == reference: loss ln 2, accuracy 0.5). Its history (every `val/`
    metric of every validation) is saved in checkpoints, where `dpo-lightning export` reads the last
    validation for the model card.

    Args:
        metrics: validation metrics to print, without the `val/` prefix.
    """

    def __init__(self, metrics: tuple[str, ...] = ("loss", "rewards/accuracies", "rewards/margins",
                                                   "reward/greedy")):
        self.metrics = metrics
        self.history: list[dict[str, float]] = []

    def _record(self, trainer: L.Trainer, step: int) -> None:
        values = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            self.history.append({"step": step, **values})

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, 0)
        if self.history and trainer.logger is not None:
            trainer.logger.log_metrics({k: v for k, v in self.history[-1].items() if k != "step"}, step=0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, trainer.global_step)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history:
            print("\n" + self.table())

    def table(self) -> str:
        """A row per validation: `step` and `metrics`, each column as wide as its name or values (80 columns)."""
        names = [m for m in self.metrics if f"val/{m}" in self.history[-1]]
        columns = [("step", [str(row["step"]) for row in self.history])]
        columns += [(name, [f"{row[f'val/{name}']:.4f}" if f"val/{name}" in row else "" for row in self.history])
                    for name in names]
        widths = [max(len(name), *map(len, cells)) for name, cells in columns]
        lines = ["validation" + "".join(f"  {name:>{w}}" for (name, _), w in zip(columns, widths))]
        for i in range(len(self.history)):
            lines.append(" " * 10 + "".join(f"  {cells[i]:>{w}}" for (_, cells), w in zip(columns, widths)))
        return "\n".join(lines)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])


def last_validation(trainer: L.Trainer) -> tuple[int | None, dict[str, float]]:
    """(step, `val/` metrics) of the run's last validation; the step is known when `ValidationSummary` runs."""
    for callback in trainer.callbacks:
        if isinstance(callback, ValidationSummary) and callback.history:
            row = callback.history[-1]
            return row["step"], {k: v for k, v in row.items() if k != "step"}
    return None, {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

