"""The reference log-prob cache: precomputed tables, their on-disk files and what names them.

A table holds, per `row_id`, the summed log-probs of a split's chosen and rejected responses under the reference,
scored once (`score_reference`: no grad, a progress bar; under DDP each rank scores a share and one all-reduce gives
every rank the whole table). The cache file is named by `cache_key`: the reference's fingerprint (its weight files,
`files_fingerprint`, or the weights it is computed from, `weights_fingerprint`), the precision, each split's token
fingerprint (`data.summary.fingerprint`: the data, the tokenizer and the truncation settings by their result) and
`code_fingerprint` (the source of every module the log-probs run through, and the torch and transformers versions),
so a fix in the log-prob, layout or labelling code is never served old tables. Each file holds one split's table
(splits with the same pairs share it), written atomically (`save_table`) and verified when read (`load_table`:
keys, rows, dtype, finite values); a file that fails is set aside with a warning naming it, and scored again.
TRL 1.16 caches beside the dataset, keyed by `datasets`' fingerprint and a hash of the loaded model.
"""

import ast
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager

import lightning as L
import torch
import transformers
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dpo_lightning.training import logps
from dpo_lightning.utils.atomic import atomic_path

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dpo_lightning", "reference_logps")
WEIGHT_FILES = (".safetensors", ".bin", ".json")
TABLE_KEY = "logps"  # a cache file holds one split's table, under this name
PREPARED_DATA = ("train_data", "val_data", "fingerprint", "collate", "hparams")  # what precomputation reads


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


def logprob_modules() -> list[str]:
    """The source files the log-probs a table stores run through: `training/logps.py` and every module of this
    package it imports, transitively (the layouts, the labelling rule, the model helpers), read from their import
    statements, so a module the log-prob code starts to import joins the fingerprint without a list to edit."""
    files, todo = {}, [logps]
    while todo:
        module = todo.pop()
        if module.__name__ in files:
            continue
        files[module.__name__] = module.__file__
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpo_lightning."):
                todo.append(sys.modules[node.module])  # imported already: logps imported it
    return [files[name] for name in sorted(files)]


def code_fingerprint() -> str:
    """sha256 of the log-prob code's source files (`logprob_modules`) and the torch and transformers versions."""
    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for path in logprob_modules():
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def cache_key(reference: str, precision: str, data: str | None) -> str:
    """The cache file's name: what the reference log-probs depend on, hashed."""
    content = json.dumps({"reference": reference, "precision": precision, "data": data, "code": code_fingerprint()},
                         sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:32]


def table_rows(data: Dataset) -> int:
    """Rows of a split's table: one per `row_id`, 0 to the largest."""
    return max(data["row_id"]) + 1


def load_table(path: str, rows: int) -> Tensor | None:
    """The (rows, 2) float32 table cached at `path`, verified; None if there is none or it fails the check.

    A file that cannot be read, or holds other keys, another shape or dtype, or a non-finite value, is set
    aside as `<path>.<time>.bad`, with a warning naming it, and the table is scored again.
    """
    if not os.path.isfile(path):
        return None
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError for truncated, empty or garbage files
        problem = f"cannot be read ({type(error).__name__}: {error})"
    else:
        table = tensors.get(TABLE_KEY)
        if set(tensors) != {TABLE_KEY}:
            problem = f"holds the tables {sorted(tensors)}, not one {TABLE_KEY!r}"
        elif table.dtype != torch.float32 or tuple(table.shape) != (rows, 2):
            problem = f"holds a {table.dtype} table of shape {tuple(table.shape)}, not float32 ({rows}, 2)"
        elif not torch.isfinite(table).all():
            problem = f"holds {int((~torch.isfinite(table)).sum())} non-finite log-probs"
        else:
            return table
    aside = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}.bad"
    with contextlib.suppress(FileNotFoundError):  # another rank set it aside first
        os.replace(path, aside)
    rank_zero_warn(f"the reference log-prob cache file {path} {problem}: set aside as {aside}; scoring the "
                   "reference again")
    return None


