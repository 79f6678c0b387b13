"""Preference data: rows of (prompt, chosen, rejected) -> token ids -> padded batches.

Tokenization rules, applied in this order by `tokenize_row` (after the DPO reference's
`preference_datasets.py::tokenize_batch_element`):

1. Prompt. A row's `prompt` is used as given. A row without one (Anthropic HH: `chosen` and `rejected`
   are whole "\\n\\nHuman: ... \\n\\nAssistant: ..." dialogues) takes as prompt the chosen dialogue
   through its last "\\n\\nAssistant:", and the rejected dialogue must start with that same prompt; a
   row where it doesn't is dropped and counted, never sliced into a corrupt response.
2. Tokenize prompt, chosen and rejected separately with `add_special_tokens=False`, so the prompt ids
   are identical in both sequences and no token merges across the prompt/response boundary. One BOS
   goes in front of the prompt where the tokenizer adds one to plain text; EOS is appended to each
   response.
3. If prompt + longer response exceeds `max_length`, the prompt keeps `max_prompt_length` tokens (BOS
   included): its end with `truncation_mode="keep_end"` (dialogues end with the turn being answered),
   its start with `"keep_start"`. If still too long, both responses are cut to the room left.
4. Labels are the input ids with every prompt position set to `IGNORE_INDEX`. The collator places them
   by lengths, never by comparing ids, so a response's EOS is learned even when pad == eos.

Rows that cannot be used (a missing or empty field, identical responses, a dialogue whose prompts
differ) are dropped and counted by reason in `PreferenceDataModule.summary`; a row of the wrong type
raises an error naming the row and the field. Batches hold chosen rows first, then rejected rows, so
one forward pass scores both (see `collate_pairs`).
"""

import os
from collections import Counter
from typing import Any, Literal, Union

import lightning as L
import torch
from datasets import Dataset, DatasetDict, load_dataset
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dpo_lightning.losses import IGNORE_INDEX

