"""What a run prints around its training: a progress bar, a model summary and the warnings worth reading.

Lightning's defaults, read by a newcomer on the quickstart, look broken: a run bounded by `max_steps`
shows `Epoch 4/-2` (max_epochs is -1) and `v_num: 0.000` (the logger's version as a float), the model
summary a FLOPs column of zeros and `Total FLOPs: 0` (it counts FLOPs only for an `example_input_array`),
and every run warns about calls inside Lightning, peft and transformers that the user cannot change.
`tidy_trainer` swaps Lightning's default bar and summary for the two classes here; `quiet_known_warnings`
filters those third-party warnings by their exact text, and nothing else. The CLI applies both.
"""

import logging
import warnings

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count

# (category, message regex): warnings raised inside other packages by calls we cannot change.
THIRD_PARTY_WARNINGS = (
    # Lightning's own CombinedLoader flattens the dataloaders with torch's deprecated LeafSpec (torch 2.10+).
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # peft's PeftModel.__init__ reads transformers' deprecated alias (transformers 5) when wrapping a model.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


class _NoTips(logging.Filter):
    """Drop Lightning's advertisements for its cloud products (`💡 Tip: ... litlogger / litmodels`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_warnings() -> None:
    """Filter `THIRD_PARTY_WARNINGS` and Lightning's tips; any other warning still shows."""
    for category, message in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info writes
    if not any(isinstance(f, _NoTips) for f in logger.filters):
        logger.addFilter(_NoTips())


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps out of `max_steps` when steps bound the run.

    One bar for the whole run (`step 120/300`), instead of one per epoch labelled `Epoch 4/-2`; with
    `max_epochs` set it stays Lightning's `Epoch e/E` bar. The logger version (`v_num`) is not shown.
    """

    def _by_steps(self) -> bool:
        return self.trainer.max_steps > 0 and self.trainer.max_epochs in (None, -1)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._by_steps():
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(trainer.max_steps, "step")
            self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed run starts further on

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.is_enabled and self.train_progress_bar_id is None:  # resumed mid-epoch
            self.on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class PlainSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column and total, which are 0 unless the module sets an
    `example_input_array` (a DPO batch has none that means anything)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **kwargs) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        widths = [max(len(name), *map(len, values)) for name, values in columns]
        lines = [" | ".join(f"{name:<{w}}" for (name, _), w in zip(columns, widths))]
        for row in zip(*(values for _, values in columns)):
            lines.append(" | ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)))
        frozen = total_parameters - trainable_parameters
        lines.append(f"params: {get_human_readable_count(trainable_parameters)} trainable, "
                     f"{get_human_readable_count(frozen)} frozen ({model_size:.3f} MB in all)")
        if total_flops:
            lines.append(f"FLOPs: {get_human_readable_count(total_flops)}")
        rank_zero_info("\n".join(lines))


def tidy_trainer(trainer: L.Trainer) -> L.Trainer:
    """Replace Lightning's default progress bar and model summary (exactly those types) with ours."""
    def swap(callback):
        if type(callback) is RichProgressBar:
            return StepProgressBar(refresh_rate=callback.refresh_rate, leave=callback._leave, theme=callback.theme)
        if type(callback) in (ModelSummary, RichModelSummary):
            return PlainSummary(max_depth=callback._max_depth)
        return callback

    trainer.callbacks = [swap(callback) for callback in trainer.callbacks]
    return trainer
