"""DPO-family losses as pure functions of log-probabilities, by name (`LOSSES`), with what each needs.

Every loss takes four `(B,)` tensors of response log-probs -- policy chosen, policy rejected, reference
chosen, reference rejected -- plus keyword options, and returns `(losses, chosen_rewards, rejected_rewards)`,
each `(B,)`, per pair; rewards are detached. The caller reduces. Nothing here knows about models,
trainers or devices, so each loss is tested against values worked out by hand (tests/test_losses.py)
and, where TRL has it, against TRL (tests/test_losses_trl.py).

Symbols: u = pi(y|x) / ref(y|x), so log u_w and log u_l are the chosen and rejected log-ratios;
h = log u_w - log u_l is the DPO logit; r = beta * log u is the implicit reward (DPO Eq. 5).
Log-probs are sums over response tokens, except for the losses in `LENGTH_NORMALIZED`, which take
per-token means; the losses in `REFERENCE_FREE` ignore the reference inputs. The functions live in `dpo.py`
(against a reference; `sigmoid_loss` is DPO) and `reference_free.py`; `bind_losses` checks and binds their options.

References (arXiv ids):
- DPO 2305.18290 (Rafailov et al.); cDPO: Mitchell 2023, "A note on DPO with noisy preferences".
- f-DPO 2309.16240 (Wang et al., "Beyond Reverse KL"); IPO 2310.12036 (Azar et al.);
  SLiC-HF 2305.10425 (Zhao et al.); Robust DPO 2403.00409 (Chowdhury et al.);
  EXO 2402.00856 (Ji et al.); NCA 2402.05369 (Chen et al.); BCO 2404.04656 (Jung et al.);
  SPPO 2405.00675 (Wu et al.); AOT 2406.05882 (Melnyk et al.); APO 2408.06266 (D'Oosterlinck et al.);
  DiscoPOP 2406.08414 (Lu et al.); length-normalized DPO: Tulu 3, 2411.15124 (Lambert et al.);
  DPOP 2402.13228 (Pal et al.); R-DPO 2403.19159 (Park et al.); SimPO 2405.14734 (Meng et al.);
  ORPO 2403.07691 (Hong et al.); CPO 2401.08417 (Xu et al.).
"""

import functools
import inspect
from typing import Callable

from dpo_lightning.training.losses.dpo import (LossOutput, aot_loss, aot_pair_loss, apo_down_loss, apo_zero_loss,
                                               bco_pair_loss, discopop_loss, dpop_loss, exo_pair_loss, hinge_loss,
                                               ipo_loss, nca_pair_loss, rdpo_loss, robust_loss, sigmoid_loss,
                                               sigmoid_norm_loss, sppo_hard_loss)
from dpo_lightning.training.losses.reference_free import cpo_loss, orpo_loss, sft_loss, simpo_loss


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_pair": aot_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "dpop": dpop_loss,
    "rdpo": rdpo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "cpo": cpo_loss,
    "sft": sft_loss,
}

# Losses whose log-probs are per-token means rather than sums; the caller divides by token counts.
# TRL's conventions: its DPOTrainer averages for ipo, sigmoid_norm and sft, its CPOTrainer for simpo
# and its ORPOTrainer for orpo.
LENGTH_NORMALIZED = frozenset({"ipo", "sigmoid_norm", "simpo", "orpo", "sft"})

# Losses that never read the reference log-probs: the caller loads no reference and passes zeros.
REFERENCE_FREE = frozenset({"simpo", "orpo", "cpo", "sft"})

# Losses with no implicit reward (they return zeros): the logged rewards come from another loss of a combination.
REWARDLESS = frozenset({"sft"})

# Loss options that only some losses take (`DPOModule`'s arguments): None means "not set", and a set option that no
# selected loss declares is an error rather than a silent no-op (`bind_losses`).
LOSS_OPTIONS = ("label_smoothing", "simpo_gamma", "dpop_lambda", "rdpo_alpha", "discopop_tau",
                "f_divergence_type", "f_alpha_divergence_coef")

# The keyword options each loss takes (beta, its config options, the batch's lengths or bco_pair's shift),
# read once here so that callers bind them at construction instead of inspecting a loss at every step.
LOSS_ARGS: dict[str, frozenset[str]] = {
    name: frozenset(arg for arg, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY)
    for name, fn in LOSSES.items()}


def bind_losses(loss_types: list[str], loss_weights: list[float], beta: float,
                options: dict) -> dict[str, Callable[..., LossOutput]]:
    """Each of `loss_types` with `beta` and the `options` it declares bound, once, after checking them.

    The errors name the config flags (`--model.<option>`): an unknown loss, one weight per loss, an option
    that no selected loss takes (a silent no-op otherwise), and the options' ranges.
    """
    unknown = [name for name in loss_types if name not in LOSSES]
    if unknown or not loss_types:
        raise ValueError(f"--model.loss_type {unknown or loss_types} is not one of {sorted(LOSSES)}")
    if len(set(loss_types)) != len(loss_types):
        raise ValueError(f"--model.loss_type {loss_types} names a loss twice: give each once, with its weight in "
                         "--model.loss_weights")
    if len(loss_weights) != len(loss_types):
        raise ValueError(f"--model.loss_weights has {len(loss_weights)} entries for {len(loss_types)} loss types "
                         f"{loss_types}: give one weight per loss")
    for option in options:
        if not any(option in LOSS_ARGS[name] for name in loss_types):
            users = sorted(name for name in LOSSES if option in LOSS_ARGS[name])
            raise ValueError(f"--model.{option} is set but loss_type {loss_types} ignores it; it is used by "
                             f"{users}: remove it or pick one of those losses")
    if beta <= 0:
        raise ValueError(f"--model.beta must be > 0, got {beta}")
    if not 0.0 <= options.get("label_smoothing", 0.0) < 0.5:
        raise ValueError(f"--model.label_smoothing must be in [0, 0.5), got {options['label_smoothing']}")
    if "exo_pair" in loss_types and options.get("label_smoothing") == 0:
        raise ValueError("--model.label_smoothing must be > 0 for exo_pair (its loss is infinite at 0): "
                         "leave it unset for the paper's 1e-3")
    return {name: functools.partial(LOSSES[name], beta=beta, **{k: v for k, v in options.items()
                                                                if k in LOSS_ARGS[name]}) for name in loss_types}
