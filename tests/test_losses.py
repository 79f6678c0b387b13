"""The DPO losses and `sequence_logps` against values worked out by hand in each test.

Pure tensor math: no model, no tokenizer, no network.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_lightning.losses import IGNORE_INDEX, LOSSES, hinge_loss, ipo_loss, sequence_logps, sigmoid_loss

# Inputs that make h = (pc - pr) - (rc - rr) = [0, 10, 20], so beta * h = [0, 1, 2] at beta = 0.1.
PC, PR = torch.tensor([-1.0, -5.0, -1.0]), torch.tensor([-1.0, -15.0, -21.0])
ZEROS = torch.zeros(3)


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


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_rewards_are_detached(loss_type):
    pc = PC.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = LOSSES[loss_type](pc, PR, ZEROS, ZEROS, beta=0.1)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_sequence_logps_sums_labelled_tokens_only():
    # Vocab of 2. logits[t] = [ln 3, 0] gives p(0) = 3/4, [0, ln 3] gives p(1) = 3/4.
    # labels [-100, 0, 1, -100]: logits[0] scores label 0 (3/4), logits[1] scores label 1 (3/4);
    # logits[2] would score a masked position and logits[3] scores nothing.
    ln3 = math.log(3)
    logits = torch.tensor([[[ln3, 0.0], [0.0, ln3], [9.0, -9.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1, IGNORE_INDEX]])
    logps, n_tokens = sequence_logps(logits, labels)
    torch.testing.assert_close(logps, torch.tensor([2 * math.log(0.75)]))
    assert n_tokens.tolist() == [2]


def test_sequence_logps_equals_cross_entropy_and_is_float32_from_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    expected = -F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").sum(-1)
    logps, n_tokens = sequence_logps(logits, labels)
    torch.testing.assert_close(logps, expected)
    assert n_tokens.tolist() == [4, 4, 2]
    bf16_logps, _ = sequence_logps(logits.bfloat16(), labels)
    assert bf16_logps.dtype == torch.float32
