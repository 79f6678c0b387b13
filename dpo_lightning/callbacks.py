"""Callbacks for what surrounds a DPO run: a validation summary, and a Hugging Face export.

Both work with any logger and strategy; add them under `trainer.callbacks` in a config, or to
`Trainer(callbacks=[...])`.
"""

import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class ValidationSummary(L.Callback):
    """Validate once before training, log it as step 0, and print every validation at the end of fit.

    Lightning's sanity check runs validation before the first step but throws its results away; with
    `num_sanity_val_steps=-1` it covers the whole split, and this callback keeps it as the step-0 point
    of the curves (where policy == reference: loss ln 2, accuracy 0.5).

    Args:
        metrics: validation metrics to print, without the `val/` prefix.
    """

    def __init__(self, metrics: tuple[str, ...] = ("loss", "rewards/accuracies", "rewards/margins")):
        self.metrics = metrics
        self.history: list[dict[str, float]] = []

    def _record(self, trainer: L.Trainer, step: int) -> None:
        values = {f"val/{m}": trainer.callback_metrics[f"val/{m}"].item()
                  for m in self.metrics if f"val/{m}" in trainer.callback_metrics}
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
        if not self.history:
            return
        names = [m for m in self.metrics if f"val/{m}" in self.history[-1]]
        print("\nvalidation " + " ".join(f"{name:>20}" for name in ["step", *names]))
        for row in self.history:
            print("           " + " ".join([f"{row['step']:>20d}"] + [f"{row[f'val/{n}']:>20.4f}" for n in names]))


class ExportPretrained(L.Callback):
    """At the end of fit, save the policy and tokenizer with `save_pretrained` (safetensors).

    The folder loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.

    Args:
        dirpath: where to write. Default: `<trainer.log_dir>/hf_model`.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model")
        # Every rank calls save_pretrained: under FSDP gathering the weights is collective; only rank 0 writes.
        pl_module.policy.save_pretrained(path, is_main_process=trainer.is_global_zero)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if trainer.is_global_zero and tokenizer is not None and not isinstance(tokenizer, str):
            tokenizer.save_pretrained(path)
        if trainer.is_global_zero:
            print(f"[dpo_lightning] saved the policy and tokenizer to {path}")
