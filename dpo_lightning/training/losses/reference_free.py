"""Losses that read no reference (SimPO, ORPO, CPO) and the SFT term: pure functions, as `dpo.py`'s.

They take the same four inputs and ignore the reference's (the caller loads no reference for them: `REFERENCE_FREE`
in `losses/__init__.py`); their rewards are beta times the policy's log-probs.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lightning.training.losses.dpo import LossOutput, logistic, with_rewards


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, *, beta: float = 0.1, simpo_gamma: float = 0.5,
               label_smoothing: float = 0.0) -> LossOutput:
    """SimPO: Meng et al. 2024, arXiv:2405.14734, Eq. 6 (label smoothing as TRL's CPOTrainer).

    loss = cDPO loss of (beta * (log pi(y_w|x) - log pi(y_l|x)) - gamma),   gamma = simpo_gamma

    Reference-free (the reference inputs are ignored): the implicit reward is beta times the
    per-token MEAN log-prob (inputs are means, see `LENGTH_NORMALIZED`), and gamma is a target
    margin. The paper uses beta in 2..10 and gamma / beta around 0.5, far from DPO's beta.
    Every input is (B,). Returns losses (B,) and detached rewards beta * mean log pi, each (B,).
    """
    losses = logistic(beta * (policy_chosen_logps - policy_rejected_logps) - simpo_gamma, label_smoothing)
    return with_rewards(losses, policy_chosen_logps, policy_rejected_logps, beta)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0; branching at -log 2 avoids cancellation (Maechler 2012, "log1mexp")."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """ORPO: Hong et al. 2024, arXiv:2403.07691, Eq. 6 (L_SFT + lambda * L_OR), with L_OR of Eq. 7.

    log odds(y|x) = log P(y|x) - log(1 - P(y|x)),   log P = per-token MEAN log-prob (Eq. 4)
    loss = -log P(y_w|x) - lambda * log sigmoid(log odds(y_w|x) - log odds(y_l|x)),   lambda = beta

    Reference-free (the reference inputs are ignored); beta plays lambda, as in TRL's ORPOConfig.
    The NLL term is the chosen response's mean token NLL, as in the paper; TRL's ORPOTrainer takes
    it over prompt and response tokens together. Every input is (B,), a mean (see
    `LENGTH_NORMALIZED`). Returns losses (B,) and detached rewards beta * mean log pi, each (B,).
    """
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        _log1mexp(policy_chosen_logps) - _log1mexp(policy_rejected_logps))
    losses = -policy_chosen_logps - beta * F.logsigmoid(log_odds)
    return with_rewards(losses, policy_chosen_logps, policy_rejected_logps, beta)


def cpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
             chosen_lengths: Tensor) -> LossOutput:
    """CPO: Xu et al. 2024, arXiv:2401.08417, L_prefer (Eq. 3) + L_NLL, as TRL's CPOTrainer (cpo_alpha = 1).

    loss = -(1 - e) * log sigmoid(beta * (log pi(y_w|x) - log pi(y_l|x))) - e * (same at -beta)
           - log pi(y_w|x) / |y_w|

    Reference-free (the reference inputs are ignored). The preference term uses SUMMED log-probs;
    the NLL term is the chosen response's mean token NLL, from `chosen_lengths` (B,) token counts.
    TRL averages that NLL over all chosen tokens of the batch, we per pair: equal when lengths are.
    Every input is (B,). Returns losses (B,) and detached rewards beta * log pi, each (B,).
    """
    losses = logistic(beta * (policy_chosen_logps - policy_rejected_logps), label_smoothing)
    return with_rewards(losses - policy_chosen_logps / chosen_lengths, policy_chosen_logps, policy_rejected_logps, beta)


def sft_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """Supervised fine-tuning term: the chosen response's NLL per token, for weighted combinations (MPO).

    loss = -log pi(y_w|x) / |y_w|

    Only the policy's chosen log-prob is used, a per-token MEAN (see `LENGTH_NORMALIZED`); `beta`
    is accepted, like every loss, and unused. TRL averages over all chosen tokens of the batch, we
    per pair: equal when lengths are. Every input is (B,). Returns losses (B,) and zero rewards.
    """
    zeros = torch.zeros_like(policy_chosen_logps)
    return -policy_chosen_logps, zeros, zeros
