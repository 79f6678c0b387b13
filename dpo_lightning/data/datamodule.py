"""The preference DataModule: sources, splits, caches and the data summary, around the rules.

`PreferenceDataModule` reads each split (sources.py), detects its format (formats.py), maps rules.py's
`prepare_rows` over it (rules 1 to 3, cached by `datasets` under a name that changes with the rules' code),
counts and drops unusable rows (summary.py) and batches the rest in the layout `layouts.choose_layout` picks
(batches.py's `collate_pairs`, rule 4, or packing.py's `collate_shared`).

Online DPO trains on prompts alone: the module being fit says so (its `train_kind`, "prompts"), the data module
records it once (`train_kind`) and every reader asks that: which columns are read (sources.py), how the rows are
prepared (prompts.py) and batched (`collate_prompts`). The pairs the policy then writes come back through
`pair_batch` (rule 3 and the layout). Validation reads preference pairs in either case.
"""

import hashlib
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Literal

import lightning as L
import torch
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from dpo_lightning.data import files, formats, prompts, rows, rules, schemas, sources
from dpo_lightning.data.checks import check_arguments, check_drops, check_stream, keep_row
from dpo_lightning.data.formats import PRESETS, detect_format
from dpo_lightning.data.layouts import Layout, choose_layout
from dpo_lightning.data.loaders import EvalSampler, ResumableLoader, data_seed
from dpo_lightning.data.prompts import PREPARED_PROMPTS, collate_prompts, prepare_prompts, prompt_format
from dpo_lightning.data.rows import Reading, RowKind
from dpo_lightning.data.schemas import warn_ignored
from dpo_lightning.data.rules import PREPARED, adds_bos, drop_error, prepare_rows, truncate
from dpo_lightning.data.sources import (STAGE_NAMES, DatasetSource, load_rows, resolve_transform,
                                        single_split)
from dpo_lightning.data.summary import fingerprint, format_summary, render, summarize, truncation_warning
from dpo_lightning.utils.locate import as_path, located_data
from dpo_lightning.utils.tokenizers import load_tokenizer, tokenizer_source, with_pad_token

