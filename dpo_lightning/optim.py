"""The optimizer and the learning-rate schedule: which parameters decay, which optimizer, what multiplier.

Weight decay applies to matrices only, not to biases and norms (nanoGPT `model.py::configure_optimizers`).
The optimizer is a name (`adamw`, or `rmsprop` as in the DPO reference) or any optimizer the LightningCLI
way (`class_path` + `init_args`, which LightningCLI saves in the hparams as a dict), and `lr_factor` is
the warm-up then constant, linear or cosine multiplier, stepped every optimizer step.
"""

import functools
import importlib
import math
from typing import Callable, Iterable

import torch
from torch import nn

OPTIMIZERS = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}


def param_groups(params: Iterable[nn.Parameter], learning_rate: float, weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups: matrices with `weight_decay`, the rest (biases, norms) without.

    The learning rate is set on each group, so `--model.learning_rate` wins over an optimizer's `init_args`.
    """
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": learning_rate},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": learning_rate}]


def make_optimizer(spec: str | dict | Callable, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer over `groups`, from a name, a `{"class_path", "init_args"}` dict or a callable."""
    if isinstance(spec, str):
        spec = OPTIMIZERS[spec]
    elif isinstance(spec, dict):  # LightningCLI saves the callable in the hparams as class_path + init_args
        module_name, _, class_name = spec["class_path"].rpartition(".")
        spec = functools.partial(getattr(importlib.import_module(module_name), class_name), **spec.get("init_args", {}))
    return spec(groups)


def lr_factor(step: int, warmup_steps: int, total_steps: int | float, kind: str) -> float:
    """Learning-rate multiplier: linear warm-up over `warmup_steps`, then constant, linear or cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
