"""Per-sequence response log-probs of a causal LM, two ways: from the full logits, or lean.

Both return, for a batch of N rows (chosen rows then rejected rows, see `batches.collate_pairs`):
`logps` (N,) summed float32 log-probs of the labelled tokens, `mean_logits` (N,) the mean logit over the
vocabulary at those positions (TRL's `logits/chosen` diagnostic) and `n_tokens` (N,) their count.
A batch in the shared-prefix layout (`packing.collate_shared`: one row per pair, or several pairs packed
per row) gives the same, with N = 2B in the same order: its outputs are read back into the padded layout
(`packing.padded_states`) before the log-probs, so the code below serves both layouts; a padded batch goes
to the model as it is. Both paths take their targets from one place, `shifted_labels`.

- `naive_logps` calls the model and hands its (N, T, V) logits to `sequence_logps`. It works for
  every model but holds the logits, their float32 copy and, in backward, their gradients: at 16 rows x
  512 tokens x 32k vocabulary each of those is 1 GB, and at a 128k vocabulary and 2k tokens, tens of GB.
- `lean_logps` calls the decoder for hidden states (N, T, D), keeps only the positions that carry a label
  (the responses: prompt and padding positions are skipped, often most of the batch), and runs the output
  head over them `chunk_size` tokens at a time, upcast to float32 inside the chunk. Each chunk is
  checkpointed (`torch.utils.checkpoint`), so backward recomputes its logits instead of keeping them:
  the extra memory is a few (chunk_size, V) float32 buffers, whatever N and T. Because the head is called
  as a module, anything on it works unchanged: tied weights, a LoRA adapter, bf16 autocast.

The lean path assumes logits = transform(head(decoder(x))): transformers' `base_model` as the decoder,
`get_output_embeddings()` as the head, and one of `logit_transform`'s transforms (Gemma's soft-capping,
Cohere's scale). `lean_unsupported` checks that on a few tokens for any model, so a model that does
something else (Granite's `logits_scaling`, a custom head) is caught and uses the naive path.
TRL 1.16's fused head (`trl/kernels/chunked_logprob.py`) is the same idea as a custom autograd.Function on
the head's weight; it cannot take a LoRA head, and off-GPU it scores every position, not the responses.
"""

import functools
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpo_lightning.losses import IGNORE_INDEX
from dpo_lightning.models import base_causal_lm, evaluating
from dpo_lightning.packing import is_shared, padded_states, rounding_tolerance, shared_inputs

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
    logits = _padded_outputs(lambda **inputs: model(**inputs).logits, base_causal_lm(model), batch)  # (N, T, V)
    logps, n_tokens = sequence_logps(logits, batch["labels"])
    mask = shifted_labels(batch["labels"])[1]  # (N, T-1)
    mean_logits = (logits[:, :-1].detach().float().mean(-1) * mask).sum(-1) / n_tokens.clamp(min=1)
    return logps, mean_logits, n_tokens


def _padded_outputs(call: Callable[..., Tensor], lm: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """`call`'s per-position outputs (N, T, ...) in the padded layout that `batch["labels"]` follows."""
    if not is_shared(batch):
        return call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return padded_states(call(**shared_inputs(lm, batch), use_cache=False), batch)  # (R, L, ...) read back


def lean_logps(model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 256) -> LogpsOutput:
    """What `naive_logps` returns, with the output head run only on labelled positions, chunk by chunk.

    The decoder is transformers' `base_model` (`model.model` for Llama, `model.transformer` for GPT-2),
    the head `get_output_embeddings()`, as in the model's own forward.

    Args:
        model: a Hugging Face causal LM, or a peft model wrapping one, for which `lean_unsupported` is None.
        batch: `input_ids`, `attention_mask`, `labels`, each (N, T), or a shared batch (packing.py).
        chunk_size: tokens per head call; memory grows with chunk_size x vocabulary.
    """
    lm = base_causal_lm(model)
    hidden = _padded_outputs(lambda **inputs: lm.base_model(**inputs).last_hidden_state, lm, batch)  # (N, T, D)
    targets, mask = shifted_labels(batch["labels"])  # (N, T-1) each
    hidden, targets = hidden[:, :-1][mask], targets[mask]  # (M, D), (M,): labelled positions only
    score = functools.partial(_score_chunk, lm.get_output_embeddings(), logit_transform(lm))
    pieces = []
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled():
            # Keep only the chunk's inputs and outputs; backward reruns the head to get its logits back.
            pieces.append(checkpoint(score, hidden_chunk, target_chunk, use_reentrant=False))
        else:
            pieces.append(score(hidden_chunk, target_chunk))
    token_logps, token_mean_logits = (torch.cat(values) for values in zip(*pieces))  # (M,) each
    # Back to (N, T-1) before summing, so each row sums in the same order as `sequence_logps`.
    logps = mask.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, token_logps).sum(-1)
    n_tokens = mask.sum(-1)
    mean_logits = mask.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, token_mean_logits).sum(-1)
    return logps, mean_logits / n_tokens.clamp(min=1), n_tokens


def _score_chunk(head: nn.Module, transform: Callable[[Tensor], Tensor], hidden: Tensor,
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


def logit_transform(lm: nn.Module) -> Callable[[Tensor], Tensor]:
    """What the model's forward applies to head(hidden): Cohere's `logit_scale`, then Gemma's soft-cap."""
    config = lm.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)

    def transform(logits: Tensor) -> Tensor:
        if isinstance(scale, (int, float)):
            logits = logits * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return logits

    return transform


def lean_unsupported(model: nn.Module, n_tokens: int = 8) -> str | None:
    """Why `lean_logps` would not reproduce the model's own logits, or None when it does.

    Runs the model's forward and the decoder + head + transform on `n_tokens` tokens and compares the
    logits, within `packing.rounding_tolerance` of the model's dtype (bf16 weights round differently in the
    two graphs).
    """
    lm = base_causal_lm(model)
    vocab = lm.config.get_text_config().vocab_size
    device = next(lm.parameters()).device
    ids = (torch.arange(1, n_tokens + 1, device=device) % vocab)[None]  # (1, n_tokens)
    try:
        with evaluating(lm), torch.no_grad():  # no dropout, so the two runs are comparable
            expected = lm(input_ids=ids, use_cache=False).logits.float()
            hidden = lm.base_model(input_ids=ids, use_cache=False).last_hidden_state
            actual = logit_transform(lm)(lm.get_output_embeddings()(hidden).float())
    except Exception as error:  # any model whose parts cannot be called this way
        return f"calling {type(lm).__name__}'s decoder and output head separately failed ({error!r})"
    tolerance = rounding_tolerance(lm.dtype)
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=tolerance,
                                                            atol=tolerance * expected.abs().max().item()):
        return (f"{type(lm).__name__}'s logits are not its output head applied to its decoder's hidden states "
                "(a logit scale or transform this package does not model)")
    return None
