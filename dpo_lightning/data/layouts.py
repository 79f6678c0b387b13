"""Batch layouts: how tokenized pairs become a batch, how a model runs on it, and which models may take it.

The collator names the layout in the batch (`batch["layout"]`) and everything downstream asks
`layout_of(batch)`: the log-prob code (training/logps.py) for the model's outputs in the padded layout, the throughput
callback for the non-padding tokens, the module for the layout's own metrics and its probe. Nothing guesses
the layout from which keys a batch happens to hold.

- `Padded` (`batches.collate_pairs`): prompt + chosen and prompt + rejected rows, right-padded. Every model
  takes it. A batch that names no layout is this plain form (input_ids, attention_mask, labels).
- `Shared` (`packing.collate_shared`): each pair one `[prompt | chosen | rejected]` stretch, the prompt run
  once, optionally several pairs packed per row, under a custom 4D mask; only for models that pass
  `shared_layout_unsupported` (sliding windows and attention chunks included; recurrent layers, alibi models
  and kernels that ignore the mask or fail on training's batches are refused).

The shared layout's mask reaches a Hugging Face model as the 4D `attention_mask` that transformers 5 passes
through untouched (`masking_utils._preprocess_mask_arguments` returns any 4D tensor or BlockMask as is): a
boolean (R, 1, L, L) mask for sdpa, an additive float one for eager, a BlockMask for flex_attention
(forward only on CPU in torch 2.13: "FlexAttention does not support backward on CPU"; training with it
needs a GPU, untested here). Since that mask reaches every layer unchanged, it carries the sliding window
itself (Mistral, Phi-3, Starcoder2) and Llama-4's attention chunks, and a model whose layers differ (Gemma
2/3/4, Qwen2 with `max_window_layers`, Llama-4's chunked and global layers) gets one mask per layer type, the
dict its forward takes (`layer_spans`). A model that ignores such a mask (flash-attention's kernels take
padding or packed sequences, not two responses branching off one prompt; alibi models compute their biases
from a 2D mask), or whose layers carry a state along the row (LFM2's convolutions, Qwen3.5's linear
attention, the Mamba family), would silently compute wrong log-probs: `shared_layout_unsupported` refuses the
recurrent ones by name and checks the others on pairs longer than the model's widest window or chunk and on
a batch shaped as training's, and `prefix_sharing: auto` keeps such a model on the padded layout.

A third layout (e.g. flash-attention's variable-length packing on GPUs) is one more `Layout` subclass here,
added to `LAYOUTS`. `choose_layout` turns the data module's `prefix_sharing` / `packing` settings (each
true, false or "auto") into a layout and the reason for it.
"""

from typing import Callable, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from dpo_lightning.data.batches import collate_pairs
from dpo_lightning.data.packing import PROMPT, SHARED, collate_shared, shared_pairs
from dpo_lightning.utils.hf import agree, base_causal_lm, decoder, evaluating

Switch = bool | Literal["auto"]
# Why the models being trained cannot take a layout (checked also on a batch of it shaped as training's), or None.
Probe = Callable[["Layout", dict | None], str | None]


# Every name a layout's `statistics` may return: training logs each as a mean over the steps since the last log.
STATISTICS = ("pairs_per_row",)


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

    def padded_counts(self, batch: dict) -> Tensor:
        """(rows, positions) how many times the padded layout runs each of the batch's tokens: 0 on padding, 2 on a
        shared batch's prompts (the weights of a statistic over tokens that must not depend on the layout: the MoE
        router loss)."""
        raise NotImplementedError

    def statistics(self, batch: dict) -> dict[str, Tensor]:
        """The layout's own per-batch metrics (logged as `<stage>/<name>`)."""
        return {}

    def unsupported(self, model: nn.Module, batch: dict | None = None) -> str | None:
        """Why `model` would not give the padded layout's outputs on this layout, or on `batch` (one of its
        batches, shaped as training's), or None."""
        return None


