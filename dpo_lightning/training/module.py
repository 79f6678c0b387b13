"""`DPOModule`: a Hugging Face causal LM trained with DPO (or a variant) as a Lightning module.

One training step, `_shared_step`, reads top to bottom: the policy's log-probs over a batch of chosen rows then
rejected rows (`scorer.Scorer`, lean by default: no full-vocabulary logits; any batch layout, `data/layouts.py`),
the reference's (`reference.Reference`: a frozen copy, the policy with its adapter off, or a precomputed table),
the objective over the losses named by `loss_type` (`objective.Objective`, pure functions in `losses/`), a finite
check, and the metrics (`metrics.py`). Devices, precision and distribution are the Trainer's business: nothing here
moves tensors or casts them.

The hooks come in the order Lightning calls them (setup, training_step, on_before_optimizer_step, lr_scheduler_step,
on_train_batch_end, validation_step), then the step they share (`_shared_step`: log-probs, reference log-probs, loss,
metrics) and its helpers. A non-finite loss with `nonfinite_loss: skip`, or an online step without a pair on any
rank, marks the optimizer step skipped on every rank, and the hooks after it leave the weights, optimizer, schedule
and metrics alone (`on_before_optimizer_step`).
"""

import functools
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from transformers import PreTrainedModel

from dpo_lightning.data.layouts import STATISTICS, Layout, layout_of
from dpo_lightning.data.prompts import train_kind
from dpo_lightning.online import Online, OnlineConfig
from dpo_lightning.training import console
from dpo_lightning.training.checkpoints import (CheckpointValidation, check_reference_source, keep_trainable_weights,
                                                reconcile_settings)
from dpo_lightning.training.distributed import fully_shard_models
from dpo_lightning.training.logps import lean_supported
from dpo_lightning.training.losses import LOSS_OPTIONS, LOSSES
from dpo_lightning.training.metrics import Displacement, LogWindow, StepLogs, make_metrics, update_means, update_metrics
from dpo_lightning.training.models import build_models, quantized_base
from dpo_lightning.training.nonfinite import NonFiniteRows, finite_on_every_rank
from dpo_lightning.training.objective import Objective, ObjectiveOutput, migrate_state_dict
from dpo_lightning.training.optim import grad_norm, optimizers
from dpo_lightning.training.preflight import check_run
from dpo_lightning.training.reference import Reference
from dpo_lightning.training.scorer import Scorer
from dpo_lightning.training.throughput import Throughput
from dpo_lightning.utils.hf import base_causal_lm, decoder
from dpo_lightning.utils.locate import as_path
from dpo_lightning.utils.steps import ends_optimizer_step, logs_after

LossType = Literal[tuple(LOSSES)]
PROGRESS_BAR = ("loss", "rewards/accuracies")


