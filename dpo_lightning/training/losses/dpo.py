"""The DPO loss and its variants against a reference: pure functions of log-probabilities.

Every loss takes four `(B,)` tensors of response log-probs (policy chosen, policy rejected, reference chosen,
reference rejected) plus keyword options, and returns `(losses, chosen_rewards, rejected_rewards)`, each `(B,)`,
per pair; rewards are detached. Symbols: u = pi(y|x) / ref(y|x), so log u_w and log u_l are the chosen and
rejected log-ratios; h = log u_w - log u_l is the DPO logit; r = beta * log u is the implicit reward (DPO Eq. 5).
`sigmoid_loss` is DPO itself (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


LossOutput = tuple[Tensor, Tensor, Tensor]


def log_ratios(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """(log u_w, log u_l) with u = pi(y|x) / ref(y|x); the DPO logit is h = log u_w - log u_l."""
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def with_rewards(losses: Tensor, chosen: Tensor, rejected: Tensor, beta: float) -> LossOutput:
    """`losses` with the detached implicit rewards beta * chosen and beta * rejected (DPO Eq. 5)."""
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def logistic(z: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """-(1 - e) * log sigmoid(z) - e * log sigmoid(-z): Bradley-Terry NLL of logit z, labels flipped w.p. e."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _cap_exp(x: Tensor) -> Tensor:
    """exp(x) with x capped at log(dtype max), so it stays finite (TRL's `cap_exp`)."""
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max)))


def _f_prime(log_u: Tensor, f_divergence_type: str, alpha: float) -> Tensor:
    """f'(u) of f-DPO (arXiv:2309.16240, Table 1) from log u, less constants that cancel in f'(u_w) - f'(u_l)."""
    if f_divergence_type == "reverse_kl":  # f(u) = u log u: f'(u) = log u + 1
        return log_u
    if f_divergence_type == "forward_kl":  # f(u) = -log u: f'(u) = -1/u
        return -_cap_exp(-log_u)
    if f_divergence_type == "js_divergence":  # f'(u) = log(2u / (1 + u)) = log 2 + log sigmoid(log u)
        return F.logsigmoid(log_u)
    if f_divergence_type == "alpha_divergence":  # f'(u) = (1 - u^-alpha) / alpha
        return -_cap_exp(-alpha * log_u) / alpha
    raise ValueError(f"f_divergence_type must be reverse_kl, forward_kl, js_divergence or alpha_divergence, "
                     f"got {f_divergence_type!r}")