class Padded(Layout):
    name = "padded"

    def collate(self, rows: list[dict], pad_token_id: int) -> dict:
        return {**collate_pairs(rows, pad_token_id), "layout": self.name}

    def outputs(self, call: Callable[..., Tensor], lm: nn.Module, batch: dict) -> Tensor:
        return call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    def token_mask(self, batch: dict) -> Tensor:
        return batch["attention_mask"].bool()

    def padded_counts(self, batch: dict) -> Tensor:
        return batch["attention_mask"]


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

    def padded_counts(self, batch: dict) -> Tensor:
        real = batch["pair_ids"] >= 0
        return real.long() + (real & (batch["branch_ids"] == PROMPT)).long()  # a prompt runs once per response there

    def statistics(self, batch: dict) -> dict[str, Tensor]:
        return {"pairs_per_row": batch["pairs_per_row"].float().mean()}  # how densely packing fills the rows

    def unsupported(self, model: nn.Module, batch: dict | None = None) -> str | None:
        return shared_layout_unsupported(model, batch)


# --- The shared layout's attention: the mask, and the read-back into the padded layout. ---

class Span(NamedTuple):
    """Which earlier keys a kind of attention layer sees: fewer than `window` positions back (sliding window), and
    in the same `chunk` of positions (Llama-4's chunked attention: positions 0..c-1, c..2c-1, ...). None: all."""

    window: int | None = None
    chunk: int | None = None


def visible(batch: dict[str, Tensor], b: Tensor, q: Tensor, k: Tensor, span: Span = Span()) -> Tensor:
    """Whether token q of row b attends to token k: earlier (or itself), same pair, a prompt or same-branch
    token, and within the layer's `span`.

    The span counts position ids, not columns: a rejected token's distance to the prompt, and its chunk, are then
    the ones in its padded row (transformers' `sliding_window_overlay`: key index > query index - window;
    `chunked_overlay`: key index // chunk == query index // chunk), however long the chosen response between
    them. Written on index tensors so the same rule builds a dense mask (broadcast indices) and a FlexAttention
    `mask_mod`. Padding (pair -1, branch 0, position 0) sees the padding before it, so no query's row is all masked.
    """
    pair_ids, branch_ids, positions = batch["pair_ids"], batch["branch_ids"], batch["position_ids"]
    key_branch = branch_ids[b, k]
    seen = ((k <= q) & (pair_ids[b, q] == pair_ids[b, k])
            & ((key_branch == PROMPT) | (key_branch == branch_ids[b, q])))
    if span.window is not None:
        seen = seen & (positions[b, q] - positions[b, k] < span.window)
    if span.chunk is not None:
        seen = seen & (positions[b, q] // span.chunk == positions[b, k] // span.chunk)
    return seen


def layer_spans(config) -> dict[str, Span]:
    """Each kind of attention layer of `config` (its text config, for a multimodal model) and its `Span`.

    Models with `layer_types` (Gemma 2/3/4, Qwen2/3, Cohere2, Llama-4...) name each layer's kind and take one
    mask per kind; Mistral, Phi-3, Starcoder2 and Mixtral slide in every layer when `sliding_window` is set, as
    a model with only `attention_chunk_size` chunks every layer (transformers' `create_masks_for_generate`).

    Example:
        Gemma 2 (alternating, window 4096) -> {"full_attention": Span(), "sliding_attention": Span(4096)};
        Llama-4 Scout -> {"chunked_attention": Span(chunk=8192), "full_attention": Span()};
        Mistral-7B-v0.1 -> {"": Span(4096)};  Llama -> {"": Span()}
    """
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    kinds = getattr(config, "layer_types", None)
    if not kinds:
        return {"": Span(window) if window is not None else Span(chunk=chunk)}
    return {kind: Span(window if kind == "sliding_attention" else None, chunk if kind == "chunked_attention" else None)
            for kind in sorted(set(kinds))}


def attention_mask(lm: nn.Module, batch: dict[str, Tensor]) -> Tensor | BlockMask | dict:
    """The shared layout's mask in the form `lm`'s attention implementation takes a custom 4D mask.

    sdpa (and the default): boolean (R, 1, L, L), True = attend. eager adds its mask to the scores: 0 or
    the dtype's minimum, as transformers' own `eager_mask`. flex_attention: a BlockMask of the same rule.
    A model whose layers differ in their span gets one mask per kind of layer, `{layer type: mask}`, the
    form its forward takes (a single 4D mask would reach every layer unchanged).
    """
    spans = layer_spans(lm.config)
    masks = {span: _mask(lm, batch, span) for span in set(spans.values())}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {kind: masks[span] for kind, span in spans.items()}


def _mask(lm: nn.Module, batch: dict[str, Tensor], span: Span) -> Tensor | BlockMask:
    """`visible` with one span as the mask `lm`'s attention implementation takes."""
    n_rows, length = batch["pair_ids"].shape
    device = batch["pair_ids"].device
    implementation = lm.config._attn_implementation
    if implementation == "flex_attention":
        def mask_mod(b, h, q, k):
            return visible(batch, b, q, k, span)

        return create_block_mask(mask_mod, n_rows, None, length, length, device=device)
    index = torch.arange(length, device=device)
    rows = torch.arange(n_rows, device=device)[:, None, None]
    mask = visible(batch, rows, index[None, :, None], index[None, None, :], span)[:, None]  # (R, 1, L, L)
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

ATTENTION_KINDS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})  # what `layer_spans` masks


