"""The DPO-family losses against values worked out by hand in each test (`sequence_logps`: test_logps.py).

Pure tensor math: no model, no tokenizer, no network. Inputs are chosen so the arithmetic is round; the
derivation is in a comment and the expected value comes from the closed form with `math`. Identities,
float64 gradient checks and detached rewards cover every loss in `LOSSES`.
"""

import inspect
import math

import pytest
import torch

from dpo_lightning.training.losses import (LOSS_ARGS, LOSSES, REFERENCE_FREE, aot_loss, aot_pair_loss, apo_down_loss,
                                  apo_zero_loss, bco_pair_loss, cpo_loss, discopop_loss, dpop_loss, exo_pair_loss,
                                  hinge_loss, ipo_loss, nca_pair_loss, orpo_loss, rdpo_loss, robust_loss, sft_loss,
                                  sigmoid_loss, sigmoid_norm_loss, simpo_loss, sppo_hard_loss)

# Inputs that make h = (pc - pr) - (rc - rr) = [0, 10, 20], so beta * h = [0, 1, 2] at beta = 0.1.
PC, PR = torch.tensor([-1.0, -5.0, -1.0]), torch.tensor([-1.0, -15.0, -21.0])
ZEROS = torch.zeros(3)
LN2, LN3 = math.log(2), math.log(3)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), the closed forms below are written with it."""
    return math.log1p(math.exp(x))


def call(loss_type, pc, pr, rc, rr, **options):
    """LOSSES[loss_type] with token counts 3 and 5 for the losses that declare them."""
    declared = inspect.signature(LOSSES[loss_type]).parameters
    lengths = {"chosen_lengths": torch.full_like(pc, 3.0), "rejected_lengths": torch.full_like(pc, 5.0)}
    return LOSSES[loss_type](pc, pr, rc, rr, **options, **{k: v for k, v in lengths.items() if k in declared})


def test_sigmoid_loss_matches_hand_computed():
    # -log sigmoid(x) = log(1 + e^-x) at x = beta * h = [0, 1, 2]
    losses, chosen_rewards, rejected_rewards = sigmoid_loss(PC, PR, ZEROS, ZEROS, beta=0.1)
    expected = torch.tensor([math.log(2), math.log1p(math.exp(-1)), math.log1p(math.exp(-2))])
    torch.testing.assert_close(losses, expected)
    # rewards = beta * (policy - reference): 0.1 * [-1, -5, -1] and 0.1 * [-1, -15, -21]
    torch.testing.assert_close(chosen_rewards, torch.tensor([-0.1, -0.5, -0.1]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.1, -1.5, -2.1]))


def test_sigmoid_label_smoothing_matches_cdpo_formula():
    # e = 0.2 at beta * h = 1: 0.8 * log(1 + e^-1) + 0.2 * log(1 + e^1)
    losses, _, _ = sigmoid_loss(PC[1:2], PR[1:2], ZEROS[:1], ZEROS[:1], beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(losses, torch.tensor([0.8 * math.log1p(math.exp(-1)) + 0.2 * math.log1p(math.e)]))


def test_swapping_chosen_and_rejected_equals_flipping_the_smoothing():
    a, _, _ = sigmoid_loss(PC, PR, ZEROS, ZEROS, beta=0.1, label_smoothing=0.3)
    b, _, _ = sigmoid_loss(PR, PC, ZEROS, ZEROS, beta=0.1, label_smoothing=0.7)
    torch.testing.assert_close(a, b)


def test_reference_enters_only_through_h():
    # Moving both reference log-probs by the same amount leaves h, hence the loss, unchanged.
    ref = torch.tensor([-3.0, -2.0, -7.0])
    a, _, _ = sigmoid_loss(PC, PR, ref, ref, beta=0.1)
    b, _, _ = sigmoid_loss(PC, PR, ZEROS, ZEROS, beta=0.1)
    torch.testing.assert_close(a, b)


def test_f_divergence_reverse_kl_is_plain_dpo():
    # reverse KL: f'(u) = log u + 1, so f'(u_w) - f'(u_l) = h and the loss is Eq. 7 at beta * h = [0, 1, 2].
    losses, _, _ = sigmoid_loss(PC, PR, ZEROS, ZEROS, beta=0.1, f_divergence_type="reverse_kl")
    torch.testing.assert_close(losses, torch.tensor([LN2, softplus(-1), softplus(-2)]))


@pytest.mark.parametrize("f_divergence_type, coef, log_u_l, beta, expected", [
    # forward KL: f'(u) = -1/u; u_w = 1, u_l = 2: -1 + 1/2 = -1/2; beta = 2: -log sigmoid(-1) = log(1 + e)
    ("forward_kl", 0.5, LN2, 2.0, softplus(1)),
    # JS: f'(u) = log(2u / (1 + u)); u_w = 1: log 1 = 0; u_l = 1/3: log(1/2); difference log 2;
    # beta = 1: -log sigmoid(log 2) = -log(2/3)
    ("js_divergence", 0.5, -LN3, 1.0, math.log(3 / 2)),
    # alpha = 1/2: f'(u) = (1 - u^-1/2) / (1/2); u_w = 1: 0; u_l = 4: (1 - 1/2) * 2 = 1; beta = 1: log(1 + e)
    ("alpha_divergence", 0.5, math.log(4), 1.0, softplus(1)),
    # alpha = 1: f'(u) = 1 - 1/u, forward KL up to a constant: same -1/2 as the first case
    ("alpha_divergence", 1.0, LN2, 2.0, softplus(1)),
])
def test_f_divergences_match_hand_computed(f_divergence_type, coef, log_u_l, beta, expected):
    zero = torch.zeros(1)
    losses, chosen_rewards, _ = sigmoid_loss(zero, torch.tensor([log_u_l]), zero, zero, beta=beta,
                                             f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef)
    torch.testing.assert_close(losses, torch.tensor([expected]))
    torch.testing.assert_close(chosen_rewards, zero)  # rewards stay beta * log u whatever the divergence


def test_unknown_f_divergence_is_an_error():
    with pytest.raises(ValueError, match="f_divergence_type"):
        sigmoid_loss(PC, PR, ZEROS, ZEROS, f_divergence_type="kl")


def test_robust_loss_matches_hand_computed():
    # e = 1/4 at beta * h = 1: (3/4 * log(1 + e^-1) - 1/4 * log(1 + e)) / (1 - 1/2)
    losses, _, _ = robust_loss(PC[1:2], PR[1:2], ZEROS[:1], ZEROS[:1], beta=0.1, label_smoothing=0.25)
    torch.testing.assert_close(losses, torch.tensor([(0.75 * softplus(-1) - 0.25 * softplus(1)) / 0.5]))


def test_hinge_loss_matches_hand_computed():
    # max(0, 1 - beta * h) at beta * h = [0, 1, 2]
    losses, _, _ = hinge_loss(PC, PR, ZEROS, ZEROS, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.0, 0.0]))


def test_ipo_loss_matches_hand_computed_and_is_zero_at_its_target():
    # (h - 1 / (2 * beta))^2 with 1 / (2 * 0.1) = 5: h = [0, 10, 20] -> [25, 25, 225]
    losses, _, _ = ipo_loss(PC, PR, ZEROS, ZEROS, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([25.0, 25.0, 225.0]))
    at_target, _, _ = ipo_loss(torch.tensor([0.0]), torch.tensor([-5.0]), ZEROS[:1], ZEROS[:1], beta=0.1)
    torch.testing.assert_close(at_target, torch.tensor([0.0]))


def test_exo_pair_loss_matches_hand_computed():
    # beta * h = 0: q = (1/2, 1/2), p = (1 - e, e) = (0.8, 0.2):
    # KL(q || p) = 1/2 * log(0.5 / 0.8) + 1/2 * log(0.5 / 0.2) = 1/2 * log(25 / 16) = log(5 / 4)
    losses, _, _ = exo_pair_loss(PC[:1], PR[:1], ZEROS[:1], ZEROS[:1], beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(losses, torch.tensor([math.log(5 / 4)]))


def test_discopop_loss_matches_hand_computed():
    # z = beta * h = [0, 1, 2], m = sigmoid(z / 0.05): loss = (1 - m) * log(1 + e^-z) + m * e^-z
    losses, _, _ = discopop_loss(PC, PR, ZEROS, ZEROS, beta=0.1, discopop_tau=0.05)
    m = [1 / (1 + math.exp(-z / 0.05)) for z in (0, 1, 2)]
    expected = [(1 - m[z]) * softplus(-z) + m[z] * math.exp(-z) for z in (0, 1, 2)]
    torch.testing.assert_close(losses, torch.tensor(expected))
    # z = -100: m = sigmoid(-2000) underflows to 0 while e^100 overflows float32; the loss stays finite
    far, _, _ = discopop_loss(torch.tensor([-1000.0]), ZEROS[:1], ZEROS[:1], ZEROS[:1], beta=0.1)
    torch.testing.assert_close(far, torch.tensor([100.0]))


def test_sigmoid_norm_is_dpo_on_mean_log_probs():
    # The inputs are per-token means here; beta * h = [0, 1, 2] as for `sigmoid_loss`.
    losses, _, _ = sigmoid_norm_loss(PC, PR, ZEROS, ZEROS, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([LN2, softplus(-1), softplus(-2)]))


def test_dpop_loss_matches_hand_computed():
    # Pair 1: policy chosen -1 below reference 0: penalty 5 * max(0, 0 - (-1)) = 5; h = (-1 + 11) - 0 = 10;
    #         0.1 * (10 - 5) = 0.5.  Pair 2: policy chosen -1 above reference -2: penalty 0;
    #         h = (-1 + 12) - (-2 + 3) = 10; 0.1 * 10 = 1.
    pc, pr = torch.tensor([-1.0, -1.0]), torch.tensor([-11.0, -12.0])
    rc, rr = torch.tensor([0.0, -2.0]), torch.tensor([0.0, -3.0])
    losses, _, _ = dpop_loss(pc, pr, rc, rr, beta=0.1, dpop_lambda=5.0)
    torch.testing.assert_close(losses, torch.tensor([softplus(-0.5), softplus(-1)]))


def test_rdpo_loss_matches_hand_computed_and_credits_length_to_a_longer_chosen():
    # beta * h = 1; alpha * (|y_w| - |y_l|) = 0.1 * (20 - 10) = 1 -> logit 2; swapped lengths -> logit 0.
    longer_chosen, _, _ = rdpo_loss(PC[1:2], PR[1:2], ZEROS[:1], ZEROS[:1], beta=0.1, rdpo_alpha=0.1,
                                    chosen_lengths=torch.tensor([20.0]), rejected_lengths=torch.tensor([10.0]))
    shorter_chosen, _, _ = rdpo_loss(PC[1:2], PR[1:2], ZEROS[:1], ZEROS[:1], beta=0.1, rdpo_alpha=0.1,
                                     chosen_lengths=torch.tensor([10.0]), rejected_lengths=torch.tensor([20.0]))
    torch.testing.assert_close(longer_chosen, torch.tensor([softplus(-2)]))
    torch.testing.assert_close(shorter_chosen, torch.tensor([LN2]))


def test_aot_sorts_margins_before_comparing():
    # Policy margins [3, 1, 2], reference margins [0, 2, 1]: sorted [1, 2, 3] - [0, 1, 2] = [1, 1, 1]
    # (unsorted they would give [3, -1, 1]); beta = 1: log(1 + e^-1) for each quantile.
    losses, _, _ = aot_loss(torch.tensor([3.0, 1.0, 2.0]), ZEROS, torch.tensor([0.0, 2.0, 1.0]), ZEROS, beta=1.0)
    torch.testing.assert_close(losses, torch.full((3,), softplus(-1)))


def test_aot_pair_sorts_chosen_and_rejected_log_ratios_separately():
    # log u_w = [2, 0, 1], log u_l = [0, 1, -1]: sorted [0, 1, 2] - [-1, 0, 1] = [1, 1, 1]; beta = 1.
    losses, _, _ = aot_pair_loss(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, -1.0]), ZEROS, ZEROS, beta=1.0)
    torch.testing.assert_close(losses, torch.full((3,), softplus(-1)))


def test_nca_pair_loss_matches_hand_computed():
    # beta = 1. Pair 1: r_w = r_l = 0: -log(1/2) - 1/2 log(1/2) - 1/2 log(1/2) = 2 log 2.
    # Pair 2: r_w = log 3, r_l = -log 3: sigmoid(r_w) = 3/4, sigmoid(-r_w) = 1/4, sigmoid(-r_l) = 3/4:
    #         -log(3/4) - 1/2 log(1/4) - 1/2 log(3/4) = 3/2 log(4/3) + log 2.
    losses, _, _ = nca_pair_loss(torch.tensor([0.0, LN3]), torch.tensor([0.0, -LN3]), ZEROS[:2], ZEROS[:2], beta=1.0)
    torch.testing.assert_close(losses, torch.tensor([2 * LN2, 1.5 * math.log(4 / 3) + LN2]))


def test_bco_pair_loss_matches_hand_computed():
    # beta = 1, r_w = r_l = 1/2. Shift 1/2: -log sigmoid(0) - log sigmoid(0) = 2 log 2.
    # No shift: -log sigmoid(1/2) - log sigmoid(-1/2) = log(1 + e^-1/2) + log(1 + e^1/2).
    half = torch.tensor([0.5])
    shifted, _, _ = bco_pair_loss(half, half, ZEROS[:1], ZEROS[:1], beta=1.0, bco_reward_shift=0.5)
    unshifted, _, _ = bco_pair_loss(half, half, ZEROS[:1], ZEROS[:1], beta=1.0)
    torch.testing.assert_close(shifted, torch.tensor([2 * LN2]))
    torch.testing.assert_close(unshifted, torch.tensor([softplus(-0.5) + softplus(0.5)]))


def test_sppo_hard_loss_matches_hand_computed():
    # beta = 1/2, targets +-1/(2 beta) = +-1: (1 - 1)^2 + (-1 + 1)^2 = 0 and (3 - 1)^2 + (1 + 1)^2 = 8.
    losses, _, _ = sppo_hard_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0]), ZEROS[:2], ZEROS[:2], beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.0, 8.0]))


def test_apo_zero_loss_matches_hand_computed():
    # beta = 1: (1 - sigmoid(log u_w)) + sigmoid(log u_l); (0, 0): 1/2 + 1/2 = 1; (log 3, -log 3): 1/4 + 1/4.
    losses, _, _ = apo_zero_loss(torch.tensor([0.0, LN3]), torch.tensor([0.0, -LN3]), ZEROS[:2], ZEROS[:2], beta=1.0)
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.5]))


def test_apo_down_loss_matches_hand_computed():
    # beta = 1: sigmoid(log u_w) + 1 - sigmoid(h); (0, 0): 1/2 + 1/2 = 1; (log 3, log 3): 3/4 + 1/2 = 5/4.
    losses, _, _ = apo_down_loss(torch.tensor([0.0, LN3]), torch.tensor([0.0, LN3]), ZEROS[:2], ZEROS[:2], beta=1.0)
    torch.testing.assert_close(losses, torch.tensor([1.0, 1.25]))


def test_simpo_loss_matches_hand_computed():
    # Mean log-probs -1 and -3, beta = 2, gamma = 1: 2 * (-1 + 3) - 1 = 3 -> log(1 + e^-3);
    # rewards are beta * mean log-prob: -2 and -6.
    losses, chosen_rewards, rejected_rewards = simpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), ZEROS[:1],
                                                          ZEROS[:1], beta=2.0, simpo_gamma=1.0)
    torch.testing.assert_close(losses, torch.tensor([softplus(-3)]))
    torch.testing.assert_close((chosen_rewards, rejected_rewards), (torch.tensor([-2.0]), torch.tensor([-6.0])))


def test_orpo_loss_matches_hand_computed():
    # Mean probs P_w = 1/2, P_l = 1/4: odds 1 and 1/3, log odds ratio log 3; -log sigmoid(log 3) = log(4/3).
    # loss = -log P_w + lambda * log(4/3) = log 2 + 0.1 * log(4/3).
    losses, _, _ = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), ZEROS[:1], ZEROS[:1],
                             beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([LN2 + 0.1 * math.log(4 / 3)]))


def test_cpo_loss_matches_hand_computed():
    # Summed log-probs -4 and -6, beta = 1/2: -log sigmoid(1/2 * 2) = log(1 + e^-1);
    # NLL of the chosen response per token: 4 / 4 tokens = 1.
    losses, _, _ = cpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), ZEROS[:1], ZEROS[:1], beta=0.5,
                            chosen_lengths=torch.tensor([4.0]))
    torch.testing.assert_close(losses, torch.tensor([softplus(-1) + 1.0]))


def test_sft_loss_is_the_chosen_mean_nll_with_zero_rewards():
    losses, chosen_rewards, rejected_rewards = sft_loss(torch.tensor([-0.5, -2.0]), torch.tensor([-9.0, -9.0]),
                                                        ZEROS[:2], ZEROS[:2])
    torch.testing.assert_close(losses, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close((chosen_rewards, rejected_rewards), (ZEROS[:2], ZEROS[:2]))


@pytest.mark.parametrize("loss_type, options", [
    ("robust", {"label_smoothing": 0.0}),
    ("dpop", {"dpop_lambda": 0.0}),
    ("rdpo", {"rdpo_alpha": 0.0}),
    ("sigmoid_norm", {}),
    ("aot_pair", {}),  # h the same per pair and already sorted: [0, 10, 20] with log u_l = 0
])
def test_variants_reduce_to_plain_dpo(loss_type, options):
    # Label smoothing 0, lambda 0, alpha 0: the extra terms vanish and Eq. 7 remains, beta * h = [0, 1, 2].
    losses, _, _ = call(loss_type, PC - PR, ZEROS, ZEROS, ZEROS, beta=0.1, **options)
    torch.testing.assert_close(losses, torch.tensor([LN2, softplus(-1), softplus(-2)]))


def test_simpo_at_zero_margin_and_cpo_without_nll_are_dpo_with_no_reference():
    # gamma = 0: SimPO is Eq. 7 on its inputs; CPO is Eq. 7 plus the NLL (pc / 3 tokens, see `call`).
    dpo, _, _ = sigmoid_loss(PC, PR, ZEROS, ZEROS, beta=0.1)
    simpo, _, _ = simpo_loss(PC, PR, ZEROS, ZEROS, beta=0.1, simpo_gamma=0.0)
    cpo, _, _ = call("cpo", PC, PR, ZEROS, ZEROS, beta=0.1)
    torch.testing.assert_close(simpo, dpo)
    torch.testing.assert_close(cpo, dpo - PC / 3)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_reference_free_names_exactly_the_losses_that_ignore_the_reference(loss_type):
    # REFERENCE_FREE decides whether a reference is loaded at all: a loss left out of it wastes a model,
    # a loss wrongly in it trains against zeros.
    ref_c, ref_r = torch.tensor([-3.0, -2.0, -7.0]), torch.tensor([-4.0, -1.0, -0.5])
    with_ref, _, _ = call(loss_type, PC / 10, PR / 30, ref_c, ref_r)  # means in (-1, 0) for ORPO
    without, _, _ = call(loss_type, PC / 10, PR / 30, ZEROS, ZEROS)
    assert torch.equal(with_ref, without) == (loss_type in REFERENCE_FREE)


# The option names the module reads from its config or batch: a loss may declare only these.
OPTIONS = {"beta", "label_smoothing", "simpo_gamma", "dpop_lambda", "rdpo_alpha", "discopop_tau", "f_divergence_type",
           "f_alpha_divergence_coef", "bco_reward_shift", "chosen_lengths", "rejected_lengths"}


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_signature_is_four_log_probs_then_named_keyword_options(loss_type):
    params = list(inspect.signature(LOSSES[loss_type]).parameters.values())
    assert [p.name for p in params[:4]] == ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                            "ref_rejected_logps"]
    assert all(p.kind is p.KEYWORD_ONLY and p.name in OPTIONS for p in params[4:])
    assert LOSS_ARGS[loss_type] == {p.name for p in params[4:]}  # what the module binds, read once
    assert "beta" in {p.name for p in params}  # the module passes beta to every loss


# Log-probs away from every kink and tie: beta * h < 1 (hinge), no equal margins (aot), ref_c != pc (dpop),
# all below 0 (orpo reads them as log-probabilities of means).
GRAD_INPUTS = [torch.tensor(v, dtype=torch.float64) for v in
               ([-1.2, -2.3, -0.7], [-1.9, -0.8, -2.6], [-1.0, -2.0, -1.5], [-1.4, -1.1, -2.2])]
GRAD_CASES = [(name, {}) for name in sorted(LOSSES)] + [
    ("sigmoid", {"f_divergence_type": kind, "label_smoothing": 0.1})
    for kind in ("forward_kl", "js_divergence", "alpha_divergence")]


@pytest.mark.parametrize("loss_type, options", GRAD_CASES,
                         ids=[f"{n}-{o['f_divergence_type']}" if o else n for n, o in GRAD_CASES])
def test_gradients_match_finite_differences(loss_type, options):
    inputs = [t.clone().requires_grad_() for t in GRAD_INPUTS]
    assert torch.autograd.gradcheck(lambda *x: call(loss_type, *x, **options)[0], inputs)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_rewards_are_detached(loss_type):
    pc = PC.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = call(loss_type, pc / 10, PR / 30, ZEROS, ZEROS)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
