"""`ValidationSummary`: validate once before training, log it as step 0, and end each run by saying what it made.

At the end of fit it prints every validation, the headline before and after (reward accuracy, margin, the greedy
reward where `GreedyReward` is set), what the run wrote (its version folder, metrics.csv, the best and last
checkpoints, the Hugging Face export) and the commands that come next (`plot`, `export`, `validate`). A `validate`
names the folder its metrics went to.
"""

import os
import shlex
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

# The headline: each validation metric read before and after training, and its name in the report.
HEADLINE = (("rewards/accuracies", "reward accuracy"), ("rewards/margins", "margin"),
            ("reward/greedy", "greedy reward (solve rate)"))


class ValidationSummary(L.Callback):
    """Validate once before training, log it as step 0, and end each run by saying what it made (the module doc).

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
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After every callback's on_fit_end, so that the export and the last checkpoint are written.
        if stage == "fit":
            print("\n".join(["", self.table(), *headline(self.history, trainer.global_step),
                             *made(trainer)]) if self.history else
                  "\n".join(made(trainer)))
        elif stage == "validate" and (log := csv_log(trainer)) is not None:
            print(f"[dpo_lightning] validation metrics: {shown(log)}")

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



def headline(history: list[dict[str, float]], steps: int) -> list[str]:
    """The headline metrics at the first and the last validation, one line; a second when the run trained on
    after its last validation (`steps`, its optimizer steps), so that no one reads those numbers as the end's."""
    first, last = history[0], history[-1]
    parts = [f"{label} {first[f'val/{name}']:.4f} -> {last[f'val/{name}']:.4f}" for name, label in HEADLINE
             if f"val/{name}" in first and f"val/{name}" in last]
    if not parts:
        return []
    after = [f"[dpo_lightning] the run trained to step {steps}, after its last validation (step {last['step']}): "
             "`dpo-lightning validate` (below) measures the final weights; a val_check_interval that divides "
             "max_steps validates at the end"] if steps > last["step"] else []
    return [f"[dpo_lightning] step {first['step']} -> {last['step']}: {', '.join(parts)}", *after]


def csv_log(trainer: L.Trainer) -> Path | None:
    """The run's metrics.csv (its CSVLogger's), if written."""
    logger = next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
    path = Path(logger.log_dir) / "metrics.csv" if logger is not None else None
    return path if path is not None and path.is_file() else None


def made(trainer: L.Trainer) -> list[str]:
    """What the run wrote, and the commands that read it next: lines to print."""
    log, folder = csv_log(trainer), trainer.log_dir
    files = [(log, "the log: every metric, at the steps logged")] if log else []
    for callback in trainer.checkpoint_callbacks:
        best, last = callback.best_model_path, callback.last_model_path
        if best and callback.monitor and callback.best_model_score is not None:
            files.append((best, f"the best checkpoint: {callback.monitor} {callback.best_model_score:.4f}"))
        if last or best and not callback.monitor:  # without save_last, the newest is the last validation's
            files.append((last, "the last checkpoint") if last else (best, "the newest checkpoint"))
    files += [(callback.exported, "the policy, tokenizer and model card (from_pretrained)")
              for callback in trainer.callbacks if getattr(callback, "exported", None)]
    files = [(path, what) for path, what in files if os.path.exists(path)]
    if not files:
        return []
    lines = [f"[dpo_lightning] this run wrote, in {shown(folder)}:" if folder else "[dpo_lightning] this run wrote:"]
    lines += [f"  {shown(path, folder):<40} {what}" for path, what in files]
    checkpoint = ([path for path, what in files if "checkpoint" in what] or [None])[-1]  # the last, else the best
    config = Path(folder or "", "config.yaml")  # LightningCLI's copy of the run's config
    commands = [f"dpo-lightning plot {quoted(folder)}" if log and folder else "",
                f"dpo-lightning export --ckpt_path {quoted(checkpoint)} --output_dir my_model" if checkpoint else "",
                f"dpo-lightning validate --config {quoted(config)} --ckpt_path {quoted(checkpoint)}"
                if checkpoint and folder and config.is_file() else ""]
    return lines + ["[dpo_lightning] next:"] + [f"  {c}" for c in commands if c] if any(commands) else lines


def shown(path: str | os.PathLike, folder: str | None = None) -> str:
    """`path` relative to `folder` (inside it), else to the working directory (below it), else absolute."""
    path = os.path.abspath(path)
    for base in (folder, os.getcwd()):
        if base and path.startswith(os.path.abspath(base) + os.sep):
            return os.path.relpath(path, base) + ("/" if os.path.isdir(path) else "")
    return path + ("/" if os.path.isdir(path) else "")


def quoted(path: str | os.PathLike) -> str:
    return shlex.quote(shown(path).rstrip("/"))
