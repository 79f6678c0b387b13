"""dpo_lightning: Direct Preference Optimization for Hugging Face causal LMs, in PyTorch Lightning.

The names below are imported on first use (PEP 562), so `import dpo_lightning` and `dpo-lightning --help`
do not pay for torch, transformers and Lightning; `from dpo_lightning import DPOModule` imports them then.
Importing the package filters the third-party console lines listed in `quiet.py`.
"""

import importlib

from dpo_lightning import quiet

EXPORTS = {
    "DPOModule": "dpo_lightning.module",
    "PreferenceDataModule": "dpo_lightning.data",
    "ValidationSummary": "dpo_lightning.callbacks",
    "GenerateSamples": "dpo_lightning.callbacks",
    "ExportPretrained": "dpo_lightning.callbacks",
    "PreemptionCheckpoint": "dpo_lightning.callbacks",
    "LOSSES": "dpo_lightning.losses",
    "sigmoid_loss": "dpo_lightning.losses",
    "hinge_loss": "dpo_lightning.losses",
    "ipo_loss": "dpo_lightning.losses",
    "sequence_logps": "dpo_lightning.logps",
}
__all__ = list(EXPORTS)

quiet.install()


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'dpo_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *EXPORTS])
