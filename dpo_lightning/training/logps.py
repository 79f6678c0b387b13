"""Per-sequence response log-probs of a causal LM, two ways: from the full logits, or lean.

Both return, for a batch of N rows (chosen rows then rejected rows, see `batches.collate_pairs`):
`logps` (N,) summed float32 log-probs of the labelled tokens, `mean_logits` (N,) the mean logit over the
vocabulary at those positions (TRL's `logits/chosen` diagnostic) and `n_tokens` (N,) their count.
Any batch layout (layouts.py: padded, or prefix-shared and packed) gives the same, with N = 2B in the same
order: the layout the batch declares runs the model and reads its outputs back into the padded layout
(`Layout.outputs`) before the log-probs, so the code below serves every layout. Both paths take their
targets from one place, `shifted_labels`.

- `naive_logps` calls the model and hands its (N, T, V) logits to `sequence_logps`. It works for
  every model but holds the logits, their float32 copy and, in backward, their gradients: at 16 rows x
  512 tokens x 32k vocabulary each of those is 1 GB, and at a 128k vocabulary and 2k tokens, tens of GB.
- `lean_logps` calls the decoder for hidden states (N, T, D), keeps only the positions that carry a label
  (the responses: prompt and padding positions are skipped, often most of the batch), and runs the output
  head over them `chunk_size` tokens at a time, upcast to float32 inside the chunk, recomputing each
  chunk's logits in backward instead of keeping them: the extra memory is a few (chunk_size, V) float32
  buffers, whatever N and T. A plain linear head (tied or not) goes through `LinearHeadLogProb`, which
  keeps one logsumexp per token and costs one matmul more than the full logits (four for three, a floor
  of about 1.33x the bare head's time; `benchmarks/bench_head.py`); any other head (a LoRA adapter, a hooked
  module) is called as a module on checkpointed chunks (`torch.utils.checkpoint`), so it works unchanged.

The lean path assumes logits = transform(head(decoder(x))): `utils.hf.decoder` (transformers' `base_model`, or
Llama-4's `model`) as the decoder, `get_output_embeddings()` as the head, and one of `logit_transform`'s
transforms (Gemma's soft-capping, Cohere's scale). `lean_unsupported` checks that on a few tokens for any model,
so a model that does something else (Granite's `logits_scaling`, a custom head) is caught and uses the naive path.
`scorer.Scorer` picks the path once for a run.
TRL 1.16's fused head (`trl/kernels/chunked_logprob.py`) is the same idea as a custom autograd.Function on
the head's weight; it cannot take a LoRA head, and off-GPU it scores every position, not the responses.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpo_lightning.data.batches import IGNORE_INDEX
from dpo_lightning.data.layouts import layout_of
from dpo_lightning.utils.hf import agree, base_causal_lm, decoder, evaluating

LogpsOutput = tuple[Tensor, Tensor, Tensor]


def shifted_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The token each position predicts (N, T-1) and which of them carry a label (N, T-1).

    Off by one: the output at position t scores the token at t + 1, so the last position scores nothing
    and the first token is never a target. Unlabelled targets are set to 0, a valid index for `gather`;
    the mask zeroes them out afterwards.
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return labels.masked_fill(~mask, 0), mask


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of log p(label_t | tokens before t) over each row's labelled positions, in float32.

    Args:
        logits: (N, T, V) model outputs, any float dtype; upcast to float32 here so bf16 autocast
            does not round the log-probs.
        labels: (N, T) token ids, `IGNORE_INDEX` where no loss is taken (prompt and padding).

    Returns:
        logps: (N,) summed log-probs of the labelled tokens, float32.
        n_tokens: (N,) number of labelled tokens per row.

    Example:
        logits at position t predict the token at t + 1, so for input `[p0, p1, r0, r1]` with labels
        `[-100, -100, r0, r1]` the result is log p(r0 | p0 p1) + log p(r1 | p0 p1 r0).
    """
    targets, mask = shifted_labels(labels)  # (N, T-1) each
    logits = logits[:, :-1].float()  # (N, T-1, V): the last position predicts past the sequence
    label_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    # log softmax at the label only: logit - logsumexp, without keeping a (N, T-1, V) log-softmax.
    token_logps = label_logits - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def naive_logps(model: nn.Module, batch: dict[str, Tensor]) -> LogpsOutput:
    """Summed response log-probs (N,), mean response logits (N,) and response lengths (N,), via the full logits."""
    # The outputs in the padded layout that `batch["labels"]` follows, whatever layout the batch declares.
    logits = layout_of(batch).outputs(lambda **inputs: model(**inputs).logits, base_causal_lm(model), batch)  # (N, T, V)
    logps, n_tokens = sequence_logps(logits, batch["labels"])
    mask = shifted_labels(batch["labels"])[1]  # (N, T-1)
    mean_logits = (logits[:, :-1].detach().float().mean(-1) * mask).sum(-1) / n_tokens.clamp(min=1)
    return logps, mean_logits, n_tokens


