"""Preference metrics: what `DPOModule` logs under `train/` and `val/`, with TRL's names.

Every metric is a torchmetrics object holding sums and counts, so a split's value is the exact mean
over all of its pairs (or tokens), whatever the batch size, the number of DDP ranks (torchmetrics
syncs the sums; each validation pair is on one rank only, `resume.EvalSampler`) or the gradient
accumulation (training metrics are reduced at each log, over the steps since the last: `LogWindow`).
`loss` is the loss as trained (`objective.total_loss` over the split's or steps' sums); when it has several
terms, each loss type's own (unweighted) mean is logged as `loss/<loss_type>`. A mixture-of-experts policy's router load-balancing loss
(router.py) is a statistic of a whole batch, not a sum over pairs: `aux_loss` is the mean of the batches' values
(TRL's `aux_loss`), and so is its term in `loss`.
"""

import copy
import functools
import warnings
from typing import Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from dpo_lightning.training.objective import Objective, ObjectiveOutput, total_loss

PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "lengths/chosen", "lengths/rejected")
TOKEN_METRICS = ("logits/chosen", "logits/rejected", "nll_loss")


class MarginLengthCorrelation(Metric):
    """Pearson correlation of the reward margin with the length difference |y_w| - |y_l| over a split.

    A strong positive value says the policy is winning pairs by length (the bias R-DPO targets).
    Kept as sums so it is exact across batches and ranks; 0 when either side never varies (for
    example, chosen and rejected always the same length), where the correlation is undefined.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("n", "sx", "sy", "sxx", "syy", "sxy"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, margins: Tensor, length_differences: Tensor) -> None:
        x, y = margins.double(), length_differences.double()
        self.n += x.numel()
        self.sx += x.sum()
        self.sy += y.sum()
        self.sxx += (x * x).sum()
        self.syy += (y * y).sum()
        self.sxy += (x * y).sum()

    def compute(self) -> Tensor:
        cov = self.sxy - self.sx * self.sy / self.n
        var_x, var_y = self.sxx - self.sx ** 2 / self.n, self.syy - self.sy ** 2 / self.n
        if var_x <= 0 or var_y <= 0:
            return torch.tensor(0.0)
        return (cov / torch.sqrt(var_x * var_y)).float()


class TotalLoss(Metric):
    """The loss as trained over a split or a step: the mean pair loss + rpo_alpha x the chosen responses' NLL per token
    + router_aux_loss_coef x the batches' mean router loss.

    The RPO term is token-weighted (a cross-entropy over all chosen tokens, as TRL's `rpo_alpha`), the
    pair term a mean over pairs, so neither is a mean of batch values: both are kept as sums.
    """

    def __init__(self, rpo_alpha: float = 0.0, router_aux_loss_coef: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.rpo_alpha, self.router_aux_loss_coef = rpo_alpha, router_aux_loss_coef
        for name in ("pair_loss", "pairs", "chosen_nll", "chosen_tokens", "aux_loss", "batches"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pair_losses: Tensor, chosen_nll: Tensor, chosen_tokens: Tensor, aux_loss: Tensor | None = None):
        """pair_losses (B,); chosen_nll (B,) each chosen response's summed NLL over its chosen_tokens (B,) tokens;
        aux_loss the batch's router loss."""
        self.pair_loss += pair_losses.double().sum()
        self.pairs += pair_losses.numel()
        self.chosen_nll += chosen_nll.double().sum()
        self.chosen_tokens += chosen_tokens.double().sum()
        if aux_loss is not None:
            self.aux_loss += aux_loss.double()
            self.batches += 1

    def compute(self) -> Tensor:
        return total_loss(self.pair_loss, self.pairs, self.chosen_nll, self.chosen_tokens, self.rpo_alpha,
                          self.aux_loss / self.batches.clamp(min=1), self.router_aux_loss_coef).float()


class StepLogs(L.Callback):
    """Each optimizer step's log holds what that step logged, and nothing from an earlier step.

    Lightning keeps the last value of every name logged with `on_step=True` for the rest of the epoch, and sends it
    to the loggers again at a later step that does not log the name: a step with nothing defined to log (a skipped
    step, an online step whose prompts all tied: no loss, no log-prob, no gradient) would show the previous step's
    values in metrics.csv. At each optimizer step's start those values are set aside (Lightning's `has_reset`,
    as its own reset does; there is no public way), and a name logged again is logged afresh.
    `DPOModule.configure_callbacks` adds it to every run.
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            for result in trainer._results.values():
                if result.meta.on_step and not result.meta.on_epoch:
                    result.has_reset = True


def make_metrics(objective: Objective, sync_on_compute: bool = True, extra: tuple[str, ...] = ()) -> nn.ModuleDict:
    """One stage's metrics for `objective`; `nll_loss` where the loss has an NLL term (rpo_alpha or sft), `aux_loss`
    where it has a router loss; a mean for each name in `extra` (online DPO's, `update_means`). Slashes are fine in
    ModuleDict keys (dots are not).

    `sync_on_compute=False` for metrics computed at every step: `compute_all` then syncs them at once.
    """
    loss_types, rpo_alpha, router = list(objective.weights), objective.rpo_alpha, objective.router_aux_loss_coef
    parts = tuple(f"loss/{name}" for name in loss_types) if len(loss_types) > 1 or rpo_alpha else ()
    with_nll = bool(rpo_alpha) or "sft" in loss_types
    names = (PAIR_METRICS[1:] + TOKEN_METRICS[:2] + (("nll_loss",) if with_nll else ()) + parts
             + (("aux_loss",) if router else ()))
    # A NaN value stays in its mean, as in the sums of `loss` and the correlation (the default, "warn", drops it: a
    # split's value would silently be the mean over its other pairs; nonfinite.py names the rows). NaN as the value
    # that replaces a NaN keeps it, and keeps the weights, which torchmetrics' "disable" replaces by ones.
    mean = functools.partial(MeanMetric, nan_strategy=float("nan"), sync_on_compute=sync_on_compute)
    metrics = nn.ModuleDict({"loss": TotalLoss(rpo_alpha, router, sync_on_compute=sync_on_compute)})
    metrics.update({name: mean() for name in names})
    metrics["rewards/margin_length_corr"] = MarginLengthCorrelation(sync_on_compute=sync_on_compute)
    metrics.update({name: mean() for name in extra})
    return metrics


def compute_all(metrics: nn.ModuleDict, all_reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Every metric's value over all ranks, with one all-reduce instead of one per metric state; a metric no rank
    updated (an online step whose prompts all tied has no pair: no loss, no log-prob) is left out, not NaN.

    Every state here is a sum (`dist_reduce_fx="sum"`), so summing them stacked equals syncing each.
    """
    states = [(metric, name) for metric in metrics.values() for name in metric.metric_state]
    values = [getattr(metric, name).double() for metric, name in states]
    updated = [torch.tensor(float(metric.update_count > 0), dtype=torch.float64, device=values[0].device)
               for metric in metrics.values()]
    summed = all_reduce_sum(torch.stack(values + updated))
    for (metric, name), value in zip(states, summed):
        setattr(metric, name, value.to(getattr(metric, name).dtype))
    with warnings.catch_warnings():  # a rank that had no pair computes the other ranks' sums, set just above
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
        return {name: metric.compute() for (name, metric), count in zip(metrics.items(), summed[len(states):])
                if count}


class LogWindow(nn.Module):
    """The training metrics since the last log: each optimizer step's metrics are added in when the step ends (a
    skipped step's are dropped) and read out, over all ranks with one all-reduce, at the steps Lightning logs
    (`utils.steps.logs_after`: every `log_every_n_steps`, TRL's `logging_steps`). So a logged value is the mean
    over every pair of the steps since the last log, as TRL logs, and a step that is not logged costs no
    collective and no `self.log` (Lightning's bookkeeping of a logged value is most of a tiny model's logging time).

    Args:
        step: the metrics one step updates (`make_metrics`); the window holds a copy of them.
    """

    def __init__(self, step: nn.ModuleDict):
        super().__init__()
        self.metrics = copy.deepcopy(step)

    def add(self, step: nn.ModuleDict, keep: bool = True) -> None:
        """Add the step's metrics into the window (`keep`) or drop them, and reset them for the next step.

        Every state is a sum (`compute_all`), and so is the count of updates that tells a metric no rank updated.
        """
        for name, metric in step.items():
            if keep and metric.update_count:
                into = self.metrics[name]
                for state in metric.metric_state:
                    setattr(into, state, getattr(into, state) + getattr(metric, state))
                into._update_count += metric.update_count  # torchmetrics' merge_state leaves the count alone
            metric.reset()

    def read(self, all_reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """The window's values over all ranks (`compute_all`), and an empty window after."""
        values = compute_all(self.metrics, all_reduce_sum)
        for metric in self.metrics.values():
            metric.reset()
        return values


class Displacement(nn.Module):
    """The likelihood displacement warning: once, at the first optimizer step where the chosen responses' log-prob,
    averaged over the step's pairs (over all ranks and micro-batches), falls more than `threshold` nats below the
    reference's (log ref(y_w) - log pi(y_w), summed over each response's tokens).

    Checked at every step, whatever the logging interval: one all-reduce of two numbers a step, only where it is set.
    """

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold, self.warned, self.drop = threshold, False, MeanMetric(sync_on_compute=False)

    def update(self, policy_logps: Tensor, ref_logps: Tensor) -> None:
        """Add one micro-batch's pairs: the policy's and reference's summed log-probs, chosen rows then rejected."""
        thaw(self.drop)
        self.drop.update((ref_logps - policy_logps).chunk(2)[0].detach())

    def check(self, step: int, all_reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Warn (once) if the step's mean drop is past the threshold; then start the next step's."""
        drop = compute_all(nn.ModuleDict({"drop": self.drop}), all_reduce_sum).get("drop")
        self.drop.reset()
        if drop is not None and not self.warned and drop.item() > self.threshold:
            self.warned = True
            rank_zero_warn(f"step {step}: the chosen responses' log-prob is {drop.item():.2f} nats below the "
                           f"reference's (threshold {self.threshold}): likelihood displacement; consider rpo_alpha, a "
                           "larger beta or a smaller learning rate")


def update_means(metrics: nn.ModuleDict, values: dict[str, Tensor]) -> None:
    """Add each of `values` (k,) to the mean metric of its name, weight 1 each; an empty one adds nothing."""
    for name, value in values.items():
        if value.numel():
            thaw(metrics[name])
            metrics[name].update(value.to(metrics[name].device))  # the metric's device, not the value's


def update_metrics(metrics: nn.ModuleDict, out: ObjectiveOutput, logps: Tensor, mean_logits: Tensor,
                   n_tokens: Tensor) -> None:
    """Add one batch to every metric in `metrics` (see `batch_values` for the arguments)."""
    for name, args in batch_values(out, logps, mean_logits, n_tokens).items():
        if name in metrics:
            thaw(metrics[name])
            metrics[name].update(*args)


def thaw(metric: Metric) -> None:
    """Replace the metric's inference tensors with normal ones, outside inference mode (in it, nothing to do).

    `trainer.validate` runs under `torch.inference_mode`, so the states its epoch-end reset makes are inference
    tensors, which the in-place updates of a later `trainer.fit` (its validation runs under `no_grad`) may not
    touch: a notebook's validate-then-fit would stop with "Inplace update to inference tensor outside
    InferenceMode". A clone made outside inference mode is a normal tensor with the same value.
    """
    if torch.is_inference_mode_enabled():
        return
    for name in metric.metric_state:
        value = getattr(metric, name)
        if isinstance(value, Tensor) and value.is_inference():
            setattr(metric, name, value.clone())


def batch_values(out: ObjectiveOutput, logps: Tensor, mean_logits: Tensor,
                 n_tokens: Tensor) -> dict[str, tuple[Tensor, ...]]:
    """Each metric's update arguments for one batch: (value, weight) for means, (margins, Δlength) for the correlation.

    Args:
        out: the batch's objective: its pair losses (B,), each loss type's (B,), and the rewards (B,) of the first loss.
        logps, mean_logits, n_tokens: (2B,) summed log-probs, mean logit and token count per sequence,
            chosen rows first.
    """
    chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
    # A tie (policy == reference, as at step 0) counts as half right: the accuracy of a coin flip.
    # TRL counts ties as wrong, which reads 0.0 at step 0 instead of 0.5.
    margins = chosen_rewards - rejected_rewards
    accuracy = (margins > 0).float() + 0.5 * (margins == 0).float() + margins * 0  # a NaN margin: a NaN accuracy
    one = torch.ones_like(chosen_rewards)
    (chosen_logps, rejected_logps), (chosen_logits, rejected_logits) = logps.chunk(2), mean_logits.chunk(2)
    chosen_tokens, rejected_tokens = n_tokens.float().chunk(2)
    batch_aux = () if out.aux_loss is None else (out.aux_loss,)  # a mixture of experts' router loss
    values = {
        "loss": (out.pair_losses, -chosen_logps, chosen_tokens, *batch_aux),
        "rewards/chosen": (chosen_rewards, one),
        "rewards/rejected": (rejected_rewards, one),
        "rewards/accuracies": (accuracy, one),
        "rewards/margins": (margins, one),
        "logps/chosen": (chosen_logps, one),
        "logps/rejected": (rejected_logps, one),
        "lengths/chosen": (chosen_tokens, one),
        "lengths/rejected": (rejected_tokens, one),
        # Token-weighted: the split's value is the mean over every response token, not over rows.
        "logits/chosen": (chosen_logits, chosen_tokens),
        "logits/rejected": (rejected_logits, rejected_tokens),
        "rewards/margin_length_corr": (margins, chosen_tokens - rejected_tokens),
        "nll_loss": (-chosen_logps / chosen_tokens, chosen_tokens),  # per token, over all chosen tokens
        **{f"loss/{name}": (part, one) for name, part in out.losses.items()},
        **({"aux_loss": (out.aux_loss, one[0])} if batch_aux else {}),  # one value per batch
    }
    return {name: tuple(arg.detach() for arg in args) for name, args in values.items()}
