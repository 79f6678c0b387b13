"""What a checkpoint holds and how it is read back: only the trainable weights (`keep_trainable_weights`), named
load errors and atomic saves (`NamedCheckpointIO`), the run's settings against the checkpoint's
(`reconcile_settings`, `check_reference_source`), and `validate(ckpt_path=...)` at the checkpoint's own step
(`CheckpointValidation`). `DPOModule`'s checkpoint hooks and callbacks call these.
"""

import os
from typing import Any, Mapping

import lightning as L
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from torch import nn

from dpo_lightning.utils.atomic import atomic_path


class NamedCheckpointIO(CheckpointIO):
    """The strategy's checkpoint IO, whose load errors name the file and say what to do."""

    def __init__(self, inner: CheckpointIO):
        self.inner = inner

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        """Save atomically (`atomic_path`): a process killed mid-save leaves the previous whole file."""
        if "://" in str(path):  # a remote store: its own semantics
            return self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        with atomic_path(path) as partial:
            self.inner.save_checkpoint(checkpoint, partial, storage_options=storage_options)

    def load_checkpoint(self, path, map_location=None, **kwargs):
        try:
            return self.inner.load_checkpoint(path, map_location=map_location, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as error:  # torch and pickle raise RuntimeError, EOFError, UnpicklingError, ...
            size = os.path.getsize(path) if os.path.isfile(path) else None
            raise ValueError(f"cannot read the checkpoint {path} ({size} bytes): it is truncated, empty or not a "
                             f"checkpoint ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                             "Resume from another checkpoint (an earlier one, or last.ckpt), or start without "
                             "--ckpt_path") from error

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()



def keep_trainable_weights(checkpoint: dict, policy: nn.Module, keep_reference: bool = False) -> None:
    """Leave only what trains in `checkpoint["state_dict"]` (with LoRA, the adapter). The reference and the frozen
    weights (a LoRA base, a reference adapter) never change: they are rebuilt from their source on load. A reference
    that moves with training (online DPO's `ref_model_sync_steps`) is kept with `keep_reference`."""
    frozen = {f"policy.{name}" for name, param in policy.named_parameters(remove_duplicate=False)
              if not param.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                if (keep_reference or not k.startswith("ref.")) and k not in frozen}


def check_reference_source(checkpoint: dict, hparams: Mapping[str, Any]) -> None:
    """Raise, saying what to pass, where the checkpoint's reference was a model object and none is given again."""
    saved = checkpoint.get("hyper_parameters")
    if saved is not None and "ref_model_name_or_path" not in saved and hparams.get(
            "ref_model_name_or_path", "an object") is None:
        raise ValueError("this checkpoint's reference was passed as a model object (ref_model_name_or_path), "
                         "which a checkpoint does not hold; pass it again: DPOModule.load_from_checkpoint(path, "
                         "model_name_or_path=..., ref_model_name_or_path=<the reference model, or its folder "
                         "or hub name>)")


def reconcile_settings(checkpoint: dict, current: dict) -> str | None:
    """Compare the checkpoint's hyperparameters with the run's; make the run's optimizer settings take effect.

    Every changed setting takes effect from the resumed step on: the module was built from the run's
    config, and only the weights, the optimizer moments, the schedule's position and the data position
    come from the checkpoint. The saved optimizer and schedule states would still carry the old learning
    rate and weight decay (Lightning restores them over the new ones), so they are rewritten here: the
    rates scaled by new / old, keeping the schedule's position. Returns the message to show, or None.
    """
    saved = checkpoint.get("hyper_parameters") or {}
    # Keys starting with "_" are bookkeeping, not settings: LightningCLI's `_instantiator`, for one.
    changed = {name: (saved.get(name), current.get(name)) for name in sorted(set(saved) | set(current))
               if saved.get(name) != current.get(name) and not name.startswith("_")}
    if not changed:
        return None
    if "learning_rate" in changed and None not in changed["learning_rate"]:
        ratio = changed["learning_rate"][1] / changed["learning_rate"][0]
        for state in checkpoint.get("optimizer_states", []):
            for group in state["param_groups"]:
                group.update({key: group[key] * ratio for key in ("lr", "initial_lr") if key in group})
        for state in checkpoint.get("lr_schedulers", []):
            state.update({key: [lr * ratio for lr in state[key]] for key in ("base_lrs", "_last_lr") if key in state})
    if "weight_decay" in changed and changed["weight_decay"][1] is not None:
        for state in checkpoint.get("optimizer_states", []):
            state["param_groups"][0]["weight_decay"] = changed["weight_decay"][1]  # the decay group (optim.py)
    listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
    return (f"resuming from a checkpoint trained with other settings: {listed}. The run's values take effect from "
            "the resumed step on (learning_rate and weight_decay too: the saved optimizer and schedule states are "
            "rewritten to them); the weights, optimizer moments, schedule position and data position are the "
            "checkpoint's")

class CheckpointValidation(L.Callback):
    """`validate(ckpt_path=...)` (`dpo-lightning validate --ckpt_path`) at the checkpoint's step.

    Lightning restores only the weights and callback states for a validation, not the loop counters: the
    step-300 checkpoint was validated as step 0 (its metrics.csv row, the `GenerateSamples` table, the
    `ValidationSummary` history), and `ModelCheckpoint` warned that its folder had changed, though a validation
    saves no checkpoint. Here the step counters are the checkpoint's while validating (put back after,
    so that a later `fit` on the same Trainer starts where it would have), and the checkpoint callbacks'
    states are left unrestored. `DPOModule.configure_callbacks` adds it to every run.
    """

    def __init__(self):
        self._counters: tuple[int, dict] | None = None  # the Trainer's own, to put back after validating

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "validate" or "loops" not in checkpoint:
            return
        for callback in trainer.checkpoint_callbacks:
            checkpoint.get("callbacks", {}).pop(callback.state_key, None)
        loop, saved = trainer.fit_loop.epoch_loop, checkpoint["loops"]["fit_loop"]
        steps = loop.automatic_optimization.optim_progress  # what trainer.global_step reads
        self._counters = (loop._batches_that_stepped, steps.state_dict())
        loop._batches_that_stepped = saved["epoch_loop.state_dict"]["_batches_that_stepped"]  # the logged step
        steps.load_state_dict(saved["epoch_loop.automatic_optimization.optim_progress"])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._counters is not None:
            loop = trainer.fit_loop.epoch_loop
            loop._batches_that_stepped = self._counters[0]
            loop.automatic_optimization.optim_progress.load_state_dict(self._counters[1])
            self._counters = None

