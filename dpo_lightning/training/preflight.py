"""Checks at setup, before any compute is spent, that a run can finish and say where it stands (`check_run`).

A run that scores the reference, trains for hours and only then finds that it cannot write its export, or
that its tokenizer names tokens the model has no embedding for, has wasted all of it. `DPOModule.setup`
calls `check_run`, which checks, in the order a run would otherwise fail:
1. the tokenizer against the embedding: its largest id (added special tokens included) must have a row
   in the policy's (and a held reference's) input embedding, or the first step fails inside torch;
2. every folder the run will write (reference cache, checkpoints, export, preemption checkpoint) can be
   created and written, each error naming the setting that chose the folder;
3. the checkpoint to resume from, when it cannot be read, is named in the error (`NamedCheckpointIO`);
   torch's own errors (`PytorchStreamReader failed ...`, a bare `EOFError`) name no file;
4. training, the policy's attention kernel against the device: torch's FlexAttention has no backward on CPU or
   MPS, so a policy loaded with `attn_implementation="flex_attention"` would fail at the first backward with
   torch's `NotImplementedError` (validation, forward only, runs).
"""

import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from dpo_lightning.training.checkpoints import NamedCheckpointIO
from dpo_lightning.utils.hf import base_causal_lm

NO_FLEX_BACKWARD = ("cpu", "mps")  # torch.nn.attention.flex_attention raises in backward on these devices


def check_run(trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
    """Everything above, for `module` (a `DPOModule`) about to run `stage` under `trainer`."""
    tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    if tokenizer is not None:
        for role, model in (("policy", module.policy), ("reference", module.reference)):
            if model is not None:
                check_vocabulary(tokenizer, model, role)
    for folder, setting in output_folders(trainer, module, stage):
        check_writable(folder, setting)
    if stage == "fit":
        check_attention(module.policy, trainer.strategy.root_device)
    if not isinstance(trainer.strategy.checkpoint_io, NamedCheckpointIO):
        trainer.strategy.checkpoint_io = NamedCheckpointIO(trainer.strategy.checkpoint_io)


def check_vocabulary(tokenizer, model: nn.Module, role: str) -> None:
    """Raise unless every id the tokenizer can produce (its added special tokens too) has an embedding row."""
    rows = base_causal_lm(model).get_input_embeddings().num_embeddings
    largest = max([len(tokenizer) - 1, *tokenizer.all_special_ids])
    if largest >= rows:
        raise ValueError(f"the tokenizer's largest token id is {largest} ({len(tokenizer)} tokens with the added ones) "
                         f"but the {role}'s input embedding has {rows} rows: every batch holding such a token would "
                         "fail inside the embedding. Use the model's own tokenizer (--data.tokenizer), or grow the "
                         "embedding first (model.resize_token_embeddings(len(tokenizer)), then save_pretrained)")


def check_attention(policy: nn.Module, device: torch.device) -> None:
    """Raise, naming the setting, the device and the fix, where the policy's attention cannot run backward on
    `device` (`NO_FLEX_BACKWARD`)."""
    config = base_causal_lm(policy).config
    implementations = {config._attn_implementation, config.get_text_config()._attn_implementation}
    if "flex_attention" in implementations and device.type in NO_FLEX_BACKWARD:
        raise ValueError(f"attn_implementation 'flex_attention' cannot train on {device.type}: torch "
                         f"{torch.__version__}'s FlexAttention has no backward there (it validates, forward only). "
                         "Load the policy with attn_implementation='sdpa' or 'eager' (from_pretrained(..., "
                         "attn_implementation='sdpa'), or model.set_attn_implementation('sdpa') before passing it), "
                         "or train on a GPU; this is checked before any step")


def output_folders(trainer: L.Trainer, module: L.LightningModule, stage: str) -> list[tuple[str, str]]:
    """(folder, the setting that chose it) for every folder the run will write: the reference cache, Lightning's
    checkpoints, and those of any callback that says where it writes (`output_folder(trainer) -> (folder,
    setting)`: `ExportPretrained`, `PreemptionCheckpoint`)."""
    folders = []
    if module.hparams.get("precompute_ref_log_probs"):
        folders.append((module.ref.cache_dir, "--model.ref_logps_cache_dir"))
    if stage != "fit":
        return folders
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append((callback.dirpath, "ModelCheckpoint's dirpath (or --trainer.default_root_dir)"))
        elif hasattr(callback, "output_folder"):
            folders.append(callback.output_folder(trainer))
    return folders


def check_writable(folder: str, setting: str) -> None:
    """Raise, naming `setting`, unless `folder` is or can be made a folder this process can write in.

    Creates nothing: the nearest existing ancestor must be a folder (not a file) with write permission.
    """
    path = os.path.abspath(os.path.expanduser(folder))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        reason = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"this process may not write in {existing}"
    else:
        return
    raise ValueError(f"{setting}: cannot write to {folder}: {reason}. Give a folder this process can create and "
                     "write in; this is checked before any compute is spent")


