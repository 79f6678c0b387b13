"""What a run prints around its training: a progress bar and a model summary that read cleanly at 80 columns.

Lightning's defaults, read by a newcomer on the quickstart, look broken: a run bounded by `max_steps`
shows `Epoch 4/-2` (max_epochs is -1) and `v_num: 0.000` (the logger's version as a float), the metrics
(`train/rewards/accuracies: 0.969 ...`) wrap over six lines of an 80-column terminal with their names cut,
and the model summary has a FLOPs column of zeros and `Total FLOPs: 0` (it counts FLOPs only for an
`example_input_array`). `DPOModule.configure_callbacks` returns `replacements` for Lightning's default bar and
summary in the Trainer (exactly those types; a bar or summary of your own is kept), so the CLI and a
notebook's `L.Trainer(...)` print the same. The third-party lines filtered out are in `utils/quiet.py`.
"""

import dataclasses

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelSummary, RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count

# Progress-bar names, shortened after the stage: `train/rewards/accuracies` shows as `acc` on the `train` line.
SHORT_NAMES = {"rewards/accuracies": "acc", "rewards/margins": "margin"}


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps out of `max_steps` when steps bound the run.

    One bar for the whole run (`step 120/300`), instead of one per epoch labelled `Epoch 4/-2`; with
    `max_epochs` set it stays Lightning's `Epoch e/E` bar. The metrics come one line per stage, under short
    names (`SHORT_NAMES`), so the bar fits 80 columns:

        step ━━━━━━━━━━━━ 120/300 0:00:12 • 0:00:20 9.81it/s train: loss 0.642 acc 0.969
                                                               val: loss 0.628 acc 0.852

    The logger version (`v_num`) is not shown.
    """

    def __init__(self, refresh_rate: int = 100, leave: bool = False, theme: RichProgressBarTheme | None = None,
                 console_kwargs: dict | None = None):
        theme = dataclasses.replace(theme or RichProgressBarTheme(), metrics_text_delimiter="\n")  # a line per stage
        super().__init__(refresh_rate, leave, theme, console_kwargs)

    def configure_columns(self, trainer: L.Trainer) -> list:
        from rich.table import Column  # here: rich is optional for Lightning, and module.py imports this file

        columns = super().configure_columns(trainer)
        for column in columns[2:]:  # counts, times, speed: never wrapped; the bar (columns[1]) shrinks instead
            column._table_column = Column(no_wrap=True)  # Lightning's columns take no table_column argument
        return columns

    def _init_progress(self, trainer: L.Trainer) -> None:
        from rich.table import Column

        super()._init_progress(trainer)
        if self._metric_component is not None:  # the metrics' lines are never wrapped either
            self._metric_component._table_column = Column(no_wrap=True)

    def _by_steps(self) -> bool:
        return self.trainer.max_steps > 0 and self.trainer.max_epochs in (None, -1)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._by_steps():
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(trainer.max_steps, "step")
            self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed run starts further on

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Stopped here, not at teardown: what the run ends with (the export's line, `ValidationSummary`'s report)
        # prints below the bar's last state; printed while the bar is live, it would show above it.
        self._stop_progress()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "validate":  # so for `validate`: its results table and folder print below the bar
            self._stop_progress()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.is_enabled and self.train_progress_bar_id is None:  # resumed mid-epoch
            self.on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        """`{"train": "loss 0.642 acc 0.969", "val": ...}`: one entry (a line of the bar) per stage prefix."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        lines: dict[str, list[str]] = {}
        for name, value in metrics.items():
            text = value if isinstance(value, str) else f"{value:{self.theme.metrics_format}}"
            stage, _, metric = name.partition("/")
            lines.setdefault(stage, []).append(f"{SHORT_NAMES.get(metric, metric)} {text}" if metric else text)
        return {stage: " ".join(parts) for stage, parts in lines.items()}


class PlainSummary(RichModelSummary):
    """Lightning's model summary as plain text, without the FLOPs column and total, which are 0 unless the
    module sets an `example_input_array` (a DPO batch has none that means anything). A module whose
    parameters are all frozen (the reference) shows mode `frozen`: Lightning's `train` would read as trained.

    A `RichModelSummary` in type only (drawn without rich), so that it replaces either of Lightning's
    defaults when returned by `configure_callbacks`.
    """

    def __init__(self, max_depth: int = 1) -> None:
        ModelSummary.__init__(self, max_depth)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        summary = self._summary(trainer, pl_module)
        columns = dict(summary._get_summary_data())
        columns.pop("FLOPs", None)
        columns["Mode"] = ["frozen" if frozen(pl_module, name) else mode
                           for name, mode in zip(columns["Name"], columns["Mode"])]
        widths = [max(len(name), *map(len, values)) for name, values in columns.items()]
        lines = [" | ".join(f"{name:<{w}}" for name, w in zip(columns, widths))]
        for row in zip(*columns.values()):
            lines.append(" | ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)))
        trainable, total = summary.trainable_parameters, summary.total_parameters
        lines.append(f"params: {get_human_readable_count(trainable)} trainable, "
                     f"{get_human_readable_count(total - trainable)} frozen ({summary.model_size:.3f} MB in all)")
        rank_zero_info("\n".join(lines))


def frozen(pl_module: L.LightningModule, name: str) -> bool:
    """Whether the summary row `name` is a submodule with parameters, none of which trains."""
    try:
        params = list(pl_module.get_submodule(name).parameters())
    except AttributeError:  # Lightning's row of parameters outside any submodule
        return False
    return bool(params) and not any(p.requires_grad for p in params)


def replacements(callbacks: list[Callback]) -> list[Callback]:
    """Ours for each of Lightning's default bar and summary (exactly those types) in `callbacks`, same settings."""
    swapped = []
    for callback in callbacks:
        if type(callback) is RichProgressBar:
            swapped.append(StepProgressBar(callback.refresh_rate, callback._leave, callback.theme,
                                           callback._console_kwargs))
        elif type(callback) in (ModelSummary, RichModelSummary):
            swapped.append(PlainSummary(max_depth=callback._max_depth))
    return swapped
