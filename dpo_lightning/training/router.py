"""The load-balancing loss of a mixture-of-experts router: TRL's `router_aux_loss_coef`, logged as `aux_loss`.

An MoE layer sends each token to `top_k` of its E experts; left alone, the router collapses onto a few of them.
The Switch Transformer's auxiliary loss (Fedus et al. 2021, arXiv:2101.03961, eq. 4-6), over the router logits
of every MoE layer l at once, as transformers' `load_balancing_loss_func` computes it:

    f_e = sum_{l,t} w_t [e in top_k(p_lt)] / sum_{l,t} w_t     (the share of routing slots expert e receives)
    P_e = sum_{l,t} w_t p_lte / sum_{l,t} w_t                   (its mean router probability)
    aux = E * sum_e f_e P_e,        p_lt = softmax(router logits of token t in layer l),  (E,) each

with w_t = 1 on a token and 0 on padding in the padded layout. The shared layout runs a prompt once where the
padded layout runs it twice (before each response, with the same router logits, the model being causal): its
prompt tokens weigh 2 (`Layout.padded_counts`), which gives the padded batch's value exactly, in any layout.

As TRL's DPOTrainer (1.16) adds it: `router_aux_loss_coef` None takes the model config's coefficient (Mixtral's
0.001, OLMoE's 0.01), 0 turns the loss off, a coefficient on a model that returns no router logits (its config has
no `output_router_logits`: no mixture of experts, or one such as Gemma 4's whose router transformers keeps inside)
is an error; only the policy's forward computes it, never the reference's; each batch adds coef x aux to its loss. That batch term is weighted as the DPO loss is (Lightning divides it by the
accumulated batches, DDP averages the ranks' gradients): nothing is scaled by the number of ranks. `aux_loss` is
logged as the mean over the step's (or split's) batches on every rank.

The router logits come from the decoder (a hook passes it `output_router_logits=True`), not from the causal LM's
own `aux_loss`, which reads the attention mask as a 2D padding mask (a shared batch's is 4D). Whether a model's
own loss is this one is checked once (`RouterLoss.unsupported`) against its own forward: Llama-4's causal LM, for
one, returns no `aux_loss` at all.
"""

import contextlib
import math
from numbers import Real
from typing import Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dpo_lightning.utils.hf import agree, base_causal_lm, decoder, evaluating

RouterLogits = tuple[Tensor, ...]  # one (rows * positions, E) tensor per MoE layer


class RouterLoss:
    """The policy's load-balancing loss: its coefficient, and the loss of one forward's router logits.

    Args:
        coef: the loss's weight in the objective (`router_aux_loss_coef`, resolved by `router_loss`).
        top_k: experts per token (the config's `num_experts_per_tok`).
    """

    def __init__(self, coef: float, top_k: int):
        self.coef, self.top_k = coef, top_k

    def __call__(self, router_logits: RouterLogits, counts: Tensor) -> Tensor:
        """aux (a float32 scalar) of a forward's router logits, each token counted `counts` (rows, positions) times."""
        weights, experts = counts.reshape(-1, 1).float(), router_logits[0].shape[-1]  # (rows * positions, 1), E
        slots = probs = total = 0.0
        for logits in router_logits:
            p = logits.reshape(-1, experts).float().softmax(-1)  # (rows * positions, E)
            chosen = torch.zeros_like(p).scatter_(-1, p.topk(self.top_k, dim=-1).indices, 1.0)  # [e in top_k(p)]
            slots, probs, total = slots + (chosen * weights).sum(0), probs + (p * weights).sum(0), total + weights.sum()
        return experts * (slots / total * probs / total).sum()  # E * sum_e f_e P_e

    @contextlib.contextmanager
    def capture(self, model: nn.Module) -> Iterator[list[RouterLogits]]:
        """Within the block, each forward of `model`'s decoder returns its router logits, appended to the list."""
        run, routed = decoder(base_causal_lm(model)), []

        def ask(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "output_router_logits": True}

        handles = [run.register_forward_pre_hook(ask, with_kwargs=True),
                   run.register_forward_hook(lambda module, args, output: routed.append(output.router_logits))]
        try:
            yield routed
        finally:
            for handle in handles:
                handle.remove()

    def unsupported(self, model: nn.Module) -> str | None:
        """Why this loss is not `model`'s own (its forward's `aux_loss` with `output_router_logits`), or None.

        Two rows of 8 tokens, the second padded after 5, so the padding must be left out as the model leaves it.
        """
        lm = base_causal_lm(model)
        ids = (torch.arange(3, 19, device=next(lm.parameters()).device) % lm.config.get_text_config().vocab_size)
        ids, mask = ids.view(2, 8), torch.ones(2, 8, dtype=torch.long, device=ids.device)
        mask[1, 5:] = 0
        try:
            with evaluating(lm), torch.no_grad(), self.capture(lm) as routed:
                own = lm(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False).aux_loss
                ours = self(routed[0], mask)
        except Exception as error:  # a decoder that returns no router logits, say
            return f"reading {type(lm).__name__}'s router logits from its decoder failed ({error!r})"
        if own is None:
            return f"{type(lm).__name__}'s forward computes no load-balancing loss (its aux_loss is None)"
        if not agree(ours, own.float(), lm.dtype):
            return (f"{type(lm).__name__}'s load-balancing loss is not the Switch Transformer's (its aux_loss "
                    f"{own.item():.6g} on a probe batch, this package's {ours.item():.6g})")
        return None


def router_loss(model: nn.Module, coef: float | None) -> RouterLoss | None:
    """The policy's `RouterLoss` for `DPOModule(router_aux_loss_coef=coef)`, or None where it adds nothing.

    None takes the config's coefficient; a model whose own loss is not this one then trains without it, with a
    warning (as its own forward would: Llama-4's computes none). A coefficient set on such a model, or on one that
    returns no router logits, is refused by name, and so is one that is not a finite number >= 0.
    """
    lm = base_causal_lm(model)
    # numbers.Real takes numpy's floats; a bool is no weight, and NaN would reach the loss and be blamed on the data.
    if coef is not None and not (isinstance(coef, Real) and not isinstance(coef, bool) and 0 <= coef < math.inf):
        raise ValueError(f"--model.router_aux_loss_coef {coef!r}: must be a finite number >= 0 (0 turns the "
                         "router's load-balancing loss off)")
    coef = None if coef is None else float(coef)
    config, flag = lm.config.get_text_config(), f"--model.router_aux_loss_coef {coef}"
    moe = hasattr(config, "output_router_logits")
    if coef and not moe:
        raise ValueError(f"{flag}: {type(lm).__name__} is not a mixture-of-experts model that returns its router "
                         "logits (its config has no output_router_logits), so it has no router loss to weight: "
                         "remove the setting")
    weight = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
    if not moe or not weight:
        return None
    router = RouterLoss(weight, getattr(config, "num_experts_per_tok", 1))
    reason = router.unsupported(lm)
    if reason and coef is not None:
        raise ValueError(f"{flag}: {reason}. Set it to 0 to train without it")
    if reason:
        rank_zero_warn(f"--model.router_aux_loss_coef (unset: the config's {weight}): {reason}; training without "
                       "it, as the model's own forward does")
        return None
    return router
