"""Hugging Face model helpers every wing uses: the causal LM inside a peft wrapper, eval mode for a block, and how
closely two computations of the same outputs agree in a dtype."""

import contextlib
from typing import Iterator

import torch
from torch import nn


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (its layers carry the adapters), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Within the block `model` is in eval mode (no dropout); after it, every submodule's own mode is restored
    (not `model.train()`, which would also switch on a part the user left in eval mode)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def rounding_tolerance(dtype: torch.dtype) -> float:
    """How far, relative to the largest value, two computations of the same outputs in `dtype` may differ.

    1e-3 in float32; in bf16 (2^-8 relative rounding, 8 bits of mantissa) and fp16, 4 units of rounding,
    since CPU kernel sets (AVX-512, AVX2, the `default` one) and GPU kernels round each matmul differently
    (measured: up to 1.5 units on a 2-layer model under ATEN_CPU_CAPABILITY=avx2).
    """
    return max(1e-3, 2 * torch.finfo(dtype).eps)

