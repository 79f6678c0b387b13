"""Batch layouts: how tokenized pairs become a batch, how a model runs on it, and which models may take it.

The collator names the layout in the batch (`batch["layout"]`) and everything downstream asks
`layout_of(batch)`: the log-prob code (training/logps.py) for the model's outputs in the padded layout, the throughput
callback for the non-padding tokens, the module for the layout's own metrics and its probe. Nothing guesses
the layout from which keys a batch happens to hold.

- `Padded` (`batches.collate_pairs`): prompt + chosen and prompt + rejected rows, right-padded. Every model
  takes it. A batch that names no layout is this plain form (input_ids, attention_mask, labels).
- `Shared` (`packing.collate_shared`): each pair one `[prompt | chosen | rejected]` stretch, the prompt run
  once, optionally several pairs packed per row, under a custom 4D mask; only for models that pass
  `shared_layout_unsupported` (sliding windows included; alibi models and kernels that ignore the
  mask are refused).

The shared layout's mask reaches a Hugging Face model as the 4D `attention_mask` that transformers 5 passes
through untouched (`masking_utils._preprocess_mask_arguments` returns any 4D tensor or BlockMask as is): a
boolean (R, 1, L, L) mask for sdpa, an additive float one for eager, a BlockMask for flex_attention
(forward only on CPU in torch 2.13: "FlexAttention does not support backward on CPU"; training with it
needs a GPU, untested here). Since that mask reaches every layer unchanged, it carries the sliding window
itself (Mistral, Phi-3, Starcoder2), and a model whose layers differ (Gemma 2/3, Qwen2 with
`max_window_layers`) gets one mask per layer type, the dict its forward takes (`layer_windows`). A model
that ignores such a mask (flash-attention's kernels take padding or packed sequences, not two responses
branching off one prompt; alibi models compute their biases from a 2D mask) would silently compute wrong
log-probs: `shared_layout_unsupported` checks on pairs longer than the model's widest window, and
`prefix_sharing: auto` keeps such a model on the padded layout.

A third layout (e.g. flash-attention's variable-length packing on GPUs) is one more `Layout` subclass here,
added to `LAYOUTS`. `choose_layout` turns the data module's `prefix_sharing` / `packing` settings (each
true, false or "auto") into a layout and the reason for it.
"""

from typing import Callable, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from dpo_lightning.data.batches import collate_pairs
from dpo_lightning.data.packing import PROMPT, SHARED, collate_shared
from dpo_lightning.utils.hf import base_causal_lm, evaluating, rounding_tolerance

Switch = bool | Literal["auto"]
Probe = Callable[["Layout"], str | None]  # why the models being trained cannot take a layout, or None


class Layout:
    """A batch layout; subclasses set `name` (the value of `batch["layout"]`) and implement each method."""

    name: ClassVar[str]
    flag: ClassVar[str] = ""  # the setting that asks for this layout, for refusal messages

    def collate(self, rows: list[dict], pad_token_id: int) -> dict:
        """B tokenized pairs -> one batch of this layout, with `labels` (2B, T) in the padded layout's order."""
        raise NotImplementedError

    def outputs(self, call: Callable[..., Tensor], lm: nn.Module, batch: dict) -> Tensor:
        """`call`'s per-position outputs (2B, T, ...) in the padded layout that `batch["labels"]` follows;
        `call` is the model or its decoder, `lm` the transformers model (for its config)."""
        raise NotImplementedError

    def token_mask(self, batch: dict) -> Tensor:
        """(rows, positions) True on the batch's real tokens, False on padding."""
        raise NotImplementedError

    def statistics(self, batch: dict) -> dict[str, Tensor]:
        """The layout's own per-batch metrics (logged as `<stage>/<name>`)."""
        return {}

    def unsupported(self, model: nn.Module) -> str | None:
        """Why `model` would not give the padded layout's outputs on this layout, or None."""
        return None


class Padded(Layout):
    name = "padded"

    def collate(self, rows: list[dict], pad_token_id: int) -> dict:
        return {**collate_pairs(rows, pad_token_id), "layout": self.name}

    def outputs(self, call: Callable[..., Tensor], lm: nn.Module, batch: dict) -> Tensor:
        return call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    def token_mask(self, batch: dict) -> Tensor:
        return batch["attention_mask"].bool()


class Shared(Layout):
    """Prefix sharing; with `packing`, several pairs per row up to `max_tokens_per_row` tokens (packing.py)."""

    name = SHARED
    flag = "--data.prefix_sharing"

    def __init__(self, packing: bool = False, max_tokens_per_row: int | None = None):
        self.packing, self.max_tokens_per_row = packing, max_tokens_per_row

    def collate(self, rows: list[dict], pad_token_id: int) -> dict:
        return collate_shared(rows, pad_token_id, self.packing, self.max_tokens_per_row)

    def outputs(self, call: Callable[..., Tensor], lm: nn.Module, batch: dict) -> Tensor:
        return padded_states(call(**shared_inputs(lm, batch), use_cache=False), batch)  # (R, L, ...) read back

    def token_mask(self, batch: dict) -> Tensor:
        return batch["pair_ids"] >= 0

    def statistics(self, batch: dict) -> dict[str, Tensor]:
        return {"pairs_per_row": batch["pairs_per_row"].float().mean()}  # how densely packing fills the rows

    def unsupported(self, model: nn.Module) -> str | None:
        return shared_layout_unsupported(model)


