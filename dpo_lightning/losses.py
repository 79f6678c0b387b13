"""DPO losses as pure functions of log-probabilities, and the one function that makes those log-probs.

Every loss takes four `(B,)` tensors of response log-probs -- policy chosen, policy rejected, reference
chosen, reference rejected -- plus plain floats, and returns `(losses, chosen_rewards, rejected_rewards)`,
each `(B,)`, per pair; rewards are detached. The caller reduces. Nothing here knows about models,
trainers or devices, so each loss is tested against values worked out by hand (tests/test_losses.py).

References:
- DPO: Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290.
- cDPO (label smoothing): Mitchell 2023, "A note on DPO with noisy preferences".
- IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", arXiv:2310.12036.
- Hinge (SLiC): Zhao et al. 2023, "SLiC-HF", arXiv:2305.10425.
"""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Label value of positions that carry no loss: the default `ignore_index` of F.cross_entropy and of
# Hugging Face models, so our labels can be fed to either unchanged.
IGNORE_INDEX = -100

LossOutput = tuple[Tensor, Tensor, Tensor]


def _rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """Implicit DPO reward r = beta * (log pi(y|x) - log ref(y|x)), Eq. 5 of arXiv:2305.18290."""
    return (beta * (policy_logps - ref_logps)).detach()


def _h(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
       ref_rejected_logps: Tensor) -> Tensor:
    """h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x)), the logit every loss shares."""
    return (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)


def sigmoid_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO loss: Rafailov et al. 2023, arXiv:2305.18290, Eq. 7 (label smoothing: the cDPO note).

    h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))
    loss = -(1 - e) * log sigmoid(beta * h) - e * log sigmoid(-beta * h),   e = label_smoothing

    `e` is the assumed probability that a preference label is flipped (cDPO); `e = 0` is plain DPO.
    Log-probs are sums over response tokens. Every input is (B,). Returns losses (B,) and detached
    rewards beta * (log pi - log ref), each (B,).
    """
    h = _h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta), _rewards(
        policy_rejected_logps, ref_rejected_logps, beta)


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, beta: float = 0.1) -> LossOutput:
    """Hinge loss of SLiC (Zhao et al. 2023, arXiv:2305.10425, Eq. 3) on the DPO logit, as TRL's `hinge`.

    loss = max(0, 1 - beta * h),   h as in `sigmoid_loss`

    `1 / beta` is the margin h must reach before a pair stops contributing. Log-probs are sums over
    response tokens. Every input is (B,). Returns losses (B,) and detached rewards, each (B,).
    """
    h = _h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * h)
    return losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta), _rewards(
        policy_rejected_logps, ref_rejected_logps, beta)


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1) -> LossOutput:
    """IPO loss: Azar et al. 2023, arXiv:2310.12036, Eq. 17, with beta as the paper's tau.

    loss = (h - 1 / (2 * beta))^2,   h as in `sigmoid_loss`

    Unlike DPO, IPO regresses h to a finite target instead of pushing it to infinity. Following TRL,
    the log-probs are MEANS over response tokens, not sums (see `LENGTH_NORMALIZED`). Every input is
    (B,). Returns losses (B,) and detached rewards, each (B,).
    """
    h = _h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta), _rewards(
        policy_rejected_logps, ref_rejected_logps, beta)


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
}

# Losses whose log-probs are averaged over response tokens rather than summed (TRL's convention).
LENGTH_NORMALIZED = frozenset({"ipo"})


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
    # Off by one: logits[:, t] scores token t + 1, so drop the last logit and the first label.
    logits = logits[:, :-1].float()  # (N, T-1, V)
    labels = labels[:, 1:]  # (N, T-1)
    mask = labels != IGNORE_INDEX
    # gather needs a valid index everywhere; masked positions are zeroed out below anyway.
    safe_labels = labels.masked_fill(~mask, 0)
    label_logits = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    # log softmax at the label only: logit - logsumexp, without keeping a (N, T-1, V) log-softmax.
    token_logps = label_logits - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)
