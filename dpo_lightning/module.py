"""`DPOModule`: a Hugging Face causal LM trained with DPO (or a variant) as a Lightning module.

The policy and, for reference-based losses, the reference each run one forward over a batch of
chosen rows then rejected rows (see `data.collate_pairs`); `logps.py` turns that into per-sequence
log-probs (lean by default: no full-vocabulary logits), and the losses named by `loss_type` (pure
functions in `losses.py`) turn those into per-pair losses and rewards. The reference is a frozen copy,
or with a LoRA adapter the policy itself with its adapter switched off (`models.py`). Devices, precision
and distribution are the Trainer's business: nothing here moves tensors or casts them.
"""

import contextlib
import functools
import inspect
import math
import os
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel

from dpo_lightning import reference_cache
from dpo_lightning.logps import lean_logps, lean_unsupported, naive_logps
from dpo_lightning.losses import LENGTH_NORMALIZED, LOSSES, REFERENCE_FREE
from dpo_lightning.metrics import batch_values, compute_all, make_metrics
from dpo_lightning.models import (base_causal_lm, build_models, load_causal_lm, quantized_base,
                                  reference_weights)
from dpo_lightning.packing import shared_layout_unsupported
from dpo_lightning.resume import ends_optimizer_step

LossType = Literal[tuple(LOSSES)]
PROGRESS_BAR = ("loss", "rewards/accuracies")
# Loss options that only some losses take: None means "not set", and a set option that no selected
# loss declares is an error rather than a silent no-op.
LOSS_OPTIONS = ("label_smoothing", "simpo_gamma", "dpop_lambda", "rdpo_alpha", "discopop_tau",
                "f_divergence_type", "f_alpha_divergence_coef")


def declared(loss_type: str) -> set[str]:
    """The keyword options a loss function takes."""
    return set(inspect.signature(LOSSES[loss_type]).parameters)