def save_table(table: Tensor, path: str) -> None:
    """Write `table` to `path` atomically (`atomic_path`): a reader sees the old file or the whole new one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as partial:
        save_file({TABLE_KEY: table.cpu().contiguous()}, partial)


def rank_share(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's rows of `n` (every `world`-th from `rank`) and how many are its own, padded to ceil(n / world).

    Every rank then runs the same number of forwards: under FSDP a forward is a collective, and a rank with
    one batch fewer would leave the others waiting forever. The padding repeats row 0; its result is discarded.

    Example:
        n=7, world=2: rank 0 -> ([0, 2, 4, 6], 4); rank 1 -> ([1, 3, 5, 0], 3).
    """
    own = list(range(rank, n, world))
    return own + [0] * (-(-n // world) - len(own)), len(own)


class RankShare(Dataset):
    """A rank's `rank_share` of a split; the padding rows carry `row_id` = `scratch_row`, outside the table."""

    def __init__(self, data: Dataset, rank: int, world: int, scratch_row: int):
        self.data, self.scratch_row = data, scratch_row
        self.indices, self.own = rank_share(len(data), rank, world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        row = self.data[self.indices[i]]
        return row if i < self.own else {**row, "row_id": self.scratch_row}


@torch.no_grad()
def score_reference(trainer: L.Trainer, datamodule: L.LightningDataModule, splits: dict[str, Dataset],
                    logps: Callable[[dict[str, Tensor]], Tensor], weights: Callable[[], ContextManager],
                    batch_size: int) -> dict[str, Tensor]:
    """Per split, a (rows, 2) float32 table: [chosen, rejected] summed reference log-probs by `row_id`.

    Args:
        logps: the summed log-probs (2B,) of a batch under the reference, chosen rows then rejected rows.
        weights: a fresh context manager under which `logps` computes the reference (e.g. adapters off).
        batch_size: pairs per forward pass; no activations are kept, so larger than training's fits.
    """
    rank, world = trainer.global_rank, trainer.world_size
    tables = {}
    for split, data in splits.items():
        rows = table_rows(data)
        table = torch.zeros(rows + 1, 2, device=trainer.strategy.root_device)  # the last row takes the padding
        loader = DataLoader(RankShare(data, rank, world, scratch_row=rows), batch_size=batch_size,
                            collate_fn=datamodule.collate, num_workers=datamodule.hparams.num_workers)
        for batch in tqdm(loader, desc=f"reference log-probs ({split})", disable=rank != 0):
            batch = trainer.strategy.batch_to_device(batch)
            with weights(), trainer.precision_plugin.forward_context():
                chosen, rejected = logps(batch).float().chunk(2)
            table[batch["row_ids"]] = torch.stack([chosen, rejected], dim=1)
        tables[split] = trainer.strategy.reduce(table, reduce_op="sum")[:rows]  # each row was scored on one rank
    return tables


def check_splits(datamodule: object) -> dict[str, Dataset]:
    """The prepared splits to score, or an error saying why this data cannot be precomputed.

    Any data module with what `PreferenceDataModule` offers here will do: `train_data` and `val_data` (rows
    with a `row_id`), `fingerprint(split)`, `collate` and `hparams` with the batch sizes and `num_workers`.
    """
    if not all(hasattr(datamodule, name) for name in PREPARED_DATA):
        raise ValueError("--model.precompute_ref_log_probs needs a PreferenceDataModule attached to the Trainer "
                         f"(trainer.fit(model, datamodule=...)), got {type(datamodule).__name__}")
    splits = {"train": datamodule.train_data, "val": datamodule.val_data}
    if any(data is not None and not hasattr(data, "__len__") for data in splits.values()):
        raise ValueError("--model.precompute_ref_log_probs cannot score a stream (--data.streaming true): "
                         "prepare the data on disk, or turn precomputation off")
    return {split: data for split, data in splits.items() if data is not None}