def lean_logps(model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 256) -> LogpsOutput:
    """What `naive_logps` returns, with the output head run only on labelled positions, chunk by chunk.

    The decoder is `utils.hf.decoder` (`model.model` for Llama, `model.transformer` for GPT-2), the head
    `get_output_embeddings()`, as in the model's own forward.

    Args:
        model: a Hugging Face causal LM, or a peft model wrapping one, for which `lean_unsupported` is None.
        batch: `input_ids`, `attention_mask`, `labels`, each (N, T), or a shared batch (data/packing.py).
        chunk_size: tokens per head call; memory grows with chunk_size x vocabulary.
    """
    lm = base_causal_lm(model)
    hidden = layout_of(batch).outputs(lambda **inputs: decoder(lm)(**inputs).last_hidden_state, lm, batch)  # (N, T, D)
    targets, mask = shifted_labels(batch["labels"])  # (N, T-1) each
    hidden, targets = hidden[:, :-1][mask], targets[mask]  # (M, D), (M,): labelled positions only
    token_logps, token_mean_logits = head_logps(lm.get_output_embeddings(), logit_transform(lm), hidden, targets,
                                                chunk_size)  # (M,) each
    # Back to (N, T-1) before summing, so each row sums in the same order as `sequence_logps`.
    logps = mask.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, token_logps).sum(-1)
    n_tokens = mask.sum(-1)
    mean_logits = mask.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, token_mean_logits).sum(-1)
    return logps, mean_logits / n_tokens.clamp(min=1), n_tokens


def head_logps(head: nn.Module, transform: "LogitTransform", hidden: Tensor, targets: Tensor,
               chunk_size: int) -> tuple[Tensor, Tensor]:
    """log p(target) (M,) and the mean logit (M,, no grad) of M positions' hidden states (M, D), chunk by chunk.

    A plain `nn.Linear` head goes to `LinearHeadLogProb`, which uses its weight directly; any other head (a
    LoRA layer, a hooked or wrapped module) is called as a module on checkpointed chunks, so it works unchanged.
    Either way bf16 autocast runs the head's matmul in bf16, as the model's own forward does.
    """
    if _plain_linear(head):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
        bias = None if head.bias is None else head.bias.to(dtype)
        with torch.autocast(device, enabled=False):  # the casts are done: no op inside casts again
            return LinearHeadLogProb.apply(hidden.to(dtype), head.weight.to(dtype), bias, targets, chunk_size,
                                           transform)
    score = functools.partial(_score_chunk, head, transform)
    pieces = []
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled():
            # Keep only the chunk's inputs and outputs; backward reruns the head to get its logits back.
            pieces.append(checkpoint(score, hidden_chunk, target_chunk, use_reentrant=False))
        else:
            pieces.append(score(hidden_chunk, target_chunk))
    token_logps, token_mean_logits = (torch.cat(values) for values in zip(*pieces))  # (M,) each
    return token_logps, token_mean_logits


def _plain_linear(head: nn.Module) -> bool:
    """Whether `head(x)` is exactly `x @ weight.T + bias`: an nn.Linear (not a subclass) with no hook on it."""
    hooks = (head._forward_hooks, head._forward_pre_hooks, nn.modules.module._global_forward_hooks,
             nn.modules.module._global_forward_pre_hooks)
    return type(head) is nn.Linear and not any(hooks)


def _score_chunk(head: nn.Module, transform: "LogitTransform", hidden: Tensor,
                 targets: Tensor) -> tuple[Tensor, Tensor]:
    """log p(target) (C,) and the mean logit (C,, no grad) of C positions' hidden states (C, D)."""
    logits = transform(head(hidden).float())  # (C, V), float32 however the head ran
    return LabelLogProb.apply(logits, targets), logits.detach().mean(-1)