class DPOModule(L.LightningModule):
    """DPO fine-tuning of a causal LM against a frozen reference: a copy of it, or itself with its adapter off.

    Args:
        model_name_or_path: the policy: a hub name or local folder, or an already built model (notebooks).
            A local peft adapter folder (with `adapter_config.json`), or a `PeftModel`, trains that adapter
            on its base model, and a frozen copy of the adapter is the reference.
        ref_model_name_or_path: the reference model. Default: a frozen copy of the policy's starting
            weights, made in memory in the policy's dtype; with a new LoRA adapter, the policy with the
            adapter disabled (no copy). Not loaded for reference-free losses.
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
        precompute_ref_log_probs: score the reference once over the train and val data before training,
            cache the log-probs on disk (`reference_cache.py`) and train with the policy alone. A later
            run on the same reference and data (another beta or loss_type) reads the cache and never
            builds the reference.
        precompute_ref_batch_size: pairs per reference forward when precomputing. Default: the data's
            eval batch size.
        ref_logps_cache_dir: where precomputed reference log-probs are kept. Default:
            ~/.cache/dpo_lightning/reference_logps.
        nonfinite_loss: what a NaN or infinite training loss does, before it reaches the weights:
            "stop" the run with a message naming the step and the batch's rows, or "skip" the batch
            (every rank skips it together) with a warning.
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
        gradient_checkpointing: recompute each layer's activations in backward: activation memory down
            to the layer inputs (651 MB -> 44 MB in benchmarks/README.md) for one more decoder forward
            per step (15% more time there; more where the decoder dominates the step). Off by default.
        torch_compile: `torch.compile` the decoder of the policy and reference (dynamic shapes). Costs
            a minute or more of compilation at the first steps (and at new shapes), then runs each step
            a little faster (9% on CPU in benchmarks/README.md; GPUs unmeasured). Off by default.
        disable_dropout: set every dropout to 0 in policy and reference, LoRA's included (TRL's default).
        lean_logps: compute log-probs from the decoder's hidden states, running the output head only on
            response tokens, in chunks, recomputed in backward: no (2B, T, V) logits in memory. Equal to
            the full-logits path (False) within float32 rounding. A model whose logits are not its head
            applied to its hidden states (checked at construction) falls back to the full path, with a warning.
        logps_chunk_size: response tokens per output-head call on the lean path; memory grows with it
            times the vocabulary size (256 x 32k x 4 bytes = 32 MB per buffer, about three at a time).
        lora_r: train a new LoRA adapter of this rank (peft) instead of all weights. None: full fine-tuning.
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_dropout: dropout on the adapter's input; needs `disable_dropout: false`.
        lora_target_modules: module names to adapt, e.g. [q_proj, v_proj], or "all-linear". Default:
            peft's choice for the architecture. Add lm_head to adapt the output head.
        peft_config: a full peft config as a dict (`peft.get_peft_config`; `peft_type` defaults to LORA),
            instead of the `lora_*` arguments.
        load_in_4bit: QLoRA: load the base in 4-bit (bitsandbytes NF4, bf16 compute) and train a LoRA adapter
            on it (needs `lora_r` or `peft_config`); the reference is the adapter disabled on the same 4-bit
            base, and exports merge the adapter into a bf16 copy of the base. `pip install -e .[qlora]`.
        quantization_config: `transformers.BitsAndBytesConfig`'s arguments as a dict, instead of
            `load_in_4bit`'s defaults, e.g. {bnb_4bit_quant_type: fp4, bnb_4bit_use_double_quant: true}.
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
        precompute_ref_log_probs: bool = False,
        precompute_ref_batch_size: int | None = None,
        ref_logps_cache_dir: str | None = None,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        chosen_logp_drop_warning: float | None = None,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant",
        optimizer: Literal["adamw", "rmsprop"] = "adamw",
        torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        torch_compile: bool = False,
        disable_dropout: bool = True,
        lean_logps: bool = True,
        logps_chunk_size: int = 256,
        lora_r: int | None = None,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str | None = None,
        peft_config: dict | None = None,
        load_in_4bit: bool = False,
        quantization_config: dict | None = None,
    ):
        super().__init__()
        self.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.loss_weights = list(loss_weights) if loss_weights is not None else [1.0] * len(self.loss_types)
        options = {name: value for name, value in locals().items() if name in LOSS_OPTIONS and value is not None}
        _validate(self.loss_types, self.loss_weights, options, beta, learning_rate, weight_decay, warmup_steps)
        self.loss_kwargs = {name: {"beta": beta, **{k: v for k, v in options.items() if k in declared(name)}}
                            for name in self.loss_types}
        self.save_hyperparameters(ignore=["model_name_or_path"] if isinstance(model_name_or_path, nn.Module) else None)

        self.needs_reference = not reference_free and not set(self.loss_types) <= REFERENCE_FREE
        for flag, value in (("ref_model_name_or_path", ref_model_name_or_path is not None),
                            ("precompute_ref_log_probs", precompute_ref_log_probs)):
            if value and not self.needs_reference:
                raise ValueError(f"--model.{flag} is set but the loss uses no reference (loss_type "
                                 f"{self.loss_types}, reference_free {reference_free}): remove it")
        # With precomputation the reference is built only if the cache misses, and dropped after scoring.
        self.ref_tables: dict[str, Tensor] | None = None
        self.ref_fingerprint: str | None = None
        if load_in_4bit or quantization_config is not None:
            model_name_or_path = quantized_base(model_name_or_path, self.hparams)
        self.policy, self.reference, self.reference_adapter = build_models(
            model_name_or_path, ref_model_name_or_path, self.needs_reference, self.hparams)
        self.model_name_or_path = base_causal_lm(self.policy).name_or_path or None  # the tokenizer's default source
        self.uses_lean_logps = lean_logps and self._lean_supported()
        if torch_compile:  # after the lean check, which would compile for its 8 tokens
            for model in (self.policy, self.reference):
                if model is not None:
                    base_causal_lm(model).base_model.compile(dynamic=True)  # in place: same parameter names
        # bco_pair shifts rewards by their running mean over all training pairs so far (kept for resume).
        self.register_buffer("bco_reward_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("bco_reward_count", torch.zeros((), dtype=torch.float64))
        self.uses_nll = bool(rpo_alpha) or "sft" in self.loss_types
        self.train_metrics = make_metrics(self.uses_nll, sync_on_compute=False)  # reduced at once each step
        self.val_metrics = make_metrics(self.uses_nll)
        self._displacement_warned = False

    def _lean_supported(self) -> bool:
        for model in (self.policy, self.reference):
            reason = lean_unsupported(model) if model is not None else None
            if reason:
                rank_zero_warn(f"--model.lean_logps: {reason}; using the full-logits path instead")
                return False
        return True

    def train(self, mode: bool = True):
        # Lightning switches the whole module to train mode each epoch; the reference stays in eval.
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss = self._shared_step(batch, "train")
        # Log once per optimizer step, reduced over all its micro-batches (not the last one's value).
        if ends_optimizer_step(self.trainer, batch_idx):
            self._log_train_step()
        # None for a skipped non-finite loss: Lightning runs no backward, so the optimizer finds no gradient
        # and changes no weight (its step counter and the scheduler still advance).
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "val")
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric, on_epoch=True, prog_bar=name in PROGRESS_BAR)
        return loss

    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        policy_logps, mean_logits, n_tokens = self._sequence_logps(self.policy, batch)  # each (2B,)
        ref_logps = self._reference_logps(batch, stage) if self.needs_reference else torch.zeros_like(policy_logps)
        losses, chosen_rewards, rejected_rewards = self._preference_loss(policy_logps, ref_logps, n_tokens, stage)
        chosen_logps, chosen_tokens = policy_logps.chunk(2)[0], n_tokens.chunk(2)[0]
        nll = -chosen_logps / chosen_tokens if self.uses_nll else None  # (B,) per-token NLL of each chosen
        loss = losses.mean()
        if self.hparams.rpo_alpha:
            # Token-weighted over the batch, as a cross-entropy over all chosen tokens (TRL's rpo_alpha).
            loss = loss + self.hparams.rpo_alpha * (-chosen_logps.sum() / chosen_tokens.sum())
        if stage == "train" and not self._finite(loss, batch):
            return None
        if "pairs_per_row" in batch:  # how densely packing fills the rows
            self.log(f"{stage}/pairs_per_row", batch["pairs_per_row"].float().mean(), batch_size=len(chosen_logps))
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        for name, args in batch_values(losses, chosen_rewards, rejected_rewards, policy_logps, mean_logits,
                                       n_tokens, nll).items():
            metrics[name].update(*args)
        return loss

    def _finite(self, loss: Tensor, batch: dict[str, Tensor]) -> bool:
        """Whether the loss is finite on every rank; if not, stop with the step and rows, or warn and skip."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self._trainer is not None:  # every rank must skip together, or DDP's gradient all-reduce hangs
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() == 0:
            return True
        rows = batch["row_ids"].tolist() if "row_ids" in batch else "unknown"
        where = f"batch {self.trainer.fit_loop.epoch_loop.batch_idx} of epoch {self.current_epoch}" if (
            self._trainer is not None) else "batch ?"
        message = (f"non-finite training loss ({loss.item()} on this rank) at step {self.global_step}, {where}, "
                   f"rows {rows}")
        if self.hparams.nonfinite_loss == "stop":
            raise FloatingPointError(f"{message}. The weights were not updated. Check these rows with "
                                     "`dpo-lightning inspect-data`; try a lower learning rate, bf16 instead of "
                                     "fp16, or --model.nonfinite_loss skip")
        rank_zero_warn(f"{message}: skipped (--model.nonfinite_loss skip)")
        return False

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
        if self.uses_lean_logps:
            return lean_logps(model, batch, self.hparams.logps_chunk_size)
        return naive_logps(model, batch)

    def _reference_logps(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        """Summed response log-probs (2B,) under the reference: a frozen model, the policy's adapter switched,
        or looked up in the precomputed table."""
        if self.ref_tables is not None:
            return reference_cache.reference_table_logps(self.ref_tables[stage], batch["row_ids"])
        model, weights = self._reference_and_weights()
        with torch.no_grad(), weights:
            return self._sequence_logps(model, batch)[0]

    def _reference_and_weights(self) -> tuple[nn.Module, contextlib.AbstractContextManager]:
        if self.reference is not None:
            return self.reference, contextlib.nullcontext()
        return self.policy, reference_weights(self.policy, self.reference_adapter)

    def setup(self, stage: str) -> None:
        # A model that ignores the shared layout's mask would train on wrong log-probs without an error.
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and datamodule.hparams.get("prefix_sharing"):
            for model in (self.policy, self.reference):
                reason = shared_layout_unsupported(model) if model is not None else None
                if reason:
                    raise ValueError(f"--data.prefix_sharing: {reason}. Set --data.prefix_sharing false, or "
                                     "load the model with an attention implementation that takes a 4D mask "
                                     "(sdpa, eager)")

    def configure_model(self) -> None:
        # Lightning's ModelParallelStrategy (FSDP2) hands the module a device mesh and leaves the sharding to it
        # (configs/fsdp2.yaml); every other strategy wraps the module itself and sets no mesh.
        if self.device_mesh is not None:
            from dpo_lightning.distributed import fully_shard_models
            fully_shard_models(self, self.device_mesh["data_parallel"])
            # That strategy loads a checkpoint into the sharded module itself, before `on_load_checkpoint`
            # can add back the frozen weights `on_save_checkpoint` leaves out: it must load them non-strictly.
            self.strict_loading = False

    def on_fit_start(self) -> None:
        if self.hparams.precompute_ref_log_probs:
            self._precompute_reference(["train", "val"])

    def on_validation_start(self) -> None:
        if self.hparams.precompute_ref_log_probs and self.ref_tables is None:  # trainer.validate alone
            self._precompute_reference(["val"])

    def _precompute_reference(self, stages: list[str]) -> None:
        """Reference log-probs of every pair of `stages`, from the cache or scored now; then no reference model."""
        trainer, hp = self.trainer, self.hparams
        splits = {s: d for s, d in reference_cache.check_splits(trainer.datamodule).items() if s in stages}
        # Rank 0's, so that every rank names the same files (under FSDP each rank hashes its own shard).
        self.ref_fingerprint = trainer.strategy.broadcast(self.ref_fingerprint or self._reference_fingerprint())
        folder = hp.ref_logps_cache_dir or reference_cache.DEFAULT_CACHE_DIR
        paths = {split: os.path.join(folder, reference_cache.cache_key(
            self.ref_fingerprint, str(trainer.precision), trainer.datamodule.fingerprint(split)) + ".safetensors")
            for split in splits}
        cached = {split: reference_cache.load_tables(path) for split, path in paths.items()}
        # Every rank must score the same splits (scoring calls collectives), so a split counts as cached
        # only where every rank found it.
        found = torch.tensor([float(cached[split] is not None) for split in splits], device=self.device)
        everywhere = (trainer.strategy.reduce(found, reduce_op="sum") == trainer.world_size).tolist()
        missing = {split: data for (split, data), hit in zip(splits.items(), everywhere) if not hit}
        tables = self._score_reference(missing) if missing else {}
        if trainer.is_global_zero:
            for split, table in tables.items():
                reference_cache.save_tables({split: table}, paths[split])
        tables.update({split: cached[split][split].to(self.device) for split in splits if split not in missing})
        self.ref_tables, self.reference = {**(self.ref_tables or {}), **tables}, None
        rank_zero_info(f"[dpo_lightning] reference log-probs: {sorted(missing)} scored, {sorted(set(splits) - set(missing))} "
                       f"read from the cache {folder}; training holds the policy alone")

    def _score_reference(self, splits: dict) -> dict[str, Tensor]:
        hp, datamodule = self.hparams, self.trainer.datamodule
        if self.reference is None and (hp.ref_model_name_or_path is not None or not self._policy_is_reference()):
            source = hp.ref_model_name_or_path or hp.get("model_name_or_path")
            if not isinstance(source, str):
                raise ValueError("no cached reference log-probs for this resumed run, and the policy's starting "
                                 "weights were passed as an object, not a path: restore the cache file or start over")
            self.reference = load_causal_lm(source, hp.torch_dtype, hp.trust_remote_code).to(self.device).eval()
        model = self._reference_and_weights()[0]
        logps = functools.partial(lean_logps, chunk_size=hp.logps_chunk_size) if (
            self.uses_lean_logps and not lean_unsupported(model)) else naive_logps
        batch_size = hp.precompute_ref_batch_size or datamodule.hparams.eval_batch_size or datamodule.hparams.batch_size
        return reference_cache.score_reference(self.trainer, datamodule, splits, lambda b: logps(model, b)[0],
                                               lambda: self._reference_and_weights()[1], batch_size)

    def _policy_is_reference(self) -> bool:
        """Whether the policy computes the reference: with adapters always, fully fine-tuned only before step 0."""
        return isinstance(self.policy, PeftModel) or self.trainer.ckpt_path is None

    def _reference_fingerprint(self) -> str:
        """What the reference's log-probs depend on: its weight files, or the weights the policy scores it with."""
        if self.hparams.ref_model_name_or_path is not None:
            return reference_cache.files_fingerprint(self.hparams.ref_model_name_or_path) + str(self.hparams.torch_dtype)
        if not self._policy_is_reference():
            raise ValueError("this checkpoint holds no reference fingerprint (it was saved with "
                             "precompute_ref_log_probs off): resume with it off, or start the run over")
        # With adapters the frozen weights are the reference; fully fine-tuned, all of them, at step 0.
        params = dict(self.policy.named_parameters())
        frozen = {name: p for name, p in params.items() if not p.requires_grad}
        return reference_cache.weights_fingerprint(frozen or params)

    def _log_train_step(self) -> None:
        if not self.train_metrics["loss"].update_count:  # every micro-batch of the step was skipped (non-finite)
            return
        reduce = functools.partial(self.trainer.strategy.reduce, reduce_op="sum")
        values = {f"train/{name}": value for name, value in compute_all(self.train_metrics, reduce).items()}
        for metric in self.train_metrics.values():
            metric.reset()
        for name, value in values.items():
            self.log(name, value, on_step=True, on_epoch=False, prog_bar=name.removeprefix("train/") in PROGRESS_BAR)
        threshold = self.hparams.chosen_logp_drop_warning
        if threshold is not None and self.needs_reference and not self._displacement_warned:
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
        # Only what trains is stored (with LoRA, the adapter). The reference and frozen weights (a LoRA
        # base, a reference adapter) never change: they are rebuilt from their source on load.
        frozen = {f"policy.{name}" for name, param in self.policy.named_parameters(remove_duplicate=False)
                  if not param.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("reference.") and k not in frozen}
        # A fully fine-tuned policy no longer holds the starting weights: the cache key must come from here.
        checkpoint["reference_fingerprint"] = self.ref_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning loads state dicts strictly; hand it the frozen weights this module already rebuilt.
        # (ModelParallelStrategy has loaded and removed the state dict already: see configure_model.)
        for name, value in self.state_dict().items() if "state_dict" in checkpoint else ():
            checkpoint["state_dict"].setdefault(name, value)
        self.ref_fingerprint = checkpoint.get("reference_fingerprint")


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
