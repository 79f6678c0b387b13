"""The reference, in one place: which weights compute it and where its log-probs come from (`Reference`).

`models.build_models` makes its parts, by case (the README's "The reference" says why):
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

The cache file is named by `cache_key`: the reference's fingerprint (its weight files, or the weights it
is computed from), the precision, each split's token fingerprint (`data.fingerprint`: the data, the
tokenizer and the truncation settings by their result) and `code_fingerprint` (the log-prob code and the
torch and transformers versions), so a fix in `logps.py` or `packing.py` is never served old tables.
TRL 1.16 caches beside the dataset, keyed by `datasets`' fingerprint and a hash of the loaded model.
"""

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import lightning as L
import torch
import transformers
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dpo_lightning import logps, packing
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.logps import lean_unsupported, naive_logps
from dpo_lightning.models import POLICY_ADAPTER, evaluating, load_causal_lm

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dpo_lightning", "reference_logps")
WEIGHT_FILES = (".safetensors", ".bin", ".json")
LOGPROB_CODE = (logps, packing)  # the modules that turn a batch into the log-probs a table stores
# (model, batch) -> summed log-probs, mean logits and lengths, each (2B,): the module's log-prob path (logps.py)
Score = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, Tensor, Tensor]]


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
        score: the module's log-prob path (`Score`), with which the reference is computed.
        ref_source: `ref_model_name_or_path`; with precomputation it is loaded only if the cache misses.
        policy_source: the path the policy's starting weights were loaded from (None for a model object).
        torch_dtype, trust_remote_code: how to load either source.
        cache_dir: where precomputed tables are kept (None: `DEFAULT_CACHE_DIR`).
        batch_size: pairs per forward when precomputing (None: the data's eval batch size).

    Attributes:
        tables: split -> (rows, 2) float32 [chosen, rejected] reference log-probs by `row_id`.
        fingerprint: what the reference's log-probs depend on (`_fingerprint`), once computed.
        policy_trained: whether the policy has left its starting weights (saved in checkpoints).
    """

    def __init__(self, model: nn.Module | None, adapter: str | None, needed: bool, score: Score,
                 ref_source: str | None, policy_source: str | None, torch_dtype: str | None,
                 trust_remote_code: bool, cache_dir: str | None = None, batch_size: int | None = None):
        super().__init__()
        if model is not None:
            model.requires_grad_(False).train()  # frozen; eval mode within `weights` (see `reference_weights`)
        self.model = model
        self.adapter, self.needed, self.score = adapter, needed, score
        self.ref_source, self.policy_source = ref_source, policy_source
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
        return self.needed and self.ref_source is None and (isinstance(policy, PeftModel) or not self.policy_trained)

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
        cached = {split: load_tables(path) for split, path in paths.items()}
        # Every rank must score the same splits (scoring calls collectives), so a split counts as cached
        # only where every rank found it.
        found = torch.tensor([float(cached[split] is not None) for split in splits],
                             device=trainer.strategy.root_device)
        everywhere = (trainer.strategy.reduce(found, reduce_op="sum") == trainer.world_size).tolist()
        missing = {split: data for (split, data), hit in zip(splits.items(), everywhere) if not hit}
        tables = self._score(trainer, policy, missing) if missing else {}
        if trainer.is_global_zero:
            for split, table in tables.items():
                save_tables({split: table}, paths[split])
        tables.update({split: cached[split][split].to(trainer.strategy.root_device)
                       for split in splits if split not in missing})
        self.tables.update(tables)
        self.model = None
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
                score = naive_logps
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
        return load_causal_lm(source, self.torch_dtype, self.trust_remote_code).requires_grad_(False)

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


def code_fingerprint() -> str:
    """sha256 of the log-prob code's source files (`LOGPROB_CODE`) and the torch and transformers versions."""
    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for module in LOGPROB_CODE:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def cache_key(reference: str, precision: str, data: str | None) -> str:
    """The cache file's name: what the reference log-probs depend on, hashed."""
    content = json.dumps({"reference": reference, "precision": precision, "data": data, "code": code_fingerprint()},
                         sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:32]


def load_tables(path: str) -> dict[str, Tensor] | None:
    return load_file(path) if os.path.isfile(path) else None


def save_tables(tables: dict[str, Tensor], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial"  # a reader never sees a half-written file
    save_file({name: table.cpu().contiguous() for name, table in tables.items()}, partial)
    os.replace(partial, path)


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
def score_reference(trainer: L.Trainer, datamodule: PreferenceDataModule, splits: dict[str, Dataset],
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
        rows = max(data["row_id"]) + 1
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
    """The prepared splits to score, or an error saying why this data cannot be precomputed."""
    if not isinstance(datamodule, PreferenceDataModule):
        raise ValueError("--model.precompute_ref_log_probs needs a PreferenceDataModule attached to the Trainer "
                         f"(trainer.fit(model, datamodule=...)), got {type(datamodule).__name__}")
    splits = {"train": datamodule.train_data, "val": datamodule.val_data}
    if any(data is not None and not hasattr(data, "__len__") for data in splits.values()):
        raise ValueError("--model.precompute_ref_log_probs cannot score a stream (--data.streaming true): "
                         "prepare the data on disk, or turn precomputation off")
    return {split: data for split, data in splits.items() if data is not None}
