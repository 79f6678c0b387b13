"""`DPOModule`: a Hugging Face causal LM trained with DPO (or a variant) as a Lightning module.

The policy and, for reference-based losses, a frozen reference each run one forward over a batch of
chosen rows then rejected rows (see `data.collate_pairs`); `losses.sequence_logps` turns logits into
per-sequence log-probs, and the losses named by `loss_type` (pure functions in `losses.py`) turn those
into per-pair losses and rewards. Devices, precision and distribution are the Trainer's business:
nothing here moves tensors or casts them.
"""

import copy
import functools
import inspect
import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from dpo_lightning.losses import IGNORE_INDEX, LENGTH_NORMALIZED, LOSSES, REFERENCE_FREE, sequence_logps
from dpo_lightning.metrics import batch_values, make_metrics

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LossType = Literal[tuple(LOSSES)]
PROGRESS_BAR = ("loss", "rewards/accuracies")
# Loss options that only some losses take: None means "not set", and a set option that no selected
# loss declares is an error rather than a silent no-op.
LOSS_OPTIONS = ("label_smoothing", "simpo_gamma", "dpop_lambda", "rdpo_alpha", "discopop_tau",
                "f_divergence_type", "f_alpha_divergence_coef")


def load_causal_lm(name_or_path: str, torch_dtype: str | None, trust_remote_code: bool) -> PreTrainedModel:
    dtype = DTYPES.get(torch_dtype, torch_dtype)  # "auto" and None pass through to transformers
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)


def zero_dropout(model: nn.Module) -> None:
    # With dropout on, the policy and reference disagree at step 0 and the rewards start as noise.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def declared(loss_type: str) -> set[str]:
    """The keyword options a loss function takes."""
    return set(inspect.signature(LOSSES[loss_type]).parameters)