HH_ASSISTANT = "\n\nAssistant:"
FIELDS = ("prompt", "chosen", "rejected")
TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
# A dataset given as: a hub name or local path, an in-memory dict of columns or list of rows, or a
# `datasets` object.
DatasetSource = Union[str, dict, list, Dataset, DatasetDict]

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: DatasetSource, split: str = "train", name: str | None = None,
              data_dir: str | None = None) -> Dataset:
    """Load one split of preference rows from any supported source.

    A local file (.json, .jsonl, .parquet, .csv, optionally .gz) is read as a single split; any other
    string goes to `datasets.load_dataset(source, name, data_dir=..., split=...)`, which reads a hub
    dataset or a local folder of data files alike.
    """
    if isinstance(source, dict):
        return Dataset.from_dict(source)
    if isinstance(source, list):
        return Dataset.from_list(source)
    if isinstance(source, DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not in the dataset; it has {sorted(source)}")
        return source[split]
    if isinstance(source, Dataset):
        return source
    if os.path.isfile(source):
        stem = source[:-3] if source.endswith(".gz") else source
        builder = _FILE_BUILDERS.get(os.path.splitext(stem)[1])
        if builder is None:
            raise ValueError(f"{source}: unknown file type; use one of {sorted(_FILE_BUILDERS)} (optionally .gz)")
        return load_dataset(builder, data_files=source, split="train")
    return load_dataset(source, name, data_dir=data_dir, split=split)


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Rule 1 for HH dialogues: (prompt, chosen response, rejected response), or None if the prompts differ.

    Example:
        >>> split_dialogue("\\n\\nHuman: hi\\n\\nAssistant: hello", "\\n\\nHuman: hi\\n\\nAssistant: go away")
        ('\\n\\nHuman: hi\\n\\nAssistant:', ' hello', ' go away')
    """
    end = chosen.rfind(HH_ASSISTANT)
    if end < 0:
        return None
    prompt = chosen[: end + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        return None
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def check_row(row: dict, index: int, implicit_prompt: bool) -> dict:
    """Rule 1 and the row checks: the row's prompt and responses, and why it is dropped ("" if kept).

    Raises on a value of the wrong type, naming the row and the field: that is a format error, not noise.
    """
    for field in FIELDS[implicit_prompt:]:
        value = row[field]
        if value is not None and not isinstance(value, str):
            raise TypeError(f"row {index}: field {field!r} is a {type(value).__name__}, expected a string "
                            f"(conversational rows are not supported yet; render them to text first)")
    out = {field: row.get(field) for field in FIELDS}
    missing = [field for field in FIELDS[implicit_prompt:] if out[field] is None]
    if missing:
        return {**out, "drop_reason": f"missing {missing[0]}"}
    if implicit_prompt:
        parts = split_dialogue(row["chosen"], row["rejected"])
        if parts is None:
            return {**out, "drop_reason": "dialogues do not share the prompt"}
        out = dict(zip(FIELDS, parts))
    for field in ("chosen", "rejected"):
        if not out[field].strip():
            return {**out, "drop_reason": f"empty {field}"}
    if out["chosen"] == out["rejected"]:
        return {**out, "drop_reason": "chosen == rejected"}
    return {**out, "drop_reason": ""}


def tokenize_row(row: dict, tokenizer: PreTrainedTokenizerBase, bos_token_id: int | None, max_length: int,
                 max_prompt_length: int, truncation_mode: str) -> dict[str, list[int]]:
    """Rules 2 and 3: token ids of the prompt and of each response (EOS included), truncated.

    Returns `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`; the collator concatenates
    prompt + response and builds the labels (rule 4).
    """
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bos = [bos_token_id] if bos_token_id is not None else []
    prompt = encode(row["prompt"])
    if prompt[:1] == bos:  # the text already starts with BOS: don't add a second one
        prompt = prompt[1:]
    chosen = encode(row["chosen"]) + [tokenizer.eos_token_id]
    rejected = encode(row["rejected"]) + [tokenizer.eos_token_id]

    longer = max(len(chosen), len(rejected))
    if len(bos) + len(prompt) + longer > max_length:
        keep = max_prompt_length - len(bos)
        prompt = prompt[len(prompt) - keep:] if truncation_mode == "keep_end" else prompt[:keep]
    prompt = bos + prompt
    room = max_length - len(prompt)
    return {"prompt_input_ids": prompt, "chosen_input_ids": chosen[:room], "rejected_input_ids": rejected[:room]}


def collate_pairs(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad tokenized pairs into one batch: chosen rows first, then rejected rows, right-padded.

    Args:
        rows: B dicts with `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (lists of ids).
        pad_token_id: id written into padding; padding is masked by `attention_mask` and `labels`.

    Returns:
        `input_ids`, `attention_mask`, `labels`, each (2B, T) with T the longest sequence of the batch.

    Example:
        prompt [5, 6], chosen [7, 2], rejected [8, 9, 2], pad id 0:
            input_ids      = [[5, 6, 7, 2, 0], [5, 6, 8, 9, 2]]
            attention_mask = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
            labels         = [[-100, -100, 7, 2, -100], [-100, -100, 8, 9, 2]]
    """
    sequences = []
    for response in ("chosen_input_ids", "rejected_input_ids"):
        for row in rows:
            sequences.append((row["prompt_input_ids"], row[response]))
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        n, m = len(prompt), len(response)
        input_ids[i, : n + m] = torch.tensor(prompt + response)
        attention_mask[i, : n + m] = 1
        labels[i, n : n + m] = torch.tensor(response)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token: pad = eos when it has none (padding is masked, so its id is free)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no eos_token; set one before training")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer puts one in front of plain text (Llama does, GPT-2 doesn't), else None."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs for DPO: loads, checks, tokenizes once (cached by `datasets`), and batches.

    Args:
        dataset: training rows: a hub dataset name, a local file (.json/.jsonl/.parquet/.csv) or folder,
            an in-memory dict of columns or list of rows, or a `datasets.Dataset`/`DatasetDict`. Rows have
            `prompt`, `chosen`, `rejected` strings, or only `chosen`/`rejected` HH dialogues.
        eval_dataset: validation rows, in any of the forms of `dataset`. Default: `eval_split` of
            `dataset`, else `eval_fraction` of the training rows, else no validation.
        tokenizer: tokenizer name or path (or object). Default: the model's (`DPOModule.model_name_or_path`).
        dataset_config: the hub dataset's configuration name (`name` of `datasets.load_dataset`).
        data_dir: the hub dataset's sub-folder (`data_dir` of `datasets.load_dataset`), e.g. "harmless-base".
        split: split of `dataset` to train on.
        eval_split: split of `dataset` to validate on, e.g. "test".
        eval_fraction: share of the training rows held out for validation when no eval data is named.
        max_length: maximum tokens of prompt + response (rule 3).
        max_prompt_length: prompt tokens kept when a pair is too long (rule 3).
        truncation_mode: which end of a too-long prompt to keep (rule 3).
        batch_size: preference pairs per batch and device; a batch holds 2 * batch_size sequences.
        eval_batch_size: pairs per validation batch. Default: `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the `eval_fraction` split.
    """

    def __init__(
        self,
        dataset: DatasetSource,
        eval_dataset: DatasetSource | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        dataset_config: str | None = None,
        data_dir: str | None = None,
        split: str = "train",
        eval_split: str | None = None,
        eval_fraction: float = 0.0,
        max_length: int = 512,
        max_prompt_length: int = 128,
        truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
    ):
        super().__init__()
        if not 0 < max_prompt_length < max_length:
            raise ValueError(f"--data.max_prompt_length must be in (0, max_length={max_length}) so every "
                             f"response keeps at least one token, got {max_prompt_length}")
        if truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"--data.truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"--data.eval_fraction must be in [0, 1), got {eval_fraction}")
        self.save_hyperparameters(ignore=["dataset", "eval_dataset", "tokenizer"])
        self.dataset, self.eval_dataset, self.tokenizer = dataset, eval_dataset, tokenizer
        self.train_data: Dataset | None = None
        self.val_data: Dataset | None = None
        self.summary: dict[str, dict[str, Any]] = {}

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads and tokenizes file-backed sources, so that `setup` on
        # every rank finds the `datasets` cache instead of tokenizing again.
        if isinstance(self.dataset, str) or isinstance(self.eval_dataset, str):
            self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is None:
            self.train_data, self.val_data = self._build()

    def _build(self) -> tuple[Dataset, Dataset | None]:
        hp = self.hparams
        tokenizer = self._resolve_tokenizer()
        train = load_rows(self.dataset, hp.split, hp.dataset_config, hp.data_dir)
        if self.eval_dataset is not None:
            val = load_rows(self.eval_dataset, hp.split, hp.dataset_config, hp.data_dir)
        elif hp.eval_split is not None:
            val = load_rows(self.dataset, hp.eval_split, hp.dataset_config, hp.data_dir)
        elif hp.eval_fraction > 0:
            parts = train.train_test_split(test_size=hp.eval_fraction, seed=hp.seed)
            train, val = parts["train"], parts["test"]
        else:
            val = None
        train = self._prepare_split(train, "train", tokenizer)
        val = self._prepare_split(val, "val", tokenizer) if val is not None else None
        return train, val

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if isinstance(self.tokenizer, PreTrainedTokenizerBase):
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            return self.tokenizer
        name = self.tokenizer
        if name is None:
            # Default to the model's tokenizer so a config names the model once.
            module = self.trainer.lightning_module if self.trainer is not None else None
            name = getattr(module, "model_name_or_path", None)
            if not isinstance(name, str):
                raise ValueError("no tokenizer: pass PreferenceDataModule(tokenizer=...) (--data.tokenizer), "
                                 "or attach the data module to a Trainer fitting a DPOModule built from a path")
        self.tokenizer = load_tokenizer(name)
        return self.tokenizer

    def _prepare_split(self, rows: Dataset, stage: str, tokenizer: PreTrainedTokenizerBase) -> Dataset:
        columns = set(rows.column_names)
        if {"chosen", "rejected"} - columns:
            raise ValueError(f"{stage} data has columns {sorted(columns)}; expected 'chosen' and 'rejected' "
                             f"(and 'prompt'): rename yours with `Dataset.rename_column`")
        rows = rows.map(check_row, with_indices=True, fn_kwargs={"implicit_prompt": "prompt" not in columns},
                        remove_columns=rows.column_names, desc=f"checking {stage} rows")
        dropped = Counter(reason for reason in rows["drop_reason"] if reason)
        rows = rows.filter(lambda reason: not reason, input_columns="drop_reason")
        hp = self.hparams
        tokenized = rows.map(
            tokenize_row, remove_columns=rows.column_names, desc=f"tokenizing {stage}",
            fn_kwargs=dict(tokenizer=tokenizer, bos_token_id=adds_bos(tokenizer), max_length=hp.max_length,
                           max_prompt_length=hp.max_prompt_length, truncation_mode=hp.truncation_mode),
        )
        self.summary[stage] = {"rows": len(tokenized) + sum(dropped.values()), "kept": len(tokenized),
                               "dropped": dict(dropped)}
        rank_zero_info(f"[dpo_lightning] {stage} data: {self.summary[stage]}")
        if len(tokenized) == 0:
            raise ValueError(f"no usable {stage} rows left: {self.summary[stage]}")
        return tokenized

    def _loader(self, data: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers,
                          collate_fn=self.collate)

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return collate_pairs(rows, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        return self._loader(self.val_data, self.hparams.eval_batch_size or self.hparams.batch_size, shuffle=False)