def shared_layout_unsupported(model: nn.Module, batch: dict | None = None) -> str | None:
    """Why the shared layout would not reproduce the padded layout's outputs on `model`, or None when it does.

    The first of three checks that fails gives the reason:
    1. Structure: layers of a kind the mask does not model (LFM2's `conv` layers; the `linear_attention` of
       Qwen3.5, Qwen3-Next and the Mamba family). Their state runs along the row, from one response into the
       next, whatever the mask; in a randomly initialised model its effect can be too small for the numeric
       checks (5e-5 in LFM2's float32 log-probs), so they are refused by name.
    2. A probe batch: two pairs packed into one row, the first with a prompt as long as the model's widest
       sliding window or attention chunk, so its responses reach past it: a mask without the span (or a model
       that ignores the mask on those layers) moves their states.
    3. `batch`, a shared batch shaped as training's (the data module collates its first training rows; the scorer
       passes the first batch it meets): a kernel that fails or computes wrong only at training's rows and lengths
       (flex_attention's CPU code generation in torch 2.13 on two-row batches) is caught there.
    Checks 2 and 3 compare the decoder's hidden states at each response's scoring positions with the padded
    layout's on the same pairs (right-padded: the model builds its own mask), with `utils.hf.agree` in the
    model's dtype (as `logps.lean_unsupported`). A mask the model ignores lets a rejected token see the chosen
    response or the other pair: that moves the hidden states by half their largest value or more, even in a
    randomly initialised model, so it is caught in any dtype. Ignored position ids shift the rejected response,
    which moves a random Llama's states by under 1% (its attention is nearly uniform): caught in float32, below
    bf16's tolerance.
    """
    lm = base_causal_lm(model)
    reason = _layers_unsupported(lm)
    for probe in (_probe_batch(lm), batch):
        if reason is None and probe is not None:
            reason = _shared_differs(lm, probe)
    return reason


def _layers_unsupported(lm: nn.Module) -> str | None:
    """Check 1 of `shared_layout_unsupported`: layer kinds other than attention (transformers names every recurrent
    and convolutional kind in `layer_types`: `linear_attention` for the Mamba family too, `conv`, `hybrid`...)."""
    kinds = sorted(set(getattr(lm.config.get_text_config(), "layer_types", None) or ()) - ATTENTION_KINDS)
    if kinds:
        return (f"{type(lm).__name__} has {'/'.join(kinds)} layers, which take no mask the shared layout builds (a "
                "recurrent state or convolution runs along the row, from one response into the next)")
    return None


def _probe_batch(lm: nn.Module) -> dict[str, Tensor]:
    """Check 2 of `shared_layout_unsupported`: two pairs in one row, the first reaching past every span."""
    vocab = lm.config.get_text_config().vocab_size
    reach = max((n for span in layer_spans(lm.config).values() for n in span if n), default=0)

    def tokens(start: int, n: int) -> list[int]:
        return [(start + 7 * i) % vocab for i in range(n)]

    rows = [{"prompt_input_ids": tokens(3, 3 + reach), "chosen_input_ids": tokens(11, 2),
             "rejected_input_ids": tokens(5, 4)},
            {"prompt_input_ids": tokens(17, 2), "chosen_input_ids": tokens(2, 3), "rejected_input_ids": tokens(9, 1)}]
    return collate_shared(rows, 0, packing=True, max_tokens_per_row=reach + 30)  # both pairs in one row