class DPOModule(L.LightningModule):
    """DPO fine-tuning of a causal LM against a frozen reference: a copy of it, or itself with its adapter off.

    Args:
        model_name_or_path: the policy: a hub name or local folder, or an already built model (notebooks).
            A local peft adapter folder (with `adapter_config.json`), or a `PeftModel`, trains that adapter
            on its base model, and a frozen copy of the adapter is the reference.
        ref_model_name_or_path: the reference model: a hub name or local folder, or an already built model
            (TRL's `ref_model`; frozen in place, and passed again to `load_from_checkpoint`). Default: a
            frozen copy of the policy's starting weights, made in memory in the policy's dtype; with a new
            LoRA adapter, the policy with the adapter disabled (no copy). Not loaded for reference-free losses.
        beta: strength of the KL penalty toward the reference (the paper's beta); higher stays closer.
        loss_type: the preference loss, a name from `dpo_lightning.training.losses.LOSSES`, or a list of them
            combined with `loss_weights` (as MPO does, e.g. [sigmoid, bco_pair, sft]).
        loss_weights: one weight per `loss_type` entry. Default: 1 each.
        reference_free: use zero reference log-probs with a reference-based loss; no reference is loaded.
        rpo_alpha: add `rpo_alpha` x the chosen responses' per-token NLL to the loss (RPO, Pang et al.
            2024, arXiv:2404.19733; Llama 3.1's DPO recipe). None: off.
        router_aux_loss_coef: weight of an MoE policy's router loss, logged as `aux_loss` (None: its config's; 0: off).
        label_smoothing: assumed rate of flipped preference labels (cDPO) for the losses that take it.
        simpo_gamma: SimPO's target reward margin gamma.
        dpop_lambda: DPOP's penalty weight lambda on the chosen log-prob falling below the reference's.
        rdpo_alpha: R-DPO's length-regularization weight alpha.
        discopop_tau: DiscoPOP's temperature tau.
        f_divergence_type: the f-divergence of the sigmoid loss's regularizer (Wang et al. 2023).
        f_alpha_divergence_coef: alpha of `f_divergence_type: alpha_divergence`.
        precompute_ref_log_probs: score the reference once over the train and val data before training,
            cache the log-probs on disk (`refcache.py`) and train with the policy alone. A later
            run on the same reference and data (another beta or loss_type) reads the cache and never
            builds the reference.
        precompute_ref_batch_size: pairs per reference forward when precomputing. Default: the data's
            eval batch size.
        ref_logps_cache_dir: where precomputed reference log-probs are kept. Default:
            ~/.cache/dpo_lightning/reference_logps.
        nonfinite_loss: what a NaN or infinite training loss does, before it reaches the weights:
            "stop" the run with a message naming the step and the batch's rows, or "skip", with a warning,
            the optimizer step the batch belongs to (all its micro-batches, on every rank together): no
            weight, optimizer state, learning rate, metric or bco_pair mean changes; `global_step` and
            the data still move on.
        chosen_logp_drop_warning: warn once when the chosen responses' log-prob, averaged over a training
            step's pairs, falls this far (in nats per response) below the reference's: the likelihood
            displacement that precedes degenerate generations. None: off.
        learning_rate: peak learning rate.
        weight_decay: decoupled weight decay, applied to matrices only (not biases and norms).
        warmup_steps: linear warm-up steps from 0 to `learning_rate`.
        lr_scheduler_type: what follows the warm-up: constant (the DPO reference), linear or cosine decay to 0.
        optimizer: "adamw", "rmsprop" (the DPO reference's), or any optimizer the LightningCLI way: in YAML
            `class_path` + `init_args` (e.g. bitsandbytes.optim.AdamW8bit), from Python a callable taking the
            parameter groups, or the same dict (keeps checkpoints loadable with `weights_only=True`).
            `learning_rate` and `weight_decay` are set per group and win over an `lr` or `weight_decay` in init_args.
        torch_dtype: dtype to load the weights in; None keeps transformers' default (float32).
        trust_remote_code: run model code shipped with a hub checkpoint. Off: it executes arbitrary code.
        gradient_checkpointing: recompute each layer's activations in backward: activation memory down
            to the layer inputs (651 MB -> 44 MB in docs/benchmarks.md) for one more decoder forward
            per step (15% more time there; more where the decoder dominates the step). Off by default.
        torch_compile: `torch.compile` the decoder of the policy and reference (dynamic shapes). Costs
            a minute or more of compilation at the first steps (and at new shapes), then runs each step
            a little faster (9% on CPU in docs/benchmarks.md; GPUs unmeasured). Off by default.
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
        lora_target_modules: module names to adapt, e.g. [q_proj, v_proj], or "all-linear" (every linear layer but
            the head and MoE routers). Default: peft's choice, else all-linear. Add lm_head to adapt the output head.
        peft_config: a full peft config as a dict (`peft.get_peft_config`; `peft_type` defaults to LORA),
            instead of the `lora_*` arguments.
        load_in_4bit: QLoRA: load the base in 4-bit (bitsandbytes NF4, bf16 compute) and train a LoRA adapter
            on it (needs `lora_r` or `peft_config`); the reference is the adapter disabled on the same 4-bit
            base, and exports merge the adapter into a bf16 copy of the base. `pip install -e .[qlora]`.
        quantization_config: `transformers.BitsAndBytesConfig`'s arguments as a dict, instead of
            `load_in_4bit`'s defaults, e.g. {bnb_4bit_quant_type: fp4, bnb_4bit_use_double_quant: true}.
        online: train online, on pairs the policy samples and a reward ranks (`online.OnlineConfig`; or a dict).
    """

    def __init__(
        self,
        model_name_or_path: str | PreTrainedModel,
        ref_model_name_or_path: str | PreTrainedModel | None = None,
        *,
        # The loss (TRL's DPOConfig names).
        beta: float = 0.1,
        loss_type: LossType | list[LossType] = "sigmoid",
        loss_weights: list[float] | None = None,
        reference_free: bool = False,
        rpo_alpha: float | None = None,
        router_aux_loss_coef: float | None = None,
        label_smoothing: float | None = None,
        simpo_gamma: float | None = None,
        dpop_lambda: float | None = None,
        rdpo_alpha: float | None = None,
        discopop_tau: float | None = None,
        f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] | None = None,
        f_alpha_divergence_coef: float | None = None,
        # The reference's log-probs, precomputed once.
        precompute_ref_log_probs: bool = False,
        precompute_ref_batch_size: int | None = None,
        ref_logps_cache_dir: str | None = None,
        # What a bad step does.
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        chosen_logp_drop_warning: float | None = None,
        # The optimizer and its schedule.
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant",
        optimizer: Literal["adamw", "rmsprop"] | OptimizerCallable = "adamw",
        # Loading the models, memory and speed.
        torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        torch_compile: bool = False,
        disable_dropout: bool = True,
        lean_logps: bool = True,
        logps_chunk_size: int = 256,
        # LoRA and QLoRA (TRL's ModelConfig names).
        lora_r: int | None = None,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str | None = None,
        peft_config: dict | None = None,
        load_in_4bit: bool = False,
        quantization_config: dict | None = None,
        # Online DPO.
        online: OnlineConfig | None = None,
    ):
        super().__init__()
        model_name_or_path, ref_model_name_or_path = as_path(model_name_or_path), as_path(ref_model_name_or_path)
        settings = OnlineConfig.of(online) if online is not None else None  # checked (a dict from Python alike)
        online = OnlineConfig.plain(settings)  # plain data in checkpoints: a function as its import path
        loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        options = {name: value for name, value in locals().items() if name in LOSS_OPTIONS and value is not None}
        # The losses, their weights and options, length normalisation, the RPO term and bco_pair's running mean.
        self.objective = Objective(loss_types, list(loss_weights or [1.0] * len(loss_types)), beta, rpo_alpha,
                                   options, reference_free)
        if learning_rate <= 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError(f"--model.learning_rate must be > 0 and weight_decay, warmup_steps >= 0; got "
                             f"{learning_rate}, {weight_decay}, {warmup_steps}")
        # A model object is left out of the hyperparameters (as TRL's model / ref_model, it is no setting): a
        # checkpoint then needs it passed again (`on_load_checkpoint` says so for the reference).
        self.save_hyperparameters(ignore=[name for name, value in (("model_name_or_path", model_name_or_path), (
            "ref_model_name_or_path", ref_model_name_or_path)) if isinstance(value, nn.Module)])

        for flag, value in (("ref_model_name_or_path", ref_model_name_or_path is not None),
                            ("precompute_ref_log_probs", precompute_ref_log_probs)):
            if value and not self.needs_reference:
                raise ValueError(f"--model.{flag} is set but the loss uses no reference (loss_type "
                                 f"{loss_types}, reference_free {reference_free}): remove it")
        if load_in_4bit or quantization_config is not None:
            model_name_or_path = quantized_base(model_name_or_path, self.hparams)
        self.policy, reference, reference_adapter = build_models(
            model_name_or_path, ref_model_name_or_path, self.needs_reference, self.hparams)
        self.objective.add_router_loss(self.policy, router_aux_loss_coef)  # a mixture of experts' load balancing
        self.uses_lean_logps = lean_logps and lean_supported(self.policy, reference)
        # One log-prob path for policy and reference: (model, batch) -> summed log-probs, mean logits, lengths.
        self.scorer = Scorer(self.uses_lean_logps, logps_chunk_size)
        # Which weights are the reference and where its log-probs come from: `reference.py`, and only there.
        source = model_name_or_path if isinstance(model_name_or_path, str) else None
        self.ref = Reference(reference, reference_adapter, self.needs_reference, self.scorer,
                             ref_model_name_or_path, source, torch_dtype, trust_remote_code, ref_logps_cache_dir,
                             precompute_ref_batch_size)
        self.model_name_or_path = base_causal_lm(self.policy).name_or_path or None  # the tokenizer's default source
        if torch_compile:  # after the lean check, which would compile for its 8 tokens
            for model in (self.policy, self.reference):
                if model is not None:
                    decoder(base_causal_lm(model)).compile(dynamic=True)  # in place: same parameter names
        self.online = settings and Online(settings, precompute_ref_log_probs, self.ref.refresh_refusal(self.policy))
        self.train_kind = train_kind(online)  # online: the data module reads prompts alone
        self.train_metrics = make_metrics(self.objective, False, (*(Online.METRICS if online else ()), *STATISTICS))
        self.train_window = LogWindow(self.train_metrics)  # the steps since the last log
        self.val_metrics = make_metrics(self.objective)
        self.val_nonfinite = NonFiniteRows()  # the validation rows whose loss or log-prob is not finite
        self._skip_step = False  # this optimizer step: a non-finite loss (nonfinite_loss: skip), or no pair (online)
        self.displacement = Displacement(chosen_logp_drop_warning) if (
            chosen_logp_drop_warning is not None and self.needs_reference) else None

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (`Objective.needs_reference`)."""
        return self.objective.needs_reference

    @property
    def reference(self) -> nn.Module | None:
        """The frozen reference model, where one is held (`Reference.model`): not with LoRA or precomputation."""
        return self.ref.model

    def setup(self, stage: str) -> None:
        check_run(self.trainer, self, stage)  # tokenizer vs embedding, writable folders, named checkpoint errors
        if self.online is not None and stage == "fit":  # what sampling needs from the run, handed over once
            self.online.bind(self.trainer.datamodule, functools.partial(self.ref.refresh, self.policy))

    def layout_unsupported(self, layout: Layout, batch: dict | None = None) -> str | None:
        """Why the policy or the reference would not give the padded layout's outputs on `layout` (and on `batch`,
        one of its batches), or None. The data module asks at setup with a batch of its own rows, to choose its layout
        (`layouts.choose_layout`); the scorer asks for every batch's layout and model (a reference loaded later).
        """
        models = [model for model in (self.policy, self.reference) if model is not None]
        return next((reason for model in models if (reason := self.scorer.unsupported(model, layout, batch))), None)

    def configure_model(self) -> None:
        # Lightning's ModelParallelStrategy (FSDP2) hands the module a device mesh and leaves the sharding to it
        # (configs/fsdp2.yaml); every other strategy wraps the module itself and sets no mesh.
        if self.device_mesh is not None:
            fully_shard_models(self, self.device_mesh["data_parallel"])
            # That strategy loads a checkpoint into the sharded module itself, before `on_load_checkpoint`
            # can add back the frozen weights `on_save_checkpoint` leaves out: it must load them non-strictly.
            self.strict_loading = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | dict]:
        sampled = self.online.pairs(self.policy, batch) if self.online is not None else None  # prompts -> pairs
        if sampled is not None:  # its pairs (where every prompt tied, a stand-in that trains with weight 0)
            batch = sampled.batch
            update_means(self.train_metrics, sampled.metrics)
        loss = self._shared_step(batch, "train", sampled.loss_scale if sampled is not None else 1.0)
        if ends_optimizer_step(self.trainer, batch_idx):  # over all its micro-batches
            self._end_train_step()
        return {"loss": loss, "batch": batch}  # the batch that trained, for the callbacks (throughput.py)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_step:  # no gradient, not a zero one (moved by momentum, decay): no weight, moment, count moves
            optimizer.zero_grad(set_to_none=True)
        elif logs_after(self.trainer, self.trainer.global_step + 1):  # TRL's learning_rate, grad_norm before clipping
            self.log("train/learning_rate", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)
            norm = grad_norm(self.policy.parameters(), self.trainer.strategy.model)
            if norm is not None:
                self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.objective.commit(taken=not self._skip_step)  # before on_train_batch_end, where checkpoints are saved

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if not self._skip_step:  # a skipped step leaves the schedule where it was, too
            super().lr_scheduler_step(scheduler, metric)

    def on_train_batch_end(self, outputs, batch: dict[str, Tensor], batch_idx: int) -> None:
        if ends_optimizer_step(self.trainer, batch_idx):
            self._skip_step = False

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "val")
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric, on_epoch=True, prog_bar=name in PROGRESS_BAR)
        return loss

    def _shared_step(self, batch: dict[str, Tensor], stage: str, scale: float = 1.0) -> Tensor:
        policy_logps, mean_logits, n_tokens, aux_loss = self.scorer(self.policy, batch, self.objective.router)  # (2B,)
        ref_logps = self.ref.logps(self.policy, batch, stage)  # (2B,), no grad; None for reference-free losses
        # Training batches join bco_pair's running mean, summed over ranks (`Objective`); MoE: the router's loss.
        out = self.objective(policy_logps, ref_logps, n_tokens, self._sum_over_ranks if stage == "train" else None,
                             aux_loss)
        if stage == "train" and not self._finite_on_every_rank(out.loss, batch):
            return out.loss  # its optimizer step is skipped: see on_before_optimizer_step
        if stage == "val":  # its NaN stays in the metrics; the rows are named at the epoch's end
            self.val_nonfinite.update(out.pair_losses, policy_logps, batch)
        if not scale:  # online, every prompt tied: a stand-in's zero gradient, where other ranks train
            return out.loss * 0
        self._update_metrics(stage, batch, out, policy_logps, ref_logps, mean_logits, n_tokens)
        return out.loss * scale  # online: times the pairs, for the step's mean over all of them (`Sampled.loss_scale`)

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum") if self._trainer is not None else tensor

    def _update_metrics(self, stage: str, batch: dict[str, Tensor], out: ObjectiveOutput, policy_logps: Tensor,
                        ref_logps: Tensor | None, mean_logits: Tensor, n_tokens: Tensor) -> None:
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        update_metrics(metrics, out, policy_logps, mean_logits, n_tokens)
        statistics = layout_of(batch).statistics(batch)  # e.g. how densely packing fills the rows
        if stage == "train":  # means over the steps since the last log
            update_means(metrics, {name: value.reshape(1) for name, value in statistics.items()})
            if self.displacement is not None:
                self.displacement.update(policy_logps, ref_logps)
        for name, value in statistics.items() if stage == "val" else ():
            self.log(f"{stage}/{name}", value, batch_size=len(out.chosen_rewards))

    def _finite_on_every_rank(self, loss: Tensor, batch: dict[str, Tensor]) -> bool:
        """Whether the loss is finite on every rank; if not, stop naming the step and rows, or mark the step skipped."""
        finite = finite_on_every_rank(loss, batch, self._trainer, self.hparams.nonfinite_loss, not self._skip_step)
        self._skip_step = self._skip_step or not finite
        return finite

    def _end_train_step(self) -> None:
        """Add the step's metrics to those since the last log (`metrics.LogWindow`), logged where Lightning logs."""
        self.train_window.add(self.train_metrics, keep=not self._skip_step)
        if self.online is not None and not self.online.step_has_pairs:  # every prompt tied on every rank: no step
            self._skip_step = True
        if self.displacement is not None:
            self.displacement.check(self.global_step, self._sum_over_ranks)
        if not logs_after(self.trainer, self.trainer.global_step + 1):
            return
        for name, value in self.train_window.read(self._sum_over_ranks).items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name in PROGRESS_BAR)

    def on_fit_start(self) -> None:
        if self.hparams.precompute_ref_log_probs:
            self.ref.precompute(self.trainer, self.policy, ["train", "val"])
        self.ref.policy_trained = True  # from the first step on, a fully fine-tuned policy is not its reference

    def on_validation_epoch_end(self) -> None:
        self.val_nonfinite.warn(self.global_rank, self.trainer.world_size)

    def on_validation_start(self) -> None:
        if self.hparams.precompute_ref_log_probs and "val" not in self.ref.tables:  # trainer.validate alone
            self.ref.precompute(self.trainer, self.policy, ["val"])

    def configure_optimizers(self):
        """The optimizer over the trainable parameters and its schedule, stepped every optimizer step (`optim.py`)."""
        return optimizers(self.hparams, self.policy.parameters(), self.trainer)

    def configure_callbacks(self) -> list[L.Callback]:
        # Tokens per second and padding in every run's logs (throughput.py); one in the Trainer's list is replaced.
        # So are Lightning's default bar and summary, by ours (console.py): the same console from Python and the CLI.
        return [Throughput(), CheckpointValidation(), StepLogs(), *console.replacements(self.trainer.callbacks),
                *([self.online] if self.online is not None else [])]  # online: marks each step's start

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable_weights(checkpoint, self.policy, self.online is not None and self.online.syncs_reference())
        # A fully fine-tuned policy no longer holds its starting weights: the reference is found from here.
        checkpoint["reference"] = self.ref.checkpoint_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_reference_source(checkpoint, self.hparams)
        migrate_state_dict(checkpoint.get("state_dict", {}))
        changed = reconcile_settings(checkpoint, dict(self.hparams))  # says what changed; the run's values win
        if changed and self._trainer is not None and self.trainer.state.fn == "fit":  # a load or export resumes nothing
            rank_zero_warn(changed)
        # Lightning loads state dicts strictly; hand it the frozen weights this module already rebuilt.
        # (ModelParallelStrategy has loaded and removed the state dict already: see configure_model.)
        for name, value in self.state_dict().items() if "state_dict" in checkpoint else ():
            checkpoint["state_dict"].setdefault(name, value)
        self.ref.load_checkpoint_state(checkpoint)
