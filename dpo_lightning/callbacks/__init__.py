"""The callbacks a run adds around training: a validation summary, samples during evaluation, a Hugging Face export
at the end of fit, and a checkpoint when the job is preempted.

They work with any logger and strategy; add them under `trainer.callbacks` in a config
(`class_path: dpo_lightning.callbacks.PreemptionCheckpoint`), or to `Trainer(callbacks=[...])`. This package may
import `training` (the export loads a `DPOModule` from a checkpoint), `data`, `online` and `utils`; the training
step imports nothing from it.
"""

from dpo_lightning.callbacks.export import ExportPretrained
from dpo_lightning.callbacks.preemption import PreemptionCheckpoint
from dpo_lightning.callbacks.samples import GenerateSamples
from dpo_lightning.callbacks.validation import ValidationSummary
from dpo_lightning.training.checkpoints import CheckpointValidation  # DPOModule adds it itself; 0.1 listed it here

__all__ = ["CheckpointValidation", "ExportPretrained", "GenerateSamples", "PreemptionCheckpoint", "ValidationSummary"]
