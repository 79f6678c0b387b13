"""The optimizer and the learning-rate schedule: which parameters decay, which optimizer, what multiplier.

Weight decay applies to matrices only, not to biases and norms (nanoGPT `model.py::configure_optimizers`).
The optimizer is a name (`adamw`, or `rmsprop` as in the DPO reference) or any optimizer the LightningCLI
way (`class_path` + `init_args`, which LightningCLI saves in the hparams as a dict), and `lr_factor` is
the warm-up then constant, linear or cosine multiplier, stepped every optimizer step. `grad_norm` is the
whole gradient's norm that `DPOModule` logs before each optimizer step, as TRL logs `grad_norm`.
"""

import functools
import importlib
import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

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


def optimizers(hparams, params: Iterable[nn.Parameter], trainer) -> dict:
    """`DPOModule.configure_optimizers`' answer: the optimizer over the trainable `params` in their decay groups,
    and its schedule (`lr_factor` over the run's optimizer steps), stepped every optimizer step."""
    optimizer = make_optimizer(hparams.optimizer, param_groups(params, hparams.learning_rate, hparams.weight_decay))
    total = trainer.estimated_stepping_batches if hparams.lr_scheduler_type != "constant" else 0
    schedule = functools.partial(lr_factor, warmup_steps=hparams.warmup_steps, total_steps=total,
                                 kind=hparams.lr_scheduler_type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def grad_norm(parameters: Iterable[nn.Parameter], sharded_root: nn.Module | None = None) -> Tensor | None:
    """The L2 norm of the whole gradient of `parameters`, in float32; None where they hold none (DeepSpeed keeps
    its own). Called before the optimizer step: after AMP's unscaling, before clipping.

    Under DDP each rank holds the whole gradient, averaged over the ranks by backward: its norm is the norm.
    Under FSDP each rank holds shards. FSDP2's are DTensors, and torch's `get_total_norm` sums their parts over
    the mesh; FSDP1 keeps flat shards, whose norm its root module (`sharded_root`) computes over its process
    group with `clip_grad_norm_` at an infinite bound (the gradients are scaled by exactly 1).
    """
    if isinstance(sharded_root, FullyShardedDataParallel):
        return sharded_root.clip_grad_norm_(math.inf).float()
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    if isinstance(grads[0], DTensor):
        return torch.nn.utils.get_total_norm(grads).full_tensor().float()
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