class LabelLogProb(torch.autograd.Function):
    """log softmax(logits)[target] for (C, V) logits, without autograd's (C, V) temporaries.

    Autograd through `gather(...) - logsumexp(...)` allocates three (C, V) tensors in backward (the
    softmax, a scattered one-hot, their sum); this backward builds the gradient in one:
    d log p_t / d z_v = 1[v = t] - softmax(z)_v.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        lse = torch.logsumexp(logits, dim=-1)  # (C,)
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad_logits = (logits - lse[:, None]).exp_().mul_(-grad[:, None])  # (C, V): -g * softmax
        grad_logits.scatter_add_(-1, targets[:, None], grad[:, None])  # + g at the target
        return grad_logits, None


class LinearHeadLogProb(torch.autograd.Function):
    """`head_logps` for a linear head: log softmax(transform(hidden @ W^T + b))[target], chunk by chunk.

    Forward computes each chunk's (C, V) logits once and keeps only their logsumexp (M floats); backward
    computes them once more and, with p = softmax(z), g the incoming gradient and z = transform(y):
        dL/dy_v = g * s * f_v * (1[v = t] - p_v)     (s: the logit scale, f_v: the soft-cap's slope, else 1)
    applied as two matmuls on P = p * f (the one (C, V) buffer, in place) plus one row per token:
        dL/dhidden = -g s (P @ W) + g s f_t W[t],   dL/dW = P^T @ (-g s hidden) + scatter of g s f_t hidden at t.
    Four (C x D x V) matmuls in all, to the three of autograd on the full logits; the largest buffers are
    one or two (C, V) float32 ones, whatever M (and a (C, V) copy in the head's dtype when that is not float32).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int,
                transform: "LogitTransform") -> tuple[Tensor, Tensor]:
        logps = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)  # (M,)
        mean_logits, lse = torch.empty_like(logps), torch.empty_like(logps)
        buffer = hidden.new_empty((min(chunk_size, len(hidden)), len(weight)), dtype=torch.float32)  # (C, V)
        for rows in _chunks(len(hidden), chunk_size):
            logits = _chunk_logits(hidden[rows], weight, bias, transform, buffer)
            if transform.softcap:
                mean_logits[rows] = logits.mean(-1)
            logps[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1)
            lse[rows] = _logsumexp_(logits)
        if not transform.softcap:  # linear in W: mean_v s (h . W_v + b_v) = s (h . mean(W) + mean(b)), no (C, V) pass
            mean_bias = 0.0 if bias is None else bias.float().mean()
            mean_logits = transform.apply_(torch.mv(hidden.float(), weight.float().mean(0)).add_(mean_bias))
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.transform = chunk_size, transform
        ctx.mark_non_differentiable(mean_logits)
        return logps.sub_(lse), mean_logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps: Tensor, _) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        transform, float32 = ctx.transform, torch.float32
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=float32) if ctx.needs_input_grad[2] else None
        buffer = hidden.new_empty((min(ctx.chunk_size, len(hidden)), len(weight)), dtype=float32)  # (C, V)
        for rows in _chunks(len(hidden), ctx.chunk_size):
            with torch.autocast(hidden.device.type, enabled=False):
                logits = _chunk_logits(hidden[rows], weight, bias, transform, buffer)
                slope = transform.slope(logits)  # (C, V) or None
                probs = logits.sub_(lse[rows, None]).exp_()  # P, in place of the logits
                scale = -grad_logps[rows] * (transform.scale or 1.0)  # -g s, (C,)
                target_scale = -scale  # g s f_t
                if slope is not None:
                    probs.mul_(slope)
                    target_scale = target_scale * slope.gather(-1, targets[rows, None]).squeeze(-1)
                _accumulate(probs, scale, target_scale, hidden[rows], weight, targets[rows], grad_hidden, rows,
                            grad_weight, grad_bias)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def _accumulate(probs: Tensor, scale: Tensor, target_scale: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor,
                grad_hidden: Tensor | None, rows: slice, grad_weight: Tensor | None, grad_bias: Tensor | None) -> None:
    """Adds one chunk's share to the gradients, from P (C, V) float32 and the per-token factors (C,) each."""
    probs_mm = probs if weight.dtype == torch.float32 else probs.to(weight.dtype)  # matmuls in the head's dtype
    if grad_hidden is not None:
        part = torch.mm(probs_mm, weight).float().mul_(scale[:, None])  # (C, D)
        grad_hidden[rows] = part.addcmul_(target_scale[:, None], weight.index_select(0, targets).float())
    if grad_weight is not None:
        hidden_f = hidden.float()
        scaled = (hidden_f * scale[:, None]).to(weight.dtype)  # (C, D)
        if weight.dtype == torch.float32:
            grad_weight.addmm_(probs_mm.T, scaled)
        else:  # addmm_ cannot mix dtypes; the sum over chunks stays float32
            grad_weight.add_(torch.mm(probs_mm.T, scaled))
        # scatter_add_, not index_add_ (or weight[targets]): on CPU those take a slow path, ~300 ms a chunk.
        rows_of = targets[:, None].expand(hidden.shape)
        grad_weight.scatter_add_(0, rows_of, hidden_f * target_scale[:, None])
    if grad_bias is not None:
        grad_bias.addmv_(probs.T, scale).scatter_add_(0, targets, target_scale)