def sigmoid_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
                 f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """DPO loss: Rafailov et al. 2023, arXiv:2305.18290, Eq. 7 (label smoothing: the cDPO note, Eq. 3).

    h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x)) = log u_w - log u_l
    loss = -(1 - e) * log sigmoid(beta * h) - e * log sigmoid(-beta * h),   e = label_smoothing

    `e` is the assumed probability that a preference label is flipped (cDPO); `e = 0` is plain DPO.
    TRL 1.16 (the version tests/test_losses_trl.py checks) ignores `label_smoothing` in its sigmoid
    loss; we keep cDPO here on purpose.
    f-DPO (Wang et al. 2023, arXiv:2309.16240, Table 1) replaces h by f'(u_w) - f'(u_l):
    reverse_kl f'(u) = log u + 1 (plain DPO); forward_kl -1/u; js_divergence log(2u / (1 + u));
    alpha_divergence (1 - u^-a) / a with a = f_alpha_divergence_coef in (0, 1], the paper's alpha
    (a = 1 gives forward_kl, a -> 0 reverse_kl). TRL 1.16's code computes (u^(a-1) - 1) / (a - 1),
    i.e. the paper's alpha is 1 - a there; the two agree at TRL's default a = 0.5.
    Log-probs are sums over response tokens. Every input is (B,). Returns losses (B,) and detached
    rewards beta * log u, each (B,); the f-divergence does not change the rewards (as in TRL).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = _f_prime(log_u_w, f_divergence_type, f_alpha_divergence_coef) - _f_prime(
        log_u_l, f_divergence_type, f_alpha_divergence_coef)
    return with_rewards(logistic(beta * h, label_smoothing), log_u_w, log_u_l, beta)


def robust_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (rDPO): Chowdhury et al. 2024, arXiv:2403.00409, its de-biased (unbiased) DPO loss.

    loss = ((1 - e) * -log sigmoid(beta * h) - e * -log sigmoid(-beta * h)) / (1 - 2e),   h as in `sigmoid_loss`

    An unbiased estimate of the clean-label DPO loss when each label is flipped with probability
    e = label_smoothing, which must lie in [0, 0.5) (the paper suggests 0.1); e = 0 is plain DPO.
    Log-probs are sums over response tokens. Every input is (B,). Returns losses (B,) and detached
    rewards beta * log u, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z, e = beta * (log_u_w - log_u_l), label_smoothing
    losses = (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    return with_rewards(losses, log_u_w, log_u_l, beta)


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """Hinge loss of SLiC (Zhao et al. 2023, arXiv:2305.10425, Eq. 3) on the DPO logit, as TRL's `hinge`.

    loss = max(0, 1 - beta * h),   h as in `sigmoid_loss`

    `1 / beta` is the margin h must reach before a pair stops contributing. Log-probs are sums over
    response tokens. Every input is (B,). Returns losses (B,) and detached rewards, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return with_rewards(torch.relu(1 - beta * (log_u_w - log_u_l)), log_u_w, log_u_l, beta)


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """IPO loss: Azar et al. 2023, arXiv:2310.12036, Eq. 17, with beta as the paper's tau.

    loss = (h - 1 / (2 * beta))^2,   h as in `sigmoid_loss`

    Unlike DPO, IPO regresses h to a finite target instead of pushing it to infinity. Following TRL,
    the log-probs are MEANS over response tokens, not sums (see `LENGTH_NORMALIZED`), and so are the
    rewards, which TRL logs from sums. Every input is (B,). Returns losses (B,) and detached rewards.
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return with_rewards((log_u_w - log_u_l - 1 / (2 * beta)) ** 2, log_u_w, log_u_l, beta)


def exo_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO-pref: Ji et al. 2024, arXiv:2402.00856, Eq. 16 (K = 2), the reverse KL to smoothed labels.

    q_w = sigmoid(beta * h), q_l = sigmoid(-beta * h),   h as in `sigmoid_loss`
    loss = KL(q || p) = q_w * (log q_w - log(1 - e)) + q_l * (log q_l - log e),   e = label_smoothing

    `e` must lie in (0, 1): the default 1e-3 is the paper's (TRL requires it to be set). Log-probs are
    sums over response tokens. Every input is (B,). Returns losses (B,) and detached rewards, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (log_u_w - log_u_l)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))
    return with_rewards(losses, log_u_w, log_u_l, beta)


def discopop_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1, discopop_tau: float = 0.05) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): Lu et al. 2024, arXiv:2406.08414, Eq. 5.

    z = beta * h,   m = sigmoid(z / tau),   h as in `sigmoid_loss`, tau = discopop_tau
    loss = (1 - m) * -log sigmoid(z) + m * exp(-z)

    A blend of the logistic (DPO) and exponential losses; the paper's tau is 0.05. We compute
    m * exp(-z) as exp(-z + log sigmoid(z / tau)), which is the same number but stays finite where
    exp(-z) alone overflows. Log-probs are sums over response tokens. Every input is (B,).
    Returns losses (B,) and detached rewards, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (log_u_w - log_u_l)
    losses = torch.sigmoid(-z / discopop_tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
    return with_rewards(losses, log_u_w, log_u_l, beta)


def sigmoid_norm_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                      ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """Length-normalized DPO, as in Tulu 3 (Lambert et al. 2024, arXiv:2411.15124) and TRL's `sigmoid_norm`.

    loss = -log sigmoid(beta * h),   h as in `sigmoid_loss` but on per-token MEAN log-probs

    The DPO loss of Eq. 7 of arXiv:2305.18290 with each log-ratio divided by its response length, so
    long responses do not dominate h. Inputs are means (see `LENGTH_NORMALIZED`), and so are the
    rewards, which TRL logs from sums. Every input is (B,). Returns losses (B,) and detached rewards.
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return with_rewards(logistic(beta * (log_u_w - log_u_l)), log_u_w, log_u_l, beta)


