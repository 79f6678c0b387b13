"""The training objective in one place: a step's log-probs in, the loss to minimise and the logged rewards out.

`losses/` holds the losses as pure functions; `Objective` decides how a step's log-probs reach them:
1. each loss named by `loss_type` is bound once, with `beta` and its options (`losses.bind_losses`);
2. the losses in `LENGTH_NORMALIZED` take per-token means (summed log-probs / response lengths), the
   others sums;
3. each loss also gets the batch values its signature declares (`LOSS_ARGS`): the response lengths
   (R-DPO, CPO) and bco_pair's reward shift;
4. the loss is the mean over pairs of the losses' weighted sum, plus `rpo_alpha` x the chosen responses' NLL
   per token over the batch (token-weighted, as TRL's `rpo_alpha`), plus, for a mixture-of-experts policy,
   `router_aux_loss_coef` x the batch's router load-balancing loss (router.py, TRL's `aux_loss`): `total_loss`,
   which the logged `loss` (metrics.py) computes from a whole split's or step's sums too;
5. the rewards logged as `rewards/*` are those of the first loss type that has rewards (sft has none).

bco_pair's shift is the running mean of the implicit reward beta * log u of every trained sequence so far,
this optimizer step's included (TRL 0.x's delta). A training batch's sums wait in `_pending` until the
optimizer step is taken (`commit`); a skipped step drops them, so it leaves no trace in later batches.
The running sums are buffers, saved in checkpoints as `objective.bco_reward_sum` and `objective.bco_reward_count`.
"""

from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from dpo_lightning.training.losses import LENGTH_NORMALIZED, LOSS_ARGS, REFERENCE_FREE, REWARDLESS, bind_losses
from dpo_lightning.training.router import RouterLoss, router_loss

SumOverRanks = Callable[[Tensor], Tensor]


class ObjectiveOutput(NamedTuple):
    """loss: the scalar to minimise; pair_losses: (B,) each pair's weighted sum of the losses; losses: each loss
    type's per-pair losses (B,), unweighted; chosen_rewards, rejected_rewards: (B,) each, from the first loss type
    that has rewards; aux_loss: the batch's router load-balancing loss, unweighted (None without one)."""

    loss: Tensor
    pair_losses: Tensor
    losses: dict[str, Tensor]
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    aux_loss: Tensor | None = None