# The code that turns rows into prepared rows: part of every map's cache name (`_map`).
DATA_CODE = hashlib.sha256(b"".join(open(module.__file__, "rb").read()
                                    for module in (rows, rules, formats, schemas, files, sources, prompts))).hexdigest()


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs for DPO: loads, checks, tokenizes once (cached by `datasets`), and batches.

    Args:
        dataset: training rows: a hub dataset name (or "hh" for Anthropic/hh-rlhf), a local file
            (.json/.jsonl/.ndjson/.parquet/.csv, optionally .gz), a glob or list of files, a folder of split files
            or one `save_to_disk` wrote, an in-memory dict of columns or list of rows, or a `datasets.Dataset`/
            `DatasetDict`.
        eval_dataset: validation rows, in any of the forms of `dataset`. Default: `eval_split` of
            `dataset`, else `eval_fraction` of the training rows, else no validation.
        tokenizer: tokenizer name or path (or object). Default: the model's (`DPOModule.model_name_or_path`).
        dataset_format: how rows hold prompt and responses (see formats.py); "auto" detects it from the
            columns' types and a sample of rows. Public datasets' columns (schemas.py) are detected too.
        prompt_column: the column holding the prompt, when it is not called "prompt".
        chosen_column: the column holding the preferred response, when it is not called "chosen".
        rejected_column: the column holding the dispreferred response, when it is not called "rejected".
        label_column: for a set of two responses and a label saying which is preferred (schemas.py), the label to
            follow where it has two: PKU-SafeRLHF's `better_response_id` or `safer_response_id`.
        chat_template_kwargs: the chat template's own arguments for every row, e.g. `{"enable_thinking": false}`
            (TRL's name); a row's own `chat_template_kwargs` column wins over it, key by key.
        dataset_config: the hub dataset's configuration name (`name` of `datasets.load_dataset`).
        data_dir: the hub dataset's sub-folder (`data_dir` of `datasets.load_dataset`), e.g. "harmless-base".
        split: split of `dataset` to train on.
        eval_split: split of `dataset` to validate on, e.g. "test".
        eval_fraction: share of the training rows held out for validation when no eval data is named.
        streaming: read the training rows as a stream (`datasets.IterableDataset`) instead of preparing
            them on disk first, for data too big for that; set `trainer.max_steps`. No drop counts then.
        max_length: maximum tokens of prompt + response (rule 3).
        max_prompt_length: prompt tokens kept when a pair is too long (rule 3).
        truncation_mode: which end of a too-long prompt to keep (rule 3).
        strict: raise on the first unusable row (naming the split, the row, the field and the fix)
            instead of dropping and counting it.
        max_drop_fraction: fail at setup when more than this share of a split's rows is dropped.
        batch_size: preference pairs per batch and device; a batch holds 2 * batch_size sequences.
        eval_batch_size: pairs per validation batch. Default: `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the training order, the `eval_fraction` split and the streaming shuffle. Default: the global
            seed (`seed_everything`; TRL's `data_seed` defaults to its `seed` likewise), 42 where none is set.
        prefix_sharing: batch each pair as one `[prompt | chosen | rejected]` row (packing.py), so each
            prompt runs through the model once; needs a model that takes a custom 4D attention mask. "auto":
            on when the model being fit passes `packing.shared_layout_unsupported` (its outputs on the
            shared layout equal the padded layout's), else the padded layout; the choice and its reason
            are printed at fit start (layouts.py). true: such a model is refused with an error.
        packing: with prefix_sharing, pack several pairs per row, up to `packing_max_tokens` tokens a row.
            "auto": on whenever prefix sharing is.
        packing_max_tokens: the packed rows' length budget. Default: `max_length`. A pair holds a prompt
            and two responses, so short pairs (under half of `max_length`) pack only with a larger budget;
            attention costs grow with the square of the row length.
        dataset_num_proc: processes that check and tokenize rows (`datasets.map(num_proc=...)`, TRL's name).
            Default: one; the tokenizer itself already encodes each batch on every core.
        transform: a function applied to each raw row before anything else, returning the row to use (any
            columns a format or schema reads) or None to drop it (counted as `dropped by transform`); from
            YAML, its import path, e.g. `my_module.my_function`.
    """

    def __init__(
        self,
        dataset: DatasetSource,
        eval_dataset: DatasetSource | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        dataset_format: Literal["auto", "explicit", "hh", "implicit", "conversational"] = "auto",
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        label_column: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        dataset_config: str | None = None,
        data_dir: str | None = None,
        split: str = "train",
        eval_split: str | None = None,
        eval_fraction: float = 0.0,
        streaming: bool = False,
        max_length: int = 512,
        max_prompt_length: int = 128,
        truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
        strict: bool = False,
        max_drop_fraction: float | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
        prefix_sharing: bool | Literal["auto"] = "auto",
        packing: bool | Literal["auto"] = "auto",
        packing_max_tokens: int | None = None,
        dataset_num_proc: int | None = None,
        transform: str | Callable[[dict], dict | None] | None = None,
    ):
        super().__init__()
        dataset, eval_dataset, tokenizer = as_path(dataset), as_path(eval_dataset), as_path(tokenizer)  # a notebook's Path
        # A tokenizer name is kept with the hyperparameters (the export finds it there); an object is not.
        objects = ["transform"] + ([] if tokenizer is None or isinstance(tokenizer, str) else ["tokenizer"])
        self.save_hyperparameters(ignore=["dataset", "eval_dataset", *objects])
        check_arguments(self.hparams)
        if isinstance(dataset, str) and dataset in PRESETS:
            dataset, preset_format = PRESETS[dataset]
            self.hparams.dataset_format = preset_format if dataset_format == "auto" else dataset_format
        located_data(dataset, "--data.dataset")  # a path that is not there fails now, before a model loads
        located_data(eval_dataset, "--data.eval_dataset")
        self.dataset, self.eval_dataset, self.tokenizer, self.transform = dataset, eval_dataset, tokenizer, transform
        self.train_data: Dataset | IterableDataset | None = None
        self.val_data: Dataset | None = None
        self.seed: int | None = None  # `data_seed`, at setup
        self.summary: dict[str, dict[str, Any]] = {}
        self._fingerprints: dict[str, str | None] = {}
        self.layout: Layout = self._choose_layout()[0]  # without a model to check: refined in `setup`
        self.train_kind: RowKind = "pairs"  # what the training split holds, as the module being fit asks (`_build`)
        self._prepare_error: Exception | None = None  # a data error met by `prepare_data`, for `setup` to raise

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads and tokenizes file-backed sources into the `datasets`
        # cache, so that `setup` on every rank reads it (and prints the summary once) instead of tokenizing.
        # An error in the data is raised in `setup`, which every rank runs: raised here, it would stop this
        # process alone, the other ranks waiting for it at the barrier before `setup` (gloo: "Connection closed").
        if isinstance(self.dataset, str) or isinstance(self.eval_dataset, str):
            try:
                self._build(report=False, with_train=self.trainer is None or self.trainer.state.fn != "validate")
            except Exception as error:  # noqa: BLE001 - raised again, unchanged, by `setup`
                self._prepare_error = error

    def setup(self, stage: str | None = None) -> None:
        if self._prepare_error is not None:
            error, self._prepare_error = self._prepare_error, None
            raise error
        if self.train_data is None:  # `validate` prepares the validation split alone (train_data stays None)
            self.train_data, self.val_data = self._build(with_train=stage != "validate")
        self.layout, reason = self._choose_layout()
        if self.trainer is not None and stage == "fit":
            rank_zero_info(f"[dpo_lightning] batch layout: {self.layout.name} ({reason})")

    def _choose_layout(self) -> tuple[Layout, str]:
        """`layouts.choose_layout` for this module's settings, checked on the models of the module being fit and on
        a batch of the first training pairs, or validation pairs for `validate` (rows, lengths, packing as theirs)."""
        hp = self.hparams
        module = self.trainer.lightning_module if self.trainer is not None else None
        rows, size = ((self.train_data, hp.batch_size) if self.train_data is not None
                      else (self.val_data, hp.eval_batch_size or hp.batch_size))
        rows = rows if isinstance(rows, Dataset) else []  # a stream: the scorer checks its first batch
        sample = [rows[i] for i in range(min(size, len(rows)))]
        return choose_layout(hp.prefix_sharing, hp.packing, hp.packing_max_tokens or hp.max_length,
                             getattr(module, "layout_unsupported", None),
                             sample if sample and sample[0]["chosen_input_ids"] else None,  # not online's prompts
                             getattr(self.tokenizer, "pad_token_id", None) or 0)

    def _build(self, report: bool = True, with_train: bool = True) -> tuple[Dataset | IterableDataset | None,
                                                                           Dataset | None]:
        hp = self.hparams
        self.seed = data_seed(hp.seed)  # the global seed as set now: seed_everything runs before setup
        tokenizer = self._resolve_tokenizer()
        columns = {"prompt": hp.prompt_column, "chosen": hp.chosen_column, "rejected": hp.rejected_column}
        load = partial(load_rows, name=hp.dataset_config, data_dir=hp.data_dir, columns=columns,
                       transform=resolve_transform(self.transform), chat=bool(tokenizer.chat_template),
                       label_column=hp.label_column)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:  # else as set (`inspect-data` sets it from the config, as the module would)
            self.train_kind = getattr(module, "train_kind", "pairs")
        if self.train_kind == "prompts" and hp.eval_fraction > 0:
            raise ValueError(f"--data.eval_fraction {hp.eval_fraction} would hold out prompts, but validation reads "
                             "preference pairs, also when training online: give them with --data.eval_dataset (or "
                             "--data.eval_split), or set eval_fraction 0")
        train, reading = load(self.dataset, hp.split, streaming=hp.streaming, kind=self.train_kind)
        val, val_reading = None, reading
        if self.eval_dataset is not None:
            val, val_reading = load(self.eval_dataset, hp.eval_split or hp.split, stage="val")
        elif hp.eval_split is not None:
            if single_split(self.dataset):  # a file has no other split: it would validate on the train rows
                raise ValueError(f"--data.eval_split {hp.eval_split!r}: the dataset is one split (a local file, "
                                 "list or Dataset), so validation would run on the training rows. Give eval rows "
                                 "with --data.eval_dataset, hold some out with --data.eval_fraction, or point "
                                 f"--data.dataset at a folder or hub dataset with a {hp.eval_split!r} split")
            val, val_reading = load(self.dataset, hp.eval_split, stage="val")
        elif hp.eval_fraction > 0:
            parts = train.train_test_split(test_size=hp.eval_fraction, seed=self.seed)
            train, val = parts["train"], parts["test"]
        elif report:  # Lightning's own hint would be "Total length of `list` across ranks is zero"
            rank_zero_warn("no validation data: this run logs no val/ metrics, keeps no checkpoint on a val "
                           "metric and generates no samples. Name held-out pairs with eval_dataset "
                           "(--data.eval_dataset) or eval_split (--data.eval_split), or hold out a share of "
                           "the training rows with eval_fraction, e.g. 0.1 (--data.eval_fraction)")
        train = self._prepare_split(train, "train", tokenizer, reading, report) if with_train else None
        val = self._prepare_split(val, "val", tokenizer, val_reading, report) if val is not None else None
        return train, val

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if not isinstance(self.tokenizer, PreTrainedTokenizerBase):
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = load_tokenizer(tokenizer_source(self.tokenizer, getattr(module, "model_name_or_path", None)))
        return with_pad_token(self.tokenizer)

    def _prepare_split(self, rows: Dataset | IterableDataset, stage: str, tokenizer: PreTrainedTokenizerBase,
                       reading: Reading, report: bool = True) -> Dataset | IterableDataset:
        hp, prompts = self.hparams, stage == "train" and self.train_kind == "prompts"  # online training's prompts
        if prompts:
            fmt, reading, prepare = prompt_format(rows, tokenizer, stage), replace(reading, schema="prompts"), \
                prepare_prompts
            features = PREPARED_PROMPTS
        else:
            rows, fmt, reading = detect_format(rows, hp.dataset_format, stage, tokenizer, reading, hp.prompt_column)
            prepare, features = prepare_rows, PREPARED
        warn_ignored(reading, STAGE_NAMES[stage])
        if hp.chat_template_kwargs and fmt != "conversational":
            rank_zero_warn(f"--data.chat_template_kwargs is not used: the {STAGE_NAMES[stage]} rows are text ({fmt}), "
                           "tokenized as they are; only conversations are rendered by a chat template")
        prepared = _map(rows, prepare, f"preparing {STAGE_NAMES[stage]} rows ({fmt})", batched=True,
                        with_indices=True, remove_columns=rows.column_names or list(next(iter(rows))),
                        features=features, num_proc=hp.dataset_num_proc, fn_kwargs=dict(
                            dataset_format=fmt, tokenizer=tokenizer, bos_token_id=adds_bos(tokenizer),
                            max_length=hp.max_length, max_prompt_length=hp.max_prompt_length,
                            truncation_mode=hp.truncation_mode, chat_template_kwargs=hp.chat_template_kwargs))
        if isinstance(prepared, IterableDataset):  # a stream: no counts, rows are checked as they come
            check_stream(prepared, STAGE_NAMES[stage])
            prepared = prepared.filter(keep_row, input_columns=["drop_reason", "row_id"],
                                       fn_kwargs=dict(strict=hp.strict, stage=stage)).remove_columns("drop_reason")
            if self.trainer is not None and self.trainer.world_size > 1:
                prepared = split_dataset_by_node(prepared, self.trainer.global_rank, self.trainer.world_size)
            return prepared
        self.summary[stage] = {**summarize(prepared, hp.max_length), "schema": reading.schema,
                               "ignored": list(reading.ignored), "prompts": prompts}
        if hp.strict and self.summary[stage]["dropped"]:  # the first bad row, by its position in the split
            first = prepared.filter(bool, input_columns="drop_reason")[0]
            raise drop_error(first["drop_reason"], first["row_id"], stage)
        if report:
            rank_zero_info(f"[dpo_lightning] {STAGE_NAMES[stage]} data: {format_summary(self.summary[stage])}")
            if (warning := truncation_warning(self.summary[stage], STAGE_NAMES[stage])) is not None:
                rank_zero_warn(warning)
        check_drops(self.summary[stage], hp.max_drop_fraction, STAGE_NAMES[stage])
        if self.summary[stage]["dropped"]:
            prepared = prepared.filter(_no_reason, input_columns="drop_reason", batched=True,
                                       desc=f"dropping unusable {STAGE_NAMES[stage]} rows")
        return prepared.remove_columns("drop_reason")

    def fingerprint(self, stage: str = "train") -> str | None:
        """`fingerprint` of the split's tokenized rows (None for a stream or a missing split), computed once."""
        if self._fingerprints.get(stage) is None:  # again once a split missing at validate is prepared for fit
            data = self.train_data if stage == "train" else self.val_data
            self._fingerprints[stage] = fingerprint(data) if isinstance(data, Dataset) else None
        return self._fingerprints[stage]

    def state_dict(self) -> dict[str, Any]:
        # Saved in every checkpoint: resuming on other pairs would make "the next unseen batch" meaningless.
        return {"train_fingerprint": self.fingerprint("train"), "train_rows": self.summary.get("train", {}).get("kept")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, current = state.get("train_fingerprint"), self.fingerprint("train")
        if saved is not None and current is not None and saved != current:
            raise ValueError(
                f"the checkpoint was trained on other data: its train split had {state.get('train_rows')} pairs "
                f"with token fingerprint {saved[:12]}, this run's has {self.summary['train']['kept']} pairs with "
                f"{current[:12]}. Resume with the same dataset, tokenizer, max_length, max_prompt_length and "
                "truncation_mode, or start a new run (drop --ckpt_path; to start from its weights, export them "
                "with `dpo-lightning export` and train from that folder)")

    def inspect(self, n_rows: int = 3, stage: str = "train") -> str:
        """The split's summary and its first rows token by token: `[masked]` prompt, then trained tokens.

        What the model is trained on, exactly: every token the loss sees is outside the brackets.
        """
        if self.train_data is None:  # not `setup`, which would print the summary line this output opens with
            self.train_data, self.val_data = self._build(report=False)
        data = self.train_data if stage == "train" else self.val_data
        return render(self.summary[stage], stage, [row for _, row in zip(range(n_rows), data)], self.tokenizer)

    def _loader(self, data: Dataset | IterableDataset, batch_size: int, shuffle: bool,
                collate: Callable[[list[dict]], dict] | None = None) -> DataLoader:
        kwargs = {"num_workers": self.hparams.num_workers, "collate_fn": collate or self.collate}
        if isinstance(data, IterableDataset):
            return DataLoader(data.shuffle(seed=self.seed, buffer_size=10_000), batch_size=batch_size, **kwargs)
        if shuffle and self.trainer is not None:
            return ResumableLoader(data, batch_size, self.seed, self.trainer, **kwargs)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, **kwargs)

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Prepared pairs as a batch, in the layout chosen at setup (`layouts.py`)."""
        return self.layout.collate(rows, self.tokenizer.pad_token_id)

    def pair_batch(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        """Pairs made during training (online DPO: the policy's completions of this module's prompts) as a batch:
        rule 3 cuts each to `max_length` (the prompts are cut already, so only the responses, each keeping a
        token), then `collate`.

        Args:
            pairs: each `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (the ids as sampled, the stop
                token included) and `row_id` (the prompt's).
        """
        hp, bos = self.hparams, adds_bos(self.tokenizer)
        return self.collate([{**truncate(pair["prompt_input_ids"], pair["chosen_input_ids"], pair["rejected_input_ids"],
                                         hp.max_length, hp.max_prompt_length, hp.truncation_mode, bos),
                              "row_id": pair["row_id"]} for pair in pairs])

    def train_dataloader(self) -> DataLoader:
        collate = collate_prompts if self.train_kind == "prompts" else None  # online: the policy writes the pairs
        return self._loader(self.train_data, self.hparams.batch_size, shuffle=True, collate=collate)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        if self.trainer is None or self.trainer.world_size == 1 or isinstance(self.val_data, IterableDataset):
            return self._loader(self.val_data, batch_size, shuffle=False)
        # Each pair on one rank: Lightning's own sampler would pad, counting some pairs twice (loaders.py).
        sampler = EvalSampler(self.val_data, self.trainer.world_size, self.trainer.global_rank)
        return DataLoader(self.val_data, batch_size=batch_size, sampler=sampler, collate_fn=self.collate,
                          num_workers=self.hparams.num_workers)


def _map(rows: Dataset | IterableDataset, function, desc: str, num_proc: int | None = None,
         **kwargs) -> Dataset | IterableDataset:
    """`rows.map(function, **kwargs)`, cached under a name that changes with this package's data code.

    `datasets` names a map's cache by the function's module and name, not by its code: without the
    source of the data code (rules, formats, schemas, sources) in the name, an upgraded dpo_lightning would reuse
    rows prepared by the old rules.
    """
    if isinstance(rows, IterableDataset):  # a stream: no cache, no progress bar, no worker processes
        return rows.map(function, **kwargs)
    name = Hasher.hash([rows._fingerprint, DATA_CODE, function.__name__, kwargs])
    return rows.map(function, desc=desc, new_fingerprint=name, num_proc=num_proc, **kwargs)


def _no_reason(reasons: list[str]) -> list[bool]:
    return [not reason for reason in reasons]
