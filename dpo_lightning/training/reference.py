"""The reference, in one place: which weights compute it and where its log-probs come from (`Reference`).

`models.build_models` makes its parts, by case (docs/how_it_works.md, "The reference", says why):
1. a frozen model: `ref_model_name_or_path`, or a copy of a fully fine-tuned policy's starting weights;
2. a new LoRA adapter: the policy with the adapter disabled (no copy);
3. a pretrained adapter: the policy with `models.REFERENCE_ADAPTER`, a frozen copy of it, active.
`Reference` owns them from there on, plus the fourth source, precomputed tables (`precompute_ref_log_probs`):
the reference scores every pair of a split once (no grad, a progress bar; under DDP each rank scores a
share and one all-reduce gives every rank the whole table), the table goes to an on-disk cache, and the
reference model is dropped. A table holds, per `row_id`, the summed log-probs of the chosen and the
rejected response, which is all every loss takes (the length-normalized ones divide by lengths the batch carries).

A held reference model is frozen and switched to eval mode within each of its forwards only
(`reference_weights`), so outside them it takes the module's mode and Lightning's "modules in eval mode at
the start of training" warning counts only the user's own modules.

A fully fine-tuned policy computes its own reference only until it trains: `policy_trained` records that
it has (set at fit start, saved in checkpoints), and from then on the starting weights are reloaded from
their path, or the run stops and says what to give instead. Nothing is inferred from how the module was
built (a `ckpt_path`, say): `load_from_checkpoint` then `Trainer.validate` must not score trained weights.

A held reference model can be refreshed to the policy's current weights (`refresh`: online DPO's
`ref_model_sync_steps`, whose checkpoints then carry the reference's weights: its source no longer holds them).

The reference computes its log-probs with the scorer it is handed at construction (`scorer.Scorer`, the policy's
own log-prob path); the tables, their cache files and their names are refcache.py's.
"""

import contextlib
import os
from typing import ContextManager, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel
from torch import Tensor, nn
from torch.utils.data import Dataset

from dpo_lightning.training.logps import lean_unsupported
from dpo_lightning.training.models import POLICY_ADAPTER, load_causal_lm
from dpo_lightning.training.refcache import (DEFAULT_CACHE_DIR, cache_key, check_splits, files_fingerprint, load_table,
                                             save_table, score_reference, table_rows, weights_fingerprint)
from dpo_lightning.training.scorer import Scorer
from dpo_lightning.utils.hf import evaluating