def _chunks(n: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, transform: "LogitTransform",
                  buffer: Tensor) -> Tensor:
    """transform(hidden @ W^T + b) for a chunk (C, D), float32, written into `buffer`'s first C rows."""
    logits = buffer[:len(hidden)]
    if weight.dtype != torch.float32:  # the head's own dtype for the matmul, as the model's forward
        logits.copy_(F.linear(hidden, weight, bias))
    elif bias is None:
        torch.mm(hidden, weight.T, out=logits)
    else:
        torch.addmm(bias, hidden, weight.T, out=logits)
    return transform.apply_(logits)


def _logsumexp_(logits: Tensor) -> Tensor:
    """torch.logsumexp(logits, -1) (C,), computed in place: `logits` is overwritten with exp(logits - max)."""
    top = logits.amax(-1, keepdim=True)
    return logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


@dataclass(frozen=True)
class LogitTransform:
    """What the model's forward applies to head(hidden): Cohere's `logit_scale`, then Gemma's soft-cap."""

    scale: float | None = None
    softcap: float | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def apply_(self, logits: Tensor) -> Tensor:
        """The same, in place (the same float32 operations in the same order, so the same values)."""
        if self.scale is not None:
            logits.mul_(self.scale)
        if self.softcap:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def slope(self, logits: Tensor) -> Tensor | None:
        """d softcap(u) / du at the transformed `logits` z: 1 - (z / softcap)^2 (C, V); None without a soft-cap."""
        if not self.softcap:
            return None
        return torch.div(logits, self.softcap).square_().neg_().add_(1)


def logit_transform(lm: nn.Module) -> LogitTransform:
    """The model's `LogitTransform`, from its config."""
    config = lm.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    return LogitTransform(float(scale) if isinstance(scale, (int, float)) else None,
                          getattr(config, "final_logit_softcapping", None) or None)


def lean_unsupported(model: nn.Module, n_tokens: int = 8) -> str | None:
    """Why `lean_logps` would not reproduce the model's own logits, or None when it does.

    Runs the model's forward and the decoder + head + transform on `n_tokens` tokens and compares the
    logits, within `utils.hf.agree`'s tolerance for the model's dtype (bf16 weights round differently in the
    two graphs). Where they differ, both run again: a kernel that gives other values for the same tokens (torch
    2.13's flex_attention on CPU, at some lengths) is named as such, not taken for a logit transform.
    """
    lm = base_causal_lm(model)
    vocab = lm.config.get_text_config().vocab_size
    device = next(lm.parameters()).device
    ids = (torch.arange(1, n_tokens + 1, device=device) % vocab)[None]  # (1, n_tokens)
    kernel = f"attn_implementation={lm.config._attn_implementation!r} on {device.type}"

    def both() -> tuple[Tensor, Tensor]:  # the model's own logits, and the lean path's parts'
        hidden = decoder(lm)(input_ids=ids, use_cache=False).last_hidden_state
        return (lm(input_ids=ids, use_cache=False).logits.float(),
                logit_transform(lm)(lm.get_output_embeddings()(hidden).float()))

    try:
        with evaluating(lm), torch.no_grad():  # no dropout, so the runs are comparable
            expected, actual = both()
            if expected.isfinite().all() and not agree(actual, expected, lm.dtype):
                repeats = both()
    except Exception as error:  # any model whose parts cannot be called this way
        return f"calling {type(lm).__name__}'s decoder and output head separately failed ({error!r})"
    if not expected.isfinite().all():  # a broken attention kernel, say: nothing to compare the lean path with
        return f"{type(lm).__name__}'s own logits on {n_tokens} tokens are not finite ({kernel})"
    if agree(actual, expected, lm.dtype):
        return None
    if not all(agree(again, once, lm.dtype) for again, once in zip(repeats, (expected, actual))):
        return (f"{type(lm).__name__} gives other logits when run twice on the same {n_tokens} tokens ({kernel}): "
                "its attention kernel is not exact here, and no log-prob path can correct that; use "
                "attn_implementation 'sdpa' or 'eager'")
    return (f"{type(lm).__name__}'s logits are not its output head applied to its decoder's hidden states "
            "(a logit scale or transform this package does not model)")


def lean_supported(*models: nn.Module | None) -> bool:
    """Whether every given model's log-probs can take the lean path (`lean_unsupported`); warns if not."""
    for model in models:
        reason = lean_unsupported(model) if model is not None else None
        if reason:
            rank_zero_warn(f"--model.lean_logps: {reason}; using the full-logits path instead")
            return False
    return True
