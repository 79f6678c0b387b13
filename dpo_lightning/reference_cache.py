"""Precomputed reference log-probs: score the reference once, cache the result on disk, train with one model.

The reference is frozen, so its log-probs for a pair never change: `score_reference` runs it once over
every split (no grad, its own batch size, a progress bar; under DDP each rank scores a disjoint share
and one all-reduce gives every rank the whole table) and `DPOModule` then drops it. A table holds, per
split, one row per `row_id`: the summed log-probs of the chosen and the rejected response, which is all
every loss takes (the length-normalized ones divide by the response lengths, which the batch carries).

The cache file is named by `cache_key`: a hash of the reference's weights, the precision it ran in and
each split's token fingerprint (`data.fingerprint`, which covers the data, the tokenizer and the
truncation settings by their result). A second run on the same data and reference, e.g. with another
`beta` or `loss_type`, finds the file and never builds the reference. TRL 1.16 caches beside the dataset,
keyed by `datasets`' fingerprint and a hash of the loaded model: a separate reference model is loaded
to be hashed, and the fingerprint does not change when the tokenizing code does.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, ContextManager

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from dpo_lightning.data import PreferenceDataModule

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dpo_lightning", "reference_logps")
WEIGHT_FILES = (".safetensors", ".bin", ".json")


def weights_fingerprint(tensors: dict[str, Tensor]) -> str:
    """sha256 of named tensors' names, dtypes, shapes and bytes (a 1B model in bf16: a few seconds)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_fingerprint(name_or_path: str) -> str:
    """sha256 of a model folder's config and weight files, read from disk without loading the model.

    A hub name is identified by the commit its snapshot comes from (the hub's own content address),
    which costs one small request, or none when `HF_HUB_OFFLINE=1` and the model is cached.
    """
    if not os.path.isdir(name_or_path):
        from huggingface_hub import snapshot_download
        snapshot = snapshot_download(name_or_path, allow_patterns=["config.json"])  # .../snapshots/<commit>
        return f"{name_or_path}@{os.path.basename(os.path.normpath(snapshot))}"
    digest = hashlib.sha256()
    for path in sorted(Path(name_or_path).iterdir()):
        if path.suffix in WEIGHT_FILES and path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def cache_key(reference: str, precision: str, data: dict[str, str]) -> str:
    """The cache file's name: what the reference log-probs depend on, hashed."""
    content = json.dumps({"reference": reference, "precision": precision, "data": data, "version": 1},
                         sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:32]


def load_tables(path: str) -> dict[str, Tensor] | None:
    return load_file(path) if os.path.isfile(path) else None


def save_tables(tables: dict[str, Tensor], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial"  # a reader never sees a half-written file
    save_file({name: table.cpu().contiguous() for name, table in tables.items()}, partial)
    os.replace(partial, path)


@torch.no_grad()
def score_reference(trainer: L.Trainer, datamodule: PreferenceDataModule, splits: dict[str, Dataset],
                    logps: Callable[[dict[str, Tensor]], Tensor], weights: Callable[[], ContextManager],
                    batch_size: int) -> dict[str, Tensor]:
    """Per split, a (rows, 2) float32 table: [chosen, rejected] summed reference log-probs by `row_id`.

    Args:
        logps: the summed log-probs (2B,) of a batch under the reference, chosen rows then rejected rows.
        weights: a context manager under which `logps` computes the reference (e.g. adapters off).
        batch_size: pairs per forward pass; no activations are kept, so larger than training's fits.
    """
    rank, world = trainer.global_rank, trainer.world_size
    tables = {}
    for split, data in splits.items():
        table = torch.zeros(max(data["row_id"]) + 1, 2, device=trainer.strategy.root_device)
        loader = DataLoader(Subset(data, range(rank, len(data), world)), batch_size=batch_size,
                            collate_fn=datamodule.collate, num_workers=datamodule.hparams.num_workers)
        for batch in tqdm(loader, desc=f"reference log-probs ({split})", disable=rank != 0):
            batch = trainer.strategy.batch_to_device(batch)
            with weights(), trainer.precision_plugin.forward_context():
                chosen, rejected = logps(batch).float().chunk(2)
            table[batch["row_ids"]] = torch.stack([chosen, rejected], dim=1)
        tables[split] = trainer.strategy.reduce(table, reduce_op="sum")  # each row was scored on one rank
    return tables


def reference_table_logps(table: Tensor, row_ids: Tensor) -> Tensor:
    """The batch's reference log-probs (2B,), chosen rows then rejected rows, looked up by row id."""
    pairs = table[row_ids]  # (B, 2)
    return torch.cat([pairs[:, 0], pairs[:, 1]])


def check_splits(datamodule: object) -> dict[str, Dataset]:
    """The prepared splits to score, or an error saying why this data cannot be precomputed."""
    if not isinstance(datamodule, PreferenceDataModule):
        raise ValueError("--model.precompute_ref_log_probs needs a PreferenceDataModule attached to the Trainer "
                         f"(trainer.fit(model, datamodule=...)), got {type(datamodule).__name__}")
    splits = {"train": datamodule.train_data, "val": datamodule.val_data}
    if any(data is not None and not hasattr(data, "__len__") for data in splits.values()):
        raise ValueError("--model.precompute_ref_log_probs cannot score a stream (--data.streaming true): "
                         "prepare the data on disk, or turn precomputation off")
    return {split: data for split, data in splits.items() if data is not None}
