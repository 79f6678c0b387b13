"""Hugging Face model helpers every wing uses: the causal LM inside a peft wrapper, its decoder, eval mode for a
block, and how closely two computations of the same outputs agree in a dtype."""

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (its layers carry the adapters), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(lm: nn.Module) -> nn.Module:
    """What a transformers causal LM runs before its output head: the module returning `last_hidden_state`.

    transformers' `base_model` (`model.model` for Llama, `model.transformer` for GPT-2, the multimodal `model` of
    Gemma 4), except where that is the LM itself: Llama-4's causal LM names `language_model` as its prefix but
    keeps its decoder at `model`. Then the decoder is the LM's one child besides its output head.
    """
    if lm.base_model is not lm:
        return lm.base_model
    head = lm.get_output_embeddings()
    children = [child for child in lm.children() if child is not head]
    return children[0] if len(children) == 1 else lm


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


def agree(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> bool:
    """Whether two computations of the same outputs agree within `rounding_tolerance(dtype)` of the largest
    expected value. Never where either holds a NaN or an infinity: a broken kernel's output agrees with nothing
    (and `torch.allclose` would raise on a NaN tolerance)."""
    if actual.shape != expected.shape or not (actual.isfinite().all() and expected.isfinite().all()):
        return False
    tolerance = rounding_tolerance(dtype)
    return torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
