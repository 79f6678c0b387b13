"""`DPOModule`: a Hugging Face causal LM trained with DPO as a Lightning module.

The policy and a frozen reference each run one forward over a batch of chosen rows then rejected rows
(see `data.collate_pairs`); `losses.sequence_logps` turns logits into per-sequence log-probs and a loss
from `losses.LOSSES` turns those into per-pair losses and rewards. Devices, precision and distribution
are the Trainer's business: nothing here moves tensors or casts them.
"""

import copy
import functools
import math
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM, PreTrainedModel

from dpo_lightning.losses import IGNORE_INDEX, LENGTH_NORMALIZED, LOSSES, sequence_logps

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(name_or_path: str, torch_dtype: str | None, trust_remote_code: bool) -> PreTrainedModel:
    dtype = DTYPES.get(torch_dtype, torch_dtype)  # "auto" and None pass through to transformers
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)


def zero_dropout(model: nn.Module) -> None:
    # With dropout on, the policy and reference disagree at step 0 and the rewards start as noise.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class DPOModule(L.LightningModule):
    """DPO fine-tuning of a causal LM against a frozen reference copy of it.

    Args:
        model_name_or_path: the policy: a hub name or local folder, or an already built model (notebooks).
        ref_model_name_or_path: the reference model. Default: a frozen copy of the policy's starting
            weights, made in memory in the policy's dtype.
        beta: strength of the KL penalty toward the reference (the paper's beta); higher stays closer.
        loss_type: the preference loss, a name from `dpo_lightning.losses.LOSSES`.
        label_smoothing: assumed rate of flipped preference labels (cDPO); `sigmoid` loss only.
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
        loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid",
        label_smoothing: float = 0.0,
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
        _validate(beta, loss_type, label_smoothing, learning_rate, weight_decay, warmup_steps)
        self.save_hyperparameters(ignore=["model_name_or_path"] if isinstance(model_name_or_path, nn.Module) else None)
        if isinstance(model_name_or_path, str):
            self.policy = load_causal_lm(model_name_or_path, torch_dtype, trust_remote_code)
        else:
            self.policy = model_name_or_path
        # from_pretrained returns eval mode; HF gradient checkpointing only runs in train mode.
        self.policy.train()
        self.model_name_or_path = self.policy.name_or_path or None
        if ref_model_name_or_path is None:
            self.reference = copy.deepcopy(self.policy)
        else:
            self.reference = load_causal_lm(ref_model_name_or_path, torch_dtype, trust_remote_code)
        self.reference.eval().requires_grad_(False)
        if disable_dropout:
            zero_dropout(self.policy)
            zero_dropout(self.reference)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.loss_fn = LOSSES[loss_type]
        self.loss_kwargs = {"beta": beta, **({"label_smoothing": label_smoothing} if loss_type == "sigmoid" else {})}
        self.train_metrics = nn.ModuleDict({name: MeanMetric() for name in METRICS})
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in METRICS})

    def train(self, mode: bool = True):
        # Lightning switches the whole module to train mode each epoch; the reference stays in eval.
        super().train(mode)
        self.reference.eval()
        return self

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        policy_logps, policy_logits, n_tokens = self._sequence_logps(self.policy, batch)
        with torch.no_grad():
            ref_logps, _, _ = self._sequence_logps(self.reference, batch)
        if self.hparams.loss_type in LENGTH_NORMALIZED:
            policy_logps, ref_logps = policy_logps / n_tokens, ref_logps / n_tokens
        chosen_logps, rejected_logps = policy_logps.chunk(2)  # chosen rows first, see collate_pairs
        losses, chosen_rewards, rejected_rewards = self.loss_fn(chosen_logps, rejected_logps, *ref_logps.chunk(2),
                                                               **self.loss_kwargs)
        self._log_metrics(stage, losses, chosen_rewards, rejected_rewards, policy_logps, policy_logits, n_tokens)
        return losses.mean()

    def _sequence_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Summed response log-probs (2B,), mean response logits (2B,) and response lengths (2B,)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits  # (2B, T, V)
        logps, n_tokens = sequence_logps(logits, batch["labels"])
        # Mean logit over the vocabulary at response positions, TRL's `logits/chosen` diagnostic.
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        mean_logits = (logits[:, :-1].detach().float().mean(-1) * mask).sum(-1) / n_tokens.clamp(min=1)
        return logps, mean_logits, n_tokens

    def _log_metrics(self, stage: str, losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
                     logps: Tensor, mean_logits: Tensor, n_tokens: Tensor) -> None:
        # A tie (policy == reference, as at step 0) counts as half right: the accuracy of a coin flip.
        accuracy = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
        chosen_tokens, rejected_tokens = n_tokens.chunk(2)
        values = {
            "loss": (losses.detach(), None),
            "rewards/chosen": (chosen_rewards, None),
            "rewards/rejected": (rejected_rewards, None),
            "rewards/accuracies": (accuracy, None),
            "rewards/margins": (chosen_rewards - rejected_rewards, None),
            "logps/chosen": (logps.detach().chunk(2)[0], None),
            "logps/rejected": (logps.detach().chunk(2)[1], None),
            # Weighted by tokens: the split's value is the mean over every response token, not over rows.
            "logits/chosen": (mean_logits.chunk(2)[0], chosen_tokens),
            "logits/rejected": (mean_logits.chunk(2)[1], rejected_tokens),
        }
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        for name, (value, weight) in values.items():
            metric = metrics[name]
            metric(value, 1.0 if weight is None else weight)
            self.log(f"{stage}/{name}", metric, on_step=stage == "train", on_epoch=stage != "train",
                     prog_bar=name in ("loss", "rewards/accuracies"))

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
        checkpoint["state_dict"].update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})


def lr_factor(step: int, warmup_steps: int, total_steps: int | float, kind: str) -> float:
    """Learning-rate multiplier: linear warm-up over `warmup_steps`, then constant, linear or cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _validate(beta: float, loss_type: str, label_smoothing: float, learning_rate: float, weight_decay: float,
              warmup_steps: int) -> None:
    if loss_type not in LOSSES:
        raise ValueError(f"--model.loss_type must be one of {sorted(LOSSES)}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"--model.beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"--model.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"--model.label_smoothing only applies to loss_type 'sigmoid' (cDPO); "
                         f"loss_type {loss_type!r} would ignore it: set it to 0")
    if learning_rate <= 0 or weight_decay < 0 or warmup_steps < 0:
        raise ValueError(f"--model.learning_rate must be > 0 and weight_decay, warmup_steps >= 0; got "
                         f"{learning_rate}, {weight_decay}, {warmup_steps}")