# --- The shared layout's attention: the mask, and the read-back into the padded layout. ---

def visible(batch: dict[str, Tensor], b: Tensor, q: Tensor, k: Tensor, window: int | None = None) -> Tensor:
    """Whether token q of row b attends to token k: earlier (or itself), same pair, a prompt or same-branch
    token, and, for a sliding-window layer, fewer than `window` positions back.

    The window counts position ids, not columns: a rejected token's distance to the prompt is then the one
    in its padded row (transformers' `sliding_window_overlay`: key index > query index - window), however
    long the chosen response between them. Written on index tensors so the same rule builds a dense mask
    (broadcast indices) and a FlexAttention `mask_mod`. Padding (pair -1, branch 0, position 0) sees the
    padding before it, so no query's row is all masked.
    """
    pair_ids, branch_ids, positions = batch["pair_ids"], batch["branch_ids"], batch["position_ids"]
    key_branch = branch_ids[b, k]
    seen = ((k <= q) & (pair_ids[b, q] == pair_ids[b, k])
            & ((key_branch == PROMPT) | (key_branch == branch_ids[b, q])))
    return seen if window is None else seen & (positions[b, q] - positions[b, k] < window)


def layer_windows(config) -> dict[str, int | None]:
    """Each kind of attention layer of `config` and its sliding window (None: attends over everything before).

    Models with `layer_types` (Gemma 2/3, Qwen2/3, Cohere2...) name each layer's kind and take one mask per
    kind; Mistral, Phi-3, Starcoder2 and Mixtral slide in every layer when `sliding_window` is set.

    Example:
        Gemma 2 (alternating, window 4096) -> {"sliding_attention": 4096, "full_attention": None};
        Mistral-7B-v0.1 -> {"": 4096};  Llama -> {"": None}
    """
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if not kinds:
        return {"": window}
    return {kind: window if kind == "sliding_attention" else None for kind in sorted(set(kinds))}


def attention_mask(lm: nn.Module, batch: dict[str, Tensor]) -> Tensor | BlockMask | dict:
    """The shared layout's mask in the form `lm`'s attention implementation takes a custom 4D mask.

    sdpa (and the default): boolean (R, 1, L, L), True = attend. eager adds its mask to the scores: 0 or
    the dtype's minimum, as transformers' own `eager_mask`. flex_attention: a BlockMask of the same rule.
    A model whose layers differ in their window gets one mask per kind of layer, `{layer type: mask}`, the
    form its forward takes (a single 4D mask would reach every layer unchanged).
    """
    windows = layer_windows(lm.config)
    masks = {window: _mask(lm, batch, window) for window in set(windows.values())}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {kind: masks[window] for kind, window in windows.items()}


def _mask(lm: nn.Module, batch: dict[str, Tensor], window: int | None) -> Tensor | BlockMask:
    """`visible` with one window as the mask `lm`'s attention implementation takes."""
    n_rows, length = batch["pair_ids"].shape
    device = batch["pair_ids"].device
    implementation = lm.config._attn_implementation
    if implementation == "flex_attention":
        def mask_mod(b, h, q, k):
            return visible(batch, b, q, k, window)

        return create_block_mask(mask_mod, n_rows, None, length, length, device=device)
    index = torch.arange(length, device=device)
    rows = torch.arange(n_rows, device=device)[:, None, None]
    mask = visible(batch, rows, index[None, :, None], index[None, None, :], window)[:, None]  # (R, 1, L, L)
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=lm.dtype, device=device).masked_fill(~mask, torch.finfo(lm.dtype).min)
    return mask


