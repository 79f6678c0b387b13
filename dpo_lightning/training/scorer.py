"""`Scorer`: the one log-prob path of a run, for the policy and the reference alike (model, batch) -> `Scores`.

It picks the path once (logps.py: lean, or the full logits), refuses a batch whose layout a model cannot take
(`Layout.unsupported`, data/layouts.py), and, for the policy of a mixture-of-experts model, gives the batch's
router load-balancing loss with its log-probs, from the same forward (router.py).
"""

import contextlib
from typing import NamedTuple

from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dpo_lightning.data.layouts import Layout, layout_of, refusal
from dpo_lightning.training.logps import lean_logps, naive_logps
from dpo_lightning.training.router import RouterLoss


class Scores(NamedTuple):
    """What `Scorer` gives for N rows (chosen rows first): the summed response log-probs, the mean logits and the
    response lengths, each (N,), as `logps.naive_logps` returns them, and the batch's MoE router loss (a scalar;
    None unless asked for with a `router.RouterLoss`)."""

    logps: Tensor
    mean_logits: Tensor
    n_tokens: Tensor
    aux_loss: Tensor | None = None


class Scorer:
    """The one log-prob path of a run, for the policy and the reference alike: (model, batch) -> `Scores`.

    Lean (`lean_logps`) or from the full logits (`naive_logps`), chosen once at construction. A batch whose layout
    a model cannot take is refused with our message (`Layout.unsupported`, asked once per model and layout, on the
    first batch of it), so a model that ignores the layout's mask never trains on wrong log-probs, a reference
    loaded later included.

    Args:
        lean: the lean path; False for the full logits.
        chunk_size: response tokens per output-head call on the lean path.
    """

    def __init__(self, lean: bool, chunk_size: int = 256):
        self.lean, self.chunk_size = lean, chunk_size
        self._reasons: dict[tuple[int, str], str | None] = {}  # (id(model), layout name) -> why not, or None
        self._on_a_batch: set[tuple[int, str]] = set()  # the keys checked on a batch of their layout too

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], router: RouterLoss | None = None) -> Scores:
        """`model`'s scores of `batch`; with `router` (the policy's, in training and validation) its router loss."""
        layout = layout_of(batch)
        reason = self.unsupported(model, layout, batch)
        if reason:
            raise refusal(layout, reason)
        with router.capture(model) if router else contextlib.nullcontext() as routed:
            scores = lean_logps(model, batch, self.chunk_size) if self.lean else naive_logps(model, batch)
        return Scores(*scores, router(routed[0], layout.padded_counts(batch)) if router else None)

    def unsupported(self, model: nn.Module, layout: Layout, batch: dict | None = None) -> str | None:
        """Why `model` would not give the padded layout's outputs on `layout`, or None: checked once per model and
        layout, and once more on the first `batch` of it given (a batch shaped as training's) if the first check
        had none (the data module's of a stream, or of online prompts). Not again once the model's weights are
        sharded (FSDP2 shards them after the data module's check, at setup): the check calls the decoder alone,
        which would meet the shards of weights its own unit does not gather (a head tied to the embedding)."""
        key = (id(model), layout.name)
        if key not in self._reasons or (batch is not None and key not in self._on_a_batch
                                        and not any(isinstance(p, DTensor) for p in model.parameters())):
            self._reasons[key] = layout.unsupported(model, batch)
            if batch is not None:
                self._on_a_batch.add(key)
        return self._reasons[key]

    def full_logits(self) -> "Scorer":
        """The same scorer on the full-logits path, for a model the lean path does not fit."""
        scorer = Scorer(False, self.chunk_size)
        scorer._reasons, scorer._on_a_batch = self._reasons, self._on_a_batch
        return scorer
