"""dpo_lightning: Direct Preference Optimization for Hugging Face causal LMs, in PyTorch Lightning.

The package is laid out by wing, each a sub-package whose docstring says what it holds and what it may import;
imports run one way, from the command line down to the floor:

    cli/        the `dpo-lightning` command (LightningCLI for fit and validate, and the tools)
    tools/      plots, TRL migration, the quickstart's assets
    callbacks/  what a run adds around training: summary, samples, export, preemption
    training/   the training step: DPOModule, log-probs, reference, objective, losses, metrics
    online/     online DPO: sampling, rewards, the greedy solve rate
    data/       rows -> token ids -> batches: sources, schemas, rules, layouts, PreferenceDataModule
    utils/      the floor: paths, atomic writes, the tokenizer default, generation

The names below are imported on first use (PEP 562), so `import dpo_lightning` and `dpo-lightning --help` do not
pay for torch, transformers and Lightning. Importing the package filters the third-party console lines listed in
`utils/quiet.py`, and lets 0.1's flat module paths (`dpo_lightning.rewards.sort_exact` in a config, say) import as
the modules that hold their names now (`MOVED`).
"""

import importlib
import importlib.abc
import importlib.util
import sys

from dpo_lightning.utils import quiet

EXPORTS = {
    "DPOModule": "dpo_lightning.training.module",
    "PreferenceDataModule": "dpo_lightning.data.datamodule",
    "ValidationSummary": "dpo_lightning.callbacks.validation",
    "GenerateSamples": "dpo_lightning.callbacks.samples",
    "ExportPretrained": "dpo_lightning.callbacks.export",
    "PreemptionCheckpoint": "dpo_lightning.callbacks.preemption",
    "GreedyReward": "dpo_lightning.online.greedy",
    "OnlineConfig": "dpo_lightning.online.config",
    "DecoderLayers": "dpo_lightning.training.distributed",
    "LOSSES": "dpo_lightning.training.losses",
    "sigmoid_loss": "dpo_lightning.training.losses",
    "hinge_loss": "dpo_lightning.training.losses",
    "ipo_loss": "dpo_lightning.training.losses",
    "sequence_logps": "dpo_lightning.training.logps",
}
__all__ = list(EXPORTS)

# 0.1's flat modules -> the modules that hold their public names now. Configs name them in `class_path` and
# `reward_funcs` (`dpo_lightning.distributed.DecoderLayers`, `dpo_lightning.rewards.sort_exact`).
MOVED = {
    "dpo_lightning.module": "dpo_lightning.training.module",
    "dpo_lightning.losses": "dpo_lightning.training.losses",
    "dpo_lightning.logps": "dpo_lightning.training.logps",
    "dpo_lightning.objective": "dpo_lightning.training.objective",
    "dpo_lightning.metrics": "dpo_lightning.training.metrics",
    "dpo_lightning.models": "dpo_lightning.training.models",
    "dpo_lightning.reference": "dpo_lightning.training.reference",
    "dpo_lightning.optim": "dpo_lightning.training.optim",
    "dpo_lightning.distributed": "dpo_lightning.training.distributed",
    "dpo_lightning.throughput": "dpo_lightning.training.throughput",
    "dpo_lightning.rewards": "dpo_lightning.online.rewards",
    "dpo_lightning.export": "dpo_lightning.callbacks.export",
    "dpo_lightning.plots": "dpo_lightning.tools.plots",
    "dpo_lightning.migrate": "dpo_lightning.tools.migrate",
    "dpo_lightning.rules": "dpo_lightning.data.rules",
    "dpo_lightning.sources": "dpo_lightning.data.sources",
    "dpo_lightning.batches": "dpo_lightning.data.batches",
    "dpo_lightning.packing": "dpo_lightning.data.packing",
    "dpo_lightning.layouts": "dpo_lightning.data.layouts",
    "dpo_lightning.formats": "dpo_lightning.data.formats",
    "dpo_lightning.schemas": "dpo_lightning.data.schemas",
    "dpo_lightning.summary": "dpo_lightning.data.summary",
    "dpo_lightning.resume": "dpo_lightning.data.loaders",
    "dpo_lightning.console": "dpo_lightning.training.console",
    "dpo_lightning.preflight": "dpo_lightning.training.preflight",
    "dpo_lightning.locate": "dpo_lightning.utils.locate",
    "dpo_lightning.quiet": "dpo_lightning.utils.quiet",
    "dpo_lightning.quickstart": "dpo_lightning.tools.quickstart",
    "dpo_lightning.lightning_cli": "dpo_lightning.cli.fit",
}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Imports a `MOVED` path as the module it moved to (the same module object, not a copy); `python -m` on it
    runs the new module's code (`get_code`), so `python -m dpo_lightning.quickstart` still rebuilds the assets."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self, origin=importlib.util.find_spec(MOVED[name]).origin)

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # imported in full by create_module

    def get_code(self, fullname):
        return importlib.util.find_spec(MOVED[fullname]).loader.get_code(MOVED[fullname])

    def get_source(self, fullname):
        return importlib.util.find_spec(MOVED[fullname]).loader.get_source(MOVED[fullname])


quiet.install()
if not any(isinstance(finder, _Moved) for finder in sys.meta_path):
    sys.meta_path.append(_Moved())


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'dpo_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *EXPORTS])