class DPOModule(L.LightningModule):
    """DPO fine-tuning of a causal LM against a frozen reference copy of it.

    Args:
        model_name_or_path: the policy: a hub name or local folder, or an already built model (notebooks).
        ref_model_name_or_path: the reference model. Default: a frozen copy of the policy's starting
            weights, made in memory in the policy's dtype. Not loaded for reference-free losses.
        beta: strength of the KL penalty toward the reference (the paper's beta); higher stays closer.
        loss_type: the preference loss, a name from `dpo_lightning.losses.LOSSES`, or a list of them
            combined with `loss_weights` (as MPO does, e.g. [sigmoid, bco_pair, sft]).
        loss_weights: one weight per `loss_type` entry. Default: 1 each.
        reference_free: use zero reference log-probs with a reference-based loss; no reference is loaded.
        rpo_alpha: add `rpo_alpha` x the chosen responses' per-token NLL to the loss (RPO, Pang et al.
            2024, arXiv:2404.19733; Llama 3.1's DPO recipe). None: off.
        label_smoothing: assumed rate of flipped preference labels (cDPO) for the losses that take it.
        simpo_gamma: SimPO's target reward margin gamma.
        dpop_lambda: DPOP's penalty weight lambda on the chosen log-prob falling below the reference's.
        rdpo_alpha: R-DPO's length-regularization weight alpha.
        discopop_tau: DiscoPOP's temperature tau.
        f_divergence_type: the f-divergence of the sigmoid loss's regularizer (Wang et al. 2023).
        f_alpha_divergence_coef: alpha of `f_divergence_type: alpha_divergence`.
        chosen_logp_drop_warning: warn once when the chosen responses' log-prob, averaged over a training
            step's pairs, falls this far (in nats per response) below the reference's: the likelihood
            displacement that precedes degenerate generations. None: off.
        learning_rate: peak learning rate.
        weight_decay: decoupled weight decay, applied to matrices only (not biases and norms).
        warmup_steps: linear warm-up steps from 0 to `learning_rate`.
        lr_scheduler_type: what follows the warm-up: constant (the DPO reference), linear or cosine decay to 0.
        optimizer: AdamW, or RMSprop as in the DPO reference.
        torch_dtype: dtype to load the weights in; None keeps transformers' default (float32).
        trust_remote_code: run model code shipped with a hub checkpoint. Off: it executes arbitrary code.
        gradient_checkpointing: recompute activations in backward to save memory.
        disable_dropout: set every dropout to 0 in policy and reference (TRL's default).
    """

    def __init__(
        self,
        model_name_or_path: str | PreTrainedModel,
        ref_model_name_or_path: str | None = None,
        beta: float = 0.1,
        loss_type: LossType | list[LossType] = "sigmoid",
        loss_weights: list[float] | None = None,
        reference_free: bool = False,
        rpo_alpha: float | None = None,
        label_smoothing: float | None = None,
        simpo_gamma: float | None = None,
        dpop_lambda: float | None = None,
        rdpo_alpha: float | None = None,
        discopop_tau: float | None = None,
        f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] | None = None,
        f_alpha_divergence_coef: float | None = None,
        chosen_logp_drop_warning: float | None = None,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant",
        optimizer: Literal["adamw", "rmsprop"] = "adamw",
        torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
    ):
        super().__init__()
        self.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.loss_weights = list(loss_weights) if loss_weights is not None else [1.0] * len(self.loss_types)
        options = {name: value for name, value in locals().items() if name in LOSS_OPTIONS and value is not None}
        _validate(self.loss_types, self.loss_weights, options, beta, learning_rate, weight_decay, warmup_steps)
        self.loss_kwargs = {name: {"beta": beta, **{k: v for k, v in options.items() if k in declared(name)}}
                            for name in self.loss_types}
        self.save_hyperparameters(ignore=["model_name_or_path"] if isinstance(model_name_or_path, nn.Module) else None)

        if isinstance(model_name_or_path, str):
            self.policy = load_causal_lm(model_name_or_path, torch_dtype, trust_remote_code)
        else:
            self.policy = model_name_or_path
        # from_pretrained returns eval mode; HF gradient checkpointing only runs in train mode.
        self.policy.train()
        self.model_name_or_path = self.policy.name_or_path or None
        needs_reference = not reference_free and not set(self.loss_types) <= REFERENCE_FREE
        if not needs_reference and ref_model_name_or_path is not None:
            raise ValueError("--model.ref_model_name_or_path is set but the loss uses no reference "
                             f"(loss_type {self.loss_types}, reference_free {reference_free}): remove it")
        self.reference = None
        if needs_reference:
            self.reference = (copy.deepcopy(self.policy) if ref_model_name_or_path is None
                              else load_causal_lm(ref_model_name_or_path, torch_dtype, trust_remote_code))
            self.reference.eval().requires_grad_(False)
        if disable_dropout:
            zero_dropout(self.policy)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        # bco_pair shifts rewards by their running mean over all training pairs so far (kept for resume).
        self.register_buffer("bco_reward_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("bco_reward_count", torch.zeros((), dtype=torch.float64))
        self.uses_nll = bool(rpo_alpha) or "sft" in self.loss_types
        self.train_metrics, self.val_metrics = make_metrics(self.uses_nll), make_metrics(self.uses_nll)
        self._displacement_warned = False

    def train(self, mode: bool = True):
        # Lightning switches the whole module to train mode each epoch; the reference stays in eval.
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "train")
        # Log once per optimizer step, reduced over all its micro-batches (not the last one's value).
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0 or self.trainer.is_last_batch:
            self._log_train_step()
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "val")
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric, on_epoch=True, prog_bar=name in PROGRESS_BAR)
        return loss

    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        policy_logps, mean_logits, n_tokens = self._sequence_logps(self.policy, batch)  # each (2B,)
        if self.reference is None:
            ref_logps = torch.zeros_like(policy_logps)
        else:
            with torch.no_grad():
                ref_logps, _, _ = self._sequence_logps(self.reference, batch)
        losses, chosen_rewards, rejected_rewards = self._preference_loss(policy_logps, ref_logps, n_tokens, stage)
        chosen_logps, chosen_tokens = policy_logps.chunk(2)[0], n_tokens.chunk(2)[0]
        nll = -chosen_logps / chosen_tokens if self.uses_nll else None  # (B,) per-token NLL of each chosen
        loss = losses.mean()
        if self.hparams.rpo_alpha:
            # Token-weighted over the batch, as a cross-entropy over all chosen tokens (TRL's rpo_alpha).
            loss = loss + self.hparams.rpo_alpha * (-chosen_logps.sum() / chosen_tokens.sum())
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        for name, args in batch_values(losses, chosen_rewards, rejected_rewards, policy_logps, mean_logits,
                                       n_tokens, nll).items():
            metrics[name].update(*args)
        return loss

    def _preference_loss(self, policy_logps: Tensor, ref_logps: Tensor, n_tokens: Tensor,
                         stage: str) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pair weighted sum of the selected losses (B,), and the first loss's rewards (B,) each."""
        chosen_tokens, rejected_tokens = n_tokens.float().chunk(2)
        batch_kwargs = {"chosen_lengths": chosen_tokens, "rejected_lengths": rejected_tokens}
        if "bco_pair" in self.loss_types:
            batch_kwargs["bco_reward_shift"] = self._bco_reward_shift(policy_logps, ref_logps, stage)
        total, rewards = 0.0, None
        for name, weight in zip(self.loss_types, self.loss_weights):
            policy, ref = policy_logps, ref_logps
            if name in LENGTH_NORMALIZED:
                policy, ref = policy / n_tokens, ref / n_tokens
            wanted = declared(name)
            kwargs = {**self.loss_kwargs[name], **{k: v for k, v in batch_kwargs.items() if k in wanted}}
            losses, chosen_rewards, rejected_rewards = LOSSES[name](*policy.chunk(2), *ref.chunk(2), **kwargs)
            total = total + weight * losses
            if rewards is None:
                rewards = (chosen_rewards, rejected_rewards)
        return total, *rewards

    def _bco_reward_shift(self, policy_logps: Tensor, ref_logps: Tensor, stage: str) -> Tensor:
        """Running mean of the implicit rewards of every training pair so far, this batch included (TRL's delta)."""
        if stage == "train":
            rewards = (self.hparams.beta * (policy_logps - ref_logps)).detach().double()  # (2B,)
            totals = self.all_gather(torch.stack([rewards.sum(), rewards.new_tensor(rewards.numel())]))
            totals = totals.reshape(-1, 2).sum(0)  # over ranks
            self.bco_reward_sum += totals[0]
            self.bco_reward_count += totals[1]
        return (self.bco_reward_sum / self.bco_reward_count.clamp(min=1)).float()

    def _sequence_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Summed response log-probs (2B,), mean response logits (2B,) and response lengths (2B,)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits  # (2B, T, V)
        logps, n_tokens = sequence_logps(logits, batch["labels"])
        # Mean logit over the vocabulary at response positions, TRL's `logits/chosen` diagnostic.
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        mean_logits = (logits[:, :-1].detach().float().mean(-1) * mask).sum(-1) / n_tokens.clamp(min=1)
        return logps, mean_logits, n_tokens

    def _log_train_step(self) -> None:
        values = {f"train/{name}": metric.compute() for name, metric in self.train_metrics.items()}
        for metric in self.train_metrics.values():
            metric.reset()
        for name, value in values.items():
            self.log(name, value, on_step=True, on_epoch=False, prog_bar=name.removeprefix("train/") in PROGRESS_BAR)
        threshold = self.hparams.chosen_logp_drop_warning
        if threshold is not None and self.reference is not None and not self._displacement_warned:
            drop = -values["train/rewards/chosen"].item() / self.hparams.beta  # mean log ref - log pi of chosen
            if drop > threshold:
                self._displacement_warned = True
                rank_zero_warn(f"step {self.global_step}: the chosen responses' log-prob is {drop:.2f} nats below "
                               f"the reference's (threshold {threshold}): likelihood displacement; consider "
                               "rpo_alpha, a larger beta or a smaller learning rate")

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        if hp.optimizer == "rmsprop":
            optimizer = torch.optim.RMSprop(groups, lr=hp.learning_rate)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate)
        total = self.trainer.estimated_stepping_batches if hp.lr_scheduler_type != "constant" else 0
        schedule = functools.partial(lr_factor, warmup_steps=hp.warmup_steps, total_steps=total,
                                     kind=hp.lr_scheduler_type)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The reference never changes: rebuild it from its source on load instead of storing a second model.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("reference.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning loads state dicts strictly; hand it the reference this module already rebuilt.
        if self.reference is not None:
            checkpoint["state_dict"].update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})