@contextlib.contextmanager
def reference_weights(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Within the block, `model` computes the reference: in eval mode, adapters disabled or the frozen `adapter` active.

    Eval mode within the block only (no dropout, LoRA's included): outside it a held reference follows the
    module's mode, so Lightning counts no module of ours "in eval mode at the start of training". A model
    without adapters is only switched to eval mode.
    """
    with evaluating(model):
        if not isinstance(model, PeftModel):
            yield
        elif adapter is None:
            with model.disable_adapter():
                yield
        else:
            # peft's set_adapter makes the adapter it activates trainable and freezes the others; switching
            # back (before backward) restores both. No gradient is taken in between (torch.no_grad).
            model.set_adapter(adapter)
            try:
                yield
            finally:
                model.set_adapter(POLICY_ADAPTER)


class Reference(nn.Module):
    """The reference of a `DPOModule`: a frozen model, the policy's adapters switched, or precomputed tables.

    Args:
        model: the frozen reference model (case 1), or None.
        adapter: the frozen reference adapter's name on the policy (case 3), or None.
        needed: False for reference-free losses: nothing computes a reference (`logps` gives None).
        score: the log-prob path the policy trains with (`scorer.Scorer`), with which the reference is computed.
        ref_source: `ref_model_name_or_path`; with precomputation it is loaded only if the cache misses. A model
            object is `model` itself and stays held: nothing could load it again once dropped.
        policy_source: the path the policy's starting weights were loaded from (None for a model object).
        torch_dtype, trust_remote_code: how to load either source.
        cache_dir: where precomputed tables are kept (None: `DEFAULT_CACHE_DIR`).
        batch_size: pairs per forward when precomputing (None: the data's eval batch size).

    Attributes:
        tables: split -> (rows, 2) float32 [chosen, rejected] reference log-probs by `row_id`.
        fingerprint: what the reference's log-probs depend on (`_fingerprint`), once computed.
        policy_trained: whether the policy has left its starting weights (saved in checkpoints).
    """

    def __init__(self, model: nn.Module | None, adapter: str | None, needed: bool, score: Scorer,
                 ref_source: str | nn.Module | None, policy_source: str | None, torch_dtype: str | None,
                 trust_remote_code: bool, cache_dir: str | None = None, batch_size: int | None = None):
        super().__init__()
        if model is not None:
            model.requires_grad_(False).train()  # frozen; eval mode within `weights` (see `reference_weights`)
        self.model = model
        self.adapter, self.needed, self.score = adapter, needed, score
        self.ref_source, self.policy_source = ref_source if isinstance(ref_source, str) else None, policy_source
        self.held = isinstance(ref_source, nn.Module)
        self.torch_dtype, self.trust_remote_code = torch_dtype, trust_remote_code
        self.cache_dir, self.batch_size = cache_dir or DEFAULT_CACHE_DIR, batch_size
        self.tables: dict[str, Tensor] = {}
        self.fingerprint: str | None = None
        self.policy_trained = False

    def weights(self, policy: nn.Module) -> tuple[nn.Module | None, ContextManager]:
        """The model that computes the reference now, and a fresh context to run it in (`reference_weights`).

        (None, a null context) where none does: reference-free, a reference still to be loaded, or a fully
        fine-tuned policy that has trained (its starting weights are gone).
        """
        if self.model is not None:
            return self.model, reference_weights(self.model, None)
        if self._policy_computes(policy):
            return policy, reference_weights(policy, self.adapter)
        return None, contextlib.nullcontext()

    def _policy_computes(self, policy: nn.Module) -> bool:
        # With adapters the frozen base (and reference adapter) never change; all weights train otherwise.
        return (self.needed and self.ref_source is None and not self.held
                and (isinstance(policy, PeftModel) or not self.policy_trained))

    def refresh_refusal(self, policy: nn.Module) -> str | None:
        """Why `refresh` cannot copy `policy` into this reference (online DPO's `ref_model_sync_steps`), with the fix;
        None where it can: a reference model of its own, of the policy's kind."""
        if not self.needed:
            return ("the loss takes no reference (a reference-free loss_type, or reference_free: true), so there is "
                    "none to sync: remove ref_model_sync_steps, or train with a reference loss")
        if self.model is None:
            return ("with LoRA the reference is the adapter switched off (or a frozen copy of it), which no policy "
                    "weights can be copied into: remove ref_model_sync_steps, or fully fine-tune (no lora_r, "
                    "peft_config or adapter folder)")
        if isinstance(policy, PeftModel):
            return ("the policy is a LoRA adapter and the reference (ref_model_name_or_path) a whole model: the "
                    "adapter's weights cannot be copied into it: remove ref_model_sync_steps, or fully fine-tune")
        return None

    @torch.no_grad()
    def refresh(self, policy: nn.Module) -> None:
        """Make the policy's current weights the reference's (iterative DPO). Under FSDP2 both are sharded alike
        (`distributed.fully_shard_models`), so each rank copies its own shards."""
        refusal = self.refresh_refusal(policy)
        if refusal:
            raise RuntimeError(f"cannot refresh the reference: {refusal}")
        self.model.load_state_dict(policy.state_dict())

    def logps(self, policy: nn.Module, batch: dict[str, Tensor], stage: str) -> Tensor | None:
        """The batch's summed reference log-probs (2B,), chosen rows then rejected: looked up, or computed
        without grad; None when the loss takes no reference."""
        if not self.needed:
            return None
        if stage in self.tables:
            pairs = self.tables[stage][batch["row_ids"]]  # (B, 2)
            return torch.cat([pairs[:, 0], pairs[:, 1]])
        model, context = self.weights(policy)
        if model is None:
            raise RuntimeError(f"no reference for the {stage} batches: no table was precomputed for {stage!r}, "
                               "and no model computes the reference (the policy has trained)")
        with torch.no_grad(), context:
            return self.score(model, batch)[0]

    def precompute(self, trainer: L.Trainer, policy: nn.Module, stages: list[str]) -> None:
        """Fill `tables` for `stages`: from the cache, or scored now and saved; then hold no reference model."""
        splits = {s: d for s, d in check_splits(trainer.datamodule).items() if s in stages}
        # Rank 0's, so that every rank names the same files (under FSDP each rank hashes its own shard).
        self.fingerprint = trainer.strategy.broadcast(self.fingerprint or self._fingerprint(policy))
        paths = {split: os.path.join(self.cache_dir, cache_key(self.fingerprint, str(trainer.precision),
                                                               trainer.datamodule.fingerprint(split)) + ".safetensors")
                 for split in splits}
        cached = {split: load_table(path, table_rows(splits[split])) for split, path in paths.items()}
        # Every rank must score the same splits (scoring calls collectives), so a split counts as cached
        # only where every rank found it.
        found = torch.tensor([float(cached[split] is not None) for split in splits],
                             device=trainer.strategy.root_device)
        everywhere = (trainer.strategy.reduce(found, reduce_op="sum") == trainer.world_size).tolist()
        missing = {split: data for (split, data), hit in zip(splits.items(), everywhere) if not hit}
        tables = self._score(trainer, policy, missing) if missing else {}
        if trainer.is_global_zero:
            for split, table in tables.items():
                save_table(table, paths[split])
        tables.update({split: cached[split].to(trainer.strategy.root_device) for split in splits if split not in missing})
        self.tables.update(tables)
        self.model = self.model if self.held else None
        rank_zero_info(f"[dpo_lightning] reference log-probs: {sorted(missing)} scored, "
                       f"{sorted(set(splits) - set(missing))} read from the cache {self.cache_dir}; "
                       "training holds the policy alone")

    def _score(self, trainer: L.Trainer, policy: nn.Module, splits: dict[str, Dataset]) -> dict[str, Tensor]:
        """`score_reference` with the model that computes the reference, loading it from its path if none does."""
        if self.weights(policy)[0] is None:
            self.model = self._load()
        model, score = self.weights(policy)[0], self.score
        if model is not policy:  # loaded here (now, or for its fingerprint), on the CPU
            model.to(trainer.strategy.root_device)
            if lean_unsupported(model):  # another architecture than the policy's, which `score` was checked on
                score = score.full_logits()
        hp = trainer.datamodule.hparams
        return score_reference(trainer, trainer.datamodule, splits, lambda batch: score(model, batch)[0],
                               lambda: self.weights(policy)[1], self.batch_size or hp.eval_batch_size or hp.batch_size)

    def _load(self) -> nn.Module:
        """The reference's weights from their path: `ref_model_name_or_path`, or the policy's starting weights."""
        source = self.ref_source or self.policy_source
        if source is None:
            raise ValueError("no cached reference log-probs for this data, and the policy has trained, so it no "
                             "longer holds its starting weights, which were passed as a model object, not a path: "
                             "give --model.ref_model_name_or_path (the starting weights' path), or restore the "
                             f"cache files in {self.cache_dir}")
        setting = "--model.ref_model_name_or_path" if self.ref_source else "--model.model_name_or_path"
        return load_causal_lm(source, self.torch_dtype, self.trust_remote_code, setting).requires_grad_(False)

    def _fingerprint(self, policy: nn.Module) -> str:
        """Its weight files and dtype, the weights it is computed from, or the starting weights reloaded."""
        if self.ref_source is not None:
            return files_fingerprint(self.ref_source) + str(self.torch_dtype)
        if isinstance(policy, PeftModel):  # the frozen weights are the reference: the base (and reference adapter)
            return weights_fingerprint({n: p for n, p in policy.named_parameters() if not p.requires_grad})
        if self.model is None and not self.policy_trained:
            return weights_fingerprint(dict(policy.named_parameters()))  # all of them, frozen or not
        if self.model is None:
            self.model = self._load()
        return weights_fingerprint(dict(self.model.named_parameters()))

    def checkpoint_state(self) -> dict:
        """What a later run needs to find this reference: `fingerprint` and `policy_trained`."""
        return {"fingerprint": self.fingerprint, "policy_trained": self.policy_trained}

    def load_checkpoint_state(self, checkpoint: dict) -> None:
        """Restore `checkpoint_state` from a checkpoint dict (one saved before it: from its old keys)."""
        state = checkpoint.get("reference") or {"fingerprint": checkpoint.get("reference_fingerprint"),
                                                "policy_trained": checkpoint.get("global_step", 0) > 0}
        self.fingerprint, self.policy_trained = state["fingerprint"], state["policy_trained"]
