"""Checks at setup, before any compute is spent, that a run can finish and say where it stands (`check_run`).

A run that scores the reference, trains for hours and only then finds that it cannot write its export, or
that its tokenizer names tokens the model has no embedding for, has wasted all of it. `DPOModule.setup`
calls `check_run`, which checks, in the order a run would otherwise fail:
1. the tokenizer against the embedding: its largest id (added special tokens included) must have a row
   in the policy's (and a held reference's) input embedding, or the first step fails inside torch;
2. every folder the run will write (reference cache, checkpoints, export, preemption checkpoint) can be
   created and written, each error naming the setting that chose the folder;
3. the checkpoint to resume from, when it cannot be read, is named in the error (`NamedCheckpointIO`);
   torch's own errors (`PytorchStreamReader failed ...`, a bare `EOFError`) name no file.
"""

import contextlib
import os
import uuid

import lightning as L
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from dpo_lightning.models import base_causal_lm


def check_run(trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
    """Everything above, for `module` (a `DPOModule`) about to run `stage` under `trainer`."""
    tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    if tokenizer is not None:
        for role, model in (("policy", module.policy), ("reference", module.reference)):
            if model is not None:
                check_vocabulary(tokenizer, model, role)
    for folder, setting in output_folders(trainer, module, stage):
        check_writable(folder, setting)
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


def output_folders(trainer: L.Trainer, module: L.LightningModule, stage: str) -> list[tuple[str, str]]:
    """(folder, the setting that chose it) for every folder the run will write."""
    from dpo_lightning.callbacks import ExportPretrained, PreemptionCheckpoint  # callbacks imports the module side

    folders = []
    if module.hparams.get("precompute_ref_log_probs"):
        folders.append((module.ref.cache_dir, "--model.ref_logps_cache_dir"))
    if stage != "fit":
        return folders
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append((callback.dirpath, "ModelCheckpoint's dirpath (or --trainer.default_root_dir)"))
        elif isinstance(callback, ExportPretrained):
            folders.append((callback.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model"),
                            "ExportPretrained's dirpath (or the logger's folder)"))
        elif isinstance(callback, PreemptionCheckpoint):
            folders.append((os.path.dirname(callback.ckpt_path(trainer)),
                            "PreemptionCheckpoint's dirpath (or --trainer.default_root_dir)"))
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


class NamedCheckpointIO(CheckpointIO):
    """The strategy's checkpoint IO, whose load errors name the file and say what to do."""

    def __init__(self, inner: CheckpointIO):
        self.inner = inner

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        """Save to a temporary name of this writer's own, then rename into place: a process killed mid-save
        (SIGKILL, out of memory) leaves the previous whole file, never a part of the new one."""
        if "://" in str(path):  # a remote store: its own semantics
            return self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        partial = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
        try:
            self.inner.save_checkpoint(checkpoint, partial, storage_options=storage_options)
            os.replace(partial, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)

    def load_checkpoint(self, path, map_location=None, **kwargs):
        try:
            return self.inner.load_checkpoint(path, map_location=map_location, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as error:  # torch and pickle raise RuntimeError, EOFError, UnpicklingError, ...
            size = os.path.getsize(path) if os.path.isfile(path) else None
            raise ValueError(f"cannot read the checkpoint {path} ({size} bytes): it is truncated, empty or not a "
                             f"checkpoint ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                             "Resume from another checkpoint (an earlier one, or last.ckpt), or start without "
                             "--ckpt_path") from error

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