def lr_factor(step: int, warmup_steps: int, total_steps: int | float, kind: str) -> float:
    """Learning-rate multiplier: linear warm-up over `warmup_steps`, then constant, linear or cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _validate(loss_types: list[str], loss_weights: list[float], options: dict, beta: float, learning_rate: float,
              weight_decay: float, warmup_steps: int) -> None:
    unknown = [name for name in loss_types if name not in LOSSES]
    if unknown or not loss_types:
        raise ValueError(f"--model.loss_type {unknown or loss_types} is not one of {sorted(LOSSES)}")
    if len(loss_weights) != len(loss_types):
        raise ValueError(f"--model.loss_weights has {len(loss_weights)} entries for {len(loss_types)} loss types "
                         f"{loss_types}: give one weight per loss")
    for option in options:
        users = sorted(name for name in LOSSES if option in declared(name))
        if not any(option in declared(name) for name in loss_types):
            raise ValueError(f"--model.{option} is set but loss_type {loss_types} ignores it; it is used by "
                             f"{users}: remove it or pick one of those losses")
    if beta <= 0:
        raise ValueError(f"--model.beta must be > 0, got {beta}")
    if not 0.0 <= options.get("label_smoothing", 0.0) < 0.5:
        raise ValueError(f"--model.label_smoothing must be in [0, 0.5), got {options['label_smoothing']}")
    if "exo_pair" in loss_types and options.get("label_smoothing") == 0:
        raise ValueError("--model.label_smoothing must be > 0 for exo_pair (its loss is infinite at 0): "
                         "leave it unset for the paper's 1e-3")
    if learning_rate <= 0 or weight_decay < 0 or warmup_steps < 0:
        raise ValueError(f"--model.learning_rate must be > 0 and weight_decay, warmup_steps >= 0; got "
                         f"{learning_rate}, {weight_decay}, {warmup_steps}")
