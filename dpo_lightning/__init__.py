"""dpo_lightning: Direct Preference Optimization for Hugging Face causal LMs, in PyTorch Lightning."""

from dpo_lightning.callbacks import ExportPretrained, GenerateSamples, PreemptionCheckpoint, ValidationSummary
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.logps import sequence_logps
from dpo_lightning.losses import LOSSES, hinge_loss, ipo_loss, sigmoid_loss
from dpo_lightning.module import DPOModule

__all__ = ["DPOModule", "PreferenceDataModule", "ValidationSummary", "GenerateSamples", "ExportPretrained",
           "PreemptionCheckpoint", "LOSSES",
           "sigmoid_loss", "hinge_loss", "ipo_loss", "sequence_logps"]