class Objective(nn.Module):
    """The losses of `loss_types`, weighted, with the RPO term and bco_pair's running mean.

    Args:
        loss_types: names from `losses.LOSSES`.
        loss_weights: one weight per loss type.
        beta: the losses' beta.
        rpo_alpha: weight of the chosen responses' per-token NLL (RPO, arXiv:2404.19733); None or 0: off.
        options: the loss options that are set (`label_smoothing`, ...), checked by `bind_losses`.
        reference_free: zero reference log-probs even for reference-based losses.
    """

    def __init__(self, loss_types: list[str], loss_weights: list[float], beta: float, rpo_alpha: float | None,
                 options: dict, reference_free: bool = False):
        super().__init__()
        self.loss_fns = bind_losses(loss_types, loss_weights, beta, options)
        self.weights = dict(zip(loss_types, loss_weights))
        self.beta, self.rpo_alpha = beta, rpo_alpha or 0.0
        self.needs_reference = not reference_free and not set(loss_types) <= REFERENCE_FREE
        self.reward_source = next((name for name in loss_types if name not in REWARDLESS), loss_types[0])
        self.register_buffer("bco_reward_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("bco_reward_count", torch.zeros((), dtype=torch.float64))
        self._pending: Tensor | None = None  # this optimizer step's (reward sum, count), not yet committed
        self.router: RouterLoss | None = None  # the policy's MoE load-balancing loss (`add_router_loss`)

    def add_router_loss(self, policy: nn.Module, router_aux_loss_coef: float | None) -> None:
        """Weigh `policy`'s router load-balancing loss into the objective, if it has one (`router.router_loss`)."""
        self.router = router_loss(policy, router_aux_loss_coef)

    @property
    def router_aux_loss_coef(self) -> float:
        return self.router.coef if self.router is not None else 0.0

    def forward(self, policy_logps: Tensor, ref_logps: Tensor | None, n_tokens: Tensor,
                sum_over_ranks: SumOverRanks | None = None, aux_loss: Tensor | None = None) -> ObjectiveOutput:
        """The objective of one batch.

        Args:
            policy_logps, ref_logps: summed response log-probs (2B,), chosen rows first; `ref_logps` None
                without a reference (zeros).
            n_tokens: response lengths (2B,).
            sum_over_ranks: given for a training batch: its rewards join bco_pair's running mean (summed
                over ranks with it), pending until `commit`. None for evaluation: the mean is only read.
            aux_loss: the batch's router load-balancing loss (`scorer.Scores.aux_loss`), with a `router`.
        """
        ref_logps = torch.zeros_like(policy_logps) if ref_logps is None else ref_logps
        chosen_tokens, rejected_tokens = n_tokens.float().chunk(2)
        batch_args = {"chosen_lengths": chosen_tokens, "rejected_lengths": rejected_tokens}
        if "bco_pair" in self.loss_fns:
            batch_args["bco_reward_shift"] = self._bco_reward_shift(policy_logps, ref_logps, sum_over_ranks)
        losses, rewards = {}, {}
        for name, loss_fn in self.loss_fns.items():
            policy, ref = (policy_logps / n_tokens, ref_logps / n_tokens) if name in LENGTH_NORMALIZED else (
                policy_logps, ref_logps)
            kwargs = {k: v for k, v in batch_args.items() if k in LOSS_ARGS[name]}
            losses[name], *rewards[name] = loss_fn(*policy.chunk(2), *ref.chunk(2), **kwargs)
        pair_losses = sum(self.weights[name] * part for name, part in losses.items())  # (B,)
        loss = total_loss(pair_losses.sum(), len(pair_losses), -policy_logps.chunk(2)[0].sum(), chosen_tokens.sum(),
                          self.rpo_alpha, aux_loss, self.router_aux_loss_coef)
        return ObjectiveOutput(loss, pair_losses, losses, *rewards[self.reward_source], aux_loss)

    def _bco_reward_shift(self, policy_logps: Tensor, ref_logps: Tensor,
                          sum_over_ranks: SumOverRanks | None) -> Tensor:
        """Running mean of the rewards beta * log u of every trained sequence so far, this step's included."""
        totals = torch.stack([self.bco_reward_sum, self.bco_reward_count])
        if sum_over_ranks is not None:
            rewards = (self.beta * (policy_logps - ref_logps)).detach().double()  # (2B,)
            batch = sum_over_ranks(torch.stack([rewards.sum(), rewards.new_tensor(rewards.numel())]))
            self._pending = batch if self._pending is None else self._pending + batch
            totals = totals + self._pending
        return (totals[0] / totals[1].clamp(min=1)).float()

    def commit(self, taken: bool) -> None:
        """End of an optimizer step: its pending bco_pair sums join the running ones if it was `taken`."""
        if taken and self._pending is not None:
            self.bco_reward_sum += self._pending[0]
            self.bco_reward_count += self._pending[1]
        self._pending = None


def total_loss(pair_loss_sum: Tensor, pairs: Tensor | int, chosen_nll_sum: Tensor, chosen_tokens: Tensor,
               rpo_alpha: float, aux_loss: Tensor | None = None, router_aux_loss_coef: float = 0.0) -> Tensor:
    """The loss as trained, from sums over pairs and tokens: the mean pair loss, plus `rpo_alpha` x the chosen
    responses' NLL per token (a cross-entropy over all chosen tokens, TRL's `rpo_alpha`), plus
    `router_aux_loss_coef` x the router's load-balancing loss (a batch's, or the mean of a step's or split's
    batches). A batch's loss (`Objective`) and the logged loss of a whole step or split (`metrics.TotalLoss`)
    are both this."""
    loss = pair_loss_sum / pairs
    if rpo_alpha:
        loss = loss + rpo_alpha * chosen_nll_sum / chosen_tokens
    return loss + router_aux_loss_coef * aux_loss if router_aux_loss_coef and aux_loss is not None else loss


def migrate_state_dict(state_dict: dict) -> None:
    """Rename, in place, the bco_pair buffers of checkpoints saved before `Objective` held them."""
    for name in ("bco_reward_sum", "bco_reward_count"):
        if name in state_dict:
            state_dict[f"objective.{name}"] = state_dict.pop(name)