def dpop_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, *, beta: float = 0.1, dpop_lambda: float = 50.0) -> LossOutput:
    """DPO-Positive (DPOP): Pal et al. 2024 (Smaug), arXiv:2402.13228, the DPOP loss.

    loss = -log sigmoid(beta * (h - lambda * max(0, log ref(y_w|x) - log pi(y_w|x)))),   lambda = dpop_lambda

    The penalty is zero while the policy keeps the chosen response at least as likely as the
    reference does, and otherwise grows with the drop, so DPO cannot raise h by lowering both
    responses. 50 is the lambda Smaug used; `dpop_lambda = 0` is plain DPO. Log-probs are sums over
    response tokens. Every input is (B,). Returns losses (B,) and detached rewards, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    penalty = dpop_lambda * torch.relu(-log_u_w)  # max(0, log ref(y_w) - log pi(y_w))
    return with_rewards(logistic(beta * (log_u_w - log_u_l - penalty)), log_u_w, log_u_l, beta)


def rdpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, *, beta: float = 0.1, rdpo_alpha: float = 0.05,
              chosen_lengths: Tensor, rejected_lengths: Tensor) -> LossOutput:
    """Length-regularized DPO (R-DPO): Park et al. 2024, arXiv:2403.19159, the R-DPO objective.

    loss = -log sigmoid(beta * h + alpha * (|y_w| - |y_l|)),   h as in `sigmoid_loss`, alpha = rdpo_alpha

    The paper penalizes length in the RLHF objective (reward minus alpha * |y|), so the implicit
    reward gains + alpha * |y| and the margin enters with a PLUS sign: when the chosen response is
    the longer one, part of the preference is credited to length and the pair pushes h less, which
    is what stops DPO from learning verbosity. `rdpo_alpha = 0` is plain DPO.
    Log-probs are sums over response tokens; `chosen_lengths` and `rejected_lengths` are (B,) token
    counts. Every input is (B,). Returns losses (B,) and detached rewards beta * log u, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    margin = rdpo_alpha * (chosen_lengths - rejected_lengths)
    return with_rewards(logistic(beta * (log_u_w - log_u_l) + margin), log_u_w, log_u_l, beta)