def shared_inputs(lm: nn.Module, batch: dict[str, Tensor]) -> dict:
    """The model's keyword arguments for a shared batch: its ids, position ids and 4D mask."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": attention_mask(lm, batch)}


def padded_states(states: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """A shared batch's per-position outputs (hidden states or logits) in the padded layout of `batch["labels"]`.

    The (R, L, ...) outputs are gathered at `response_positions` into (2B, S, ...), where, as in the padded
    layout, column t scores label t + 1. An output that scores two tokens (the last prompt position) is
    gathered twice, and its gradient summed.
    """
    return states.flatten(0, 1)[batch["response_positions"]]




# --- Which models may take the shared layout. ---

def shared_layout_unsupported(model: nn.Module) -> str | None:
    """Why the shared layout would not reproduce the padded layout's outputs on `model`, or None when it does.

    Packs two pairs into one row and compares the decoder's hidden states at each response's scoring
    positions with those of the response run alone, unpadded (the model then builds its own mask, sliding
    windows included), within `rounding_tolerance` of the model's dtype (as `logps.lean_unsupported`). The
    first pair's prompt is as long as the model's widest sliding window, so its responses reach past the
    window: a mask without the window term (or a model that ignores the mask on its sliding layers) moves
    their states. A mask the model ignores lets a rejected token see the chosen response or the other pair:
    that moves the hidden states by half their largest value or more, even in a randomly initialised model,
    so it is caught in any dtype. Ignored position ids shift the rejected response, which moves a random
    Llama's states by under 1% (its attention is nearly uniform): caught in float32, below bf16's tolerance.
    """
    lm = base_causal_lm(model)
    vocab = lm.config.get_text_config().vocab_size
    device = next(lm.parameters()).device
    reach = max((window for window in layer_windows(lm.config).values() if window), default=0)

    def tokens(start: int, n: int) -> list[int]:
        return [(start + 7 * i) % vocab for i in range(n)]

    rows = [{"prompt_input_ids": tokens(3, 3 + reach), "chosen_input_ids": tokens(11, 2),
             "rejected_input_ids": tokens(5, 4)},
            {"prompt_input_ids": tokens(17, 2), "chosen_input_ids": tokens(2, 3), "rejected_input_ids": tokens(9, 1)}]
    batch = collate_shared(rows, 0, packing=True, max_tokens_per_row=reach + 30)  # both pairs in one row
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    try:  # in eval mode (no dropout) and float32 compute, so the two runs are comparable
        with evaluating(lm), torch.no_grad(), torch.autocast(device.type, enabled=False):
            shared = padded_states(lm.base_model(**shared_inputs(lm, batch), use_cache=False).last_hidden_state,
                                   batch)  # (4, S, D)
            alone = [_alone_states(lm, row["prompt_input_ids"], row[side], device)
                     for side in ("chosen_input_ids", "rejected_input_ids") for row in rows]
    except Exception as error:  # an attention implementation that rejects a 4D mask or position ids
        return f"{type(lm).__name__} cannot take the shared layout's 4D attention mask ({error!r})"
    tolerance = rounding_tolerance(lm.dtype)
    for k, expected in enumerate(alone):
        actual = shared[k, : len(expected)].float()
        if not torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()):
            return (f"{type(lm).__name__} with attn_implementation={lm.config._attn_implementation!r} ignores "
                    "the shared layout's attention mask or position ids (its hidden states differ from the "
                    "padded layout's)")
    return None


def _alone_states(lm: nn.Module, prompt: list[int], response: list[int], device: torch.device) -> Tensor:
    """The decoder's float hidden states (1 + len(response), D) at `response`'s scoring positions, run alone."""
    input_ids = torch.tensor([prompt + response], device=device)
    return lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[0, len(prompt) - 1 :].float()




LAYOUTS: dict[str, type[Layout]] = {layout.name: layout for layout in (Padded, Shared)}


def layout_of(batch: dict) -> Layout:
    """The layout `batch` declares (`batch["layout"]`); a batch that declares none is `Padded`."""
    return LAYOUTS[batch.get("layout", Padded.name)]()


def refusal(layout: Layout, reason: str) -> ValueError:
    """Our error for a layout the model cannot take: the setting, the reason, the fix."""
    return ValueError(f"{layout.flag}: {reason}. Set {layout.flag} false (or auto, which picks the padded layout "
                      "for this model), or load the model with an attention implementation that takes a 4D mask "
                      "(sdpa, eager)")


def choose_layout(prefix_sharing: Switch, packing: Switch, max_tokens_per_row: int | None,
                  probe: Probe | None) -> tuple[Layout, str]:
    """The layout for the data module's settings, and why (printed at fit start).

    `auto` (the default of both): the shared layout, packed, when `probe` finds that the models being
    trained reproduce the padded layout's outputs on it (the fastest exact layout: each prompt runs once,
    rows carry no padding but at their end), else the padded layout. `True` insists: a model that fails
    the probe is refused with `refusal`. `probe` is None without a model to ask (a data module used on
    its own): `auto` is then padded, which every model takes.
    """
    wanted = prefix_sharing is True or packing is True
    if prefix_sharing is False:
        return Padded(), "--data.prefix_sharing false"
    shared = Shared(packing is not False, max_tokens_per_row if packing is not False else None)
    if probe is None:
        if wanted:
            return shared, "--data.prefix_sharing / --data.packing true (no model attached to check)"
        return Padded(), "--data.prefix_sharing auto: no model attached to check the shared layout on"
    reason = probe(shared)
    if reason and wanted:
        raise refusal(shared, reason)
    if reason:
        return Padded(), f"--data.prefix_sharing auto: {reason}"
    how = "packed" if shared.packing else "one pair per row"
    return shared, (f"prefix sharing, {how} (--data.prefix_sharing {prefix_sharing}, --data.packing {packing}): "
                    "the model's outputs on it match the padded layout's")