def _shared_differs(lm: nn.Module, batch: dict) -> str | None:
    """Why the decoder's states on the shared `batch` differ from the padded layout's on its pairs, or None."""
    device = next(lm.parameters()).device
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    pairs = shared_pairs(batch)
    padded = {k: v.to(device) for k, v in collate_pairs(pairs, 0).items()}
    run = decoder(lm)
    try:  # in eval mode (no dropout) and float32 compute, so the two runs are comparable
        with evaluating(lm), torch.no_grad(), torch.autocast(device.type, enabled=False):
            shared = padded_states(run(**shared_inputs(lm, batch), use_cache=False).last_hidden_state, batch)
            states = run(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                         use_cache=False).last_hidden_state  # (2B, T, D)
    except Exception as error:  # an attention implementation that rejects a 4D mask, or fails at these shapes
        rows, length = batch["input_ids"].shape
        said = (str(error).strip().splitlines() or [""])[0][:200]
        return (f"{type(lm).__name__} cannot take the shared layout's 4D attention mask on a batch of {rows} rows "
                f"of {length} tokens ({type(error).__name__}: {said})")
    responses = [(row["prompt_input_ids"], row[side]) for side in ("chosen_input_ids", "rejected_input_ids")
                 for row in pairs]
    for k, (prompt, response) in enumerate(responses):  # scoring positions: the last prompt token's, the response's
        expected = states[k, len(prompt) - 1 : len(prompt) + len(response)].float()
        if not agree(shared[k, : len(response) + 1].float(), expected, lm.dtype):
            return (f"{type(lm).__name__} with attn_implementation={lm.config._attn_implementation!r} ignores "
                    "the shared layout's attention mask or position ids (its hidden states differ from the "
                    "padded layout's)")
    return None


LAYOUTS: dict[str, type[Layout]] = {layout.name: layout for layout in (Padded, Shared)}


def layout_of(batch: dict) -> Layout:
    """The layout `batch` declares (`batch["layout"]`); a batch that declares none is `Padded`."""
    return LAYOUTS[batch.get("layout", Padded.name)]()


def refusal(layout: Layout, reason: str) -> ValueError:
    """Our error for a layout the model cannot take: the setting, the reason, the fix."""
    return ValueError(f"{layout.flag}: {reason}. Set {layout.flag} false (or auto, which picks the padded layout "
                      "for this model), or load the model with an attention implementation that takes a 4D mask "
                      "(sdpa, eager)")


def choose_layout(prefix_sharing: Switch, packing: Switch, max_tokens_per_row: int | None, probe: Probe | None,
                  sample: list[dict] | None = None, pad_token_id: int = 0) -> tuple[Layout, str]:
    """The layout for the data module's settings, and why (printed at fit start).

    `auto` (the default of both): the shared layout, packed, when `probe` finds that the models being
    trained reproduce the padded layout's outputs on it (the fastest exact layout: each prompt runs once,
    rows carry no padding but at their end), on its own probe and on `sample` (tokenized training pairs, a
    batch's worth) collated by that layout, as training will; else the padded layout. `True` insists: a model
    that fails the probe is refused with `refusal`. `probe` is None without a model to ask (a data module used
    on its own): `auto` is then padded, which every model takes.
    """
    wanted = prefix_sharing is True or packing is True
    if prefix_sharing is False:
        return Padded(), "--data.prefix_sharing false"
    shared = Shared(packing is not False, max_tokens_per_row if packing is not False else None)
    if probe is None:
        if wanted:
            return shared, "--data.prefix_sharing / --data.packing true (no model attached to check)"
        return Padded(), "--data.prefix_sharing auto: no model attached to check the shared layout on"
    reason = probe(shared, shared.collate(sample, pad_token_id) if sample else None)
    if reason and wanted:
        raise refusal(shared, reason)
    if reason:
        return Padded(), f"--data.prefix_sharing auto: {reason}"
    how = "packed" if shared.packing else "one pair per row"
    return shared, (f"prefix sharing, {how} (--data.prefix_sharing {prefix_sharing}, --data.packing {packing}): "
                    "the model's outputs on it match the padded layout's")