def _sorted_logistic(a: Tensor, b: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """AOT's loss: the cDPO loss of beta * (sort(a) - sort(b)), so quantile i of a meets quantile i of b."""
    return logistic(beta * (torch.sort(a).values - torch.sort(b).values), label_smoothing)


def aot_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, paired: Melnyk et al. 2024, arXiv:2406.05882, the logistic relaxation of its dominance loss.

    loss_i = cDPO loss of beta * (sort(log pi(y_w) - log pi(y_l))_i - sort(log ref(y_w) - log ref(y_l))_i)

    Asks the policy's distribution of margins to dominate the reference's (first-order stochastic
    dominance) by matching sorted quantiles within the batch; e as in `sigmoid_loss`. losses[i]
    belongs to the i-th quantile, not to pair i: only their mean is meaningful, and it needs B > 1.
    Log-probs are sums over response tokens. Every input is (B,). Returns losses (B,) and detached
    per-pair rewards beta * log u, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = _sorted_logistic(policy_chosen_logps - policy_rejected_logps, ref_chosen_logps - ref_rejected_logps,
                              beta, label_smoothing)
    return with_rewards(losses, log_u_w, log_u_l, beta)


def aot_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired: Melnyk et al. 2024, arXiv:2406.05882; TRL 0.x's `aot_pair`, `aot_unpaired` in TRL 1.16.

    loss_i = cDPO loss of beta * (sort(log u_w)_i - sort(log u_l)_i)

    Asks the distribution of chosen log-ratios to dominate that of rejected ones, pairing sorted
    quantiles, so it does not use which rejected response belongs to which chosen one. losses[i]
    belongs to the i-th quantile, not to pair i: only their mean is meaningful. Log-probs are sums
    over response tokens. Every input is (B,). Returns losses (B,) and detached per-pair rewards.
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return with_rewards(_sorted_logistic(log_u_w, log_u_l, beta, label_smoothing), log_u_w, log_u_l, beta)


def nca_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """NCA for pairs: Chen et al. 2024, "Noise Contrastive Alignment", arXiv:2402.05369 (K = 2, as TRL).

    r_w = beta * log u_w,   r_l = beta * log u_l
    loss = -log sigmoid(r_w) - 1/2 * log sigmoid(-r_w) - 1/2 * log sigmoid(-r_l)

    Each response's own reward is classified against the reference, so NCA raises the chosen
    response's likelihood itself rather than only the gap h. Log-probs are sums over response
    tokens. Every input is (B,). Returns losses (B,) and detached rewards r_w, r_l, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_w, r_l = beta * log_u_w, beta * log_u_l
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return with_rewards(losses, log_u_w, log_u_l, beta)


def bco_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1, bco_reward_shift: float | Tensor = 0.0
                  ) -> LossOutput:
    """BCO on pairs: Jung et al. 2024, "Binary Classifier Optimization", arXiv:2404.04656, with reward shift.

    r_w = beta * log u_w,   r_l = beta * log u_l,   delta = bco_reward_shift
    loss = -log sigmoid(r_w - delta) - log sigmoid(-(r_l - delta))

    A binary classifier with the chosen response as positive and the rejected as negative; delta is
    the running mean of all rewards seen so far, a constant here (no gradient flows through it): the
    caller keeps it, updating it with this batch's mean reward BEFORE the call, as TRL 0.x did.
    TRL 1.16 has no shift, which is `bco_reward_shift = 0`. Log-probs are sums over response
    tokens. Every input is (B,). Returns losses (B,) and detached rewards r_w, r_l, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * log_u_w - bco_reward_shift) - F.logsigmoid(bco_reward_shift - beta * log_u_l)
    return with_rewards(losses, log_u_w, log_u_l, beta)


def sppo_hard_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                   ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """SPPO, hard labels: Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 (Algorithm 1) with P(y_w) = 1, P(y_l) = 0.

    loss = (log u_w - 1 / (2 * beta))^2 + (log u_l + 1 / (2 * beta))^2

    The paper's eta is 1 / beta; its soft win probabilities come from a preference model, which the
    hard version replaces by the labels, as TRL's `sppo_hard` does. Log-probs are sums over response
    tokens (u = pi / ref, the paper's pi_theta / pi_t). Every input is (B,). Returns losses (B,) and
    detached rewards, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (log_u_w - 1 / (2 * beta)) ** 2 + (log_u_l + 1 / (2 * beta)) ** 2
    return with_rewards(losses, log_u_w, log_u_l, beta)


def apo_zero_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """APO-zero: D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv:2408.06266, Eq. 7.

    loss = (1 - sigmoid(beta * log u_w)) + sigmoid(beta * log u_l)

    For chosen responses better than the model's own: raise the chosen likelihood and lower the
    rejected one, each anchored to the reference. Log-probs are sums over response tokens. Every
    input is (B,). Returns losses (B,) and detached rewards, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = 1 - torch.sigmoid(beta * log_u_w) + torch.sigmoid(beta * log_u_l)
    return with_rewards(losses, log_u_w, log_u_l, beta)


def apo_down_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """APO-down: D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv:2408.06266, Eq. 8.

    loss = sigmoid(beta * log u_w) + (1 - sigmoid(beta * h)),   h = log u_w - log u_l

    For chosen responses worse than the model's own: lower both likelihoods, the rejected one more.
    Log-probs are sums over response tokens. Every input is (B,). Returns losses (B,) and detached
    rewards, each (B,).
    """
    log_u_w, log_u_l = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.sigmoid(beta * log_u_w) + 1 - torch.sigmoid(beta * (log_u_w - log_u_l))
    return with_rewards(losses, log_u_w, log_u_l, beta)
