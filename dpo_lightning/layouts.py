"""Batch layouts: how tokenized pairs become a batch, how a model runs on it, and which models may take it.

The collator names the layout in the batch (`batch["layout"]`) and everything downstream asks
`layout_of(batch)`: the log-prob code (logps.py) for the model's outputs in the padded layout, the throughput
callback for the non-padding tokens, the module for the layout's own metrics and its probe. Nothing guesses
the layout from which keys a batch happens to hold.

- `Padded` (`batches.collate_pairs`): prompt + chosen and prompt + rejected rows, right-padded. Every model
  takes it. A batch that names no layout is this plain form (input_ids, attention_mask, labels).
- `Shared` (`packing.collate_shared`): each pair one `[prompt | chosen | rejected]` stretch, the prompt run
  once, optionally several pairs packed per row, under a custom 4D mask; only for models that pass
  `packing.shared_layout_unsupported` (sliding windows included; alibi models and kernels that ignore the
  mask are refused).

A third layout (e.g. flash-attention's variable-length packing on GPUs) is one more `Layout` subclass here,
added to `LAYOUTS`. `choose_layout` turns the data module's `prefix_sharing` / `packing` settings (each
true, false or "auto") into a layout and the reason for it.
"""

from typing import Callable, ClassVar, Literal

from torch import Tensor, nn

from dpo_lightning.batches import collate_pairs
from dpo_lightning.packing import SHARED, collate_shared, padded_states, shared_inputs, shared_layout_unsupported

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
