"""Preference rows in the formats users bring, turned into (prompt, chosen, rejected) strings: rule 1 of data.py.

Formats, detected from the columns and the first row (or named by `dataset_format`):

- explicit: `prompt`, `chosen`, `rejected` strings, used as given.
- hh: only `chosen` and `rejected`, whole Anthropic HH dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ...").
  The prompt is the chosen dialogue through its last "\\n\\nAssistant:"; the rejected dialogue must start
  with the same prompt, or the row is dropped (never sliced at the chosen prompt's length, which
  corrupts rows like 1254 of the HH harmless-base test split).
- implicit: only `chosen` and `rejected`, whole texts without HH markers. The prompt is their longest
  shared prefix, cut back to the last whitespace so that no word is split between prompt and response.
- conversational: `prompt` a list of {"role", "content"} messages and `chosen`/`rejected` lists of the
  answering messages, or only `chosen`/`rejected` whole conversations sharing their leading messages.
  Rendered with the tokenizer's chat template: the prompt with `add_generation_prompt=True`, each
  response as the rest of the whole conversation's rendering, so it ends with the template's own
  end-of-turn token (no EOS is appended) and carries no second BOS.

`to_strings` returns the strings and a `drop_reason` ("" when the row is kept); `strict=True` raises
instead, naming the row, the field and the fix.
"""

import glob
import os
from typing import Any, Union

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset
from transformers import PreTrainedTokenizerBase

HH_ASSISTANT = "\n\nAssistant:"
FIELDS = ("prompt", "chosen", "rejected")
FORMATS = ("explicit", "hh", "implicit", "conversational")
# A dataset given as: a hub name, a local file, folder, glob or list of files, an in-memory dict of
# columns or list of rows, or a `datasets` object.
DatasetSource = Union[str, dict, list, Dataset, DatasetDict]
PRESETS = {"hh": ("Anthropic/hh-rlhf", "hh")}  # dataset shorthand -> (hub name, format)
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _file_builder(path: str) -> str | None:
    stem = path[:-3] if path.endswith(".gz") else path
    return _FILE_BUILDERS.get(os.path.splitext(stem)[1])


def load_rows(source: DatasetSource, split: str = "train", name: str | None = None, data_dir: str | None = None,
              streaming: bool = False) -> Dataset | IterableDataset:
    """Load one split of preference rows from any supported source.

    Local data files (.json, .jsonl, .parquet, .csv, optionally .gz; one path, a glob, or a list of paths)
    are read as a single split; any other string goes to `datasets.load_dataset(source, name,
    data_dir=..., split=...)`, which reads a hub dataset or a local folder of split files alike.
    `streaming=True` returns an `IterableDataset` that reads as it goes (file and hub sources).
    """
    if isinstance(source, dict):
        return Dataset.from_dict(source)
    if isinstance(source, list) and not all(isinstance(item, str) for item in source):
        return Dataset.from_list(source)
    if isinstance(source, DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not in the dataset; it has {sorted(source)}: set --data.split")
        return source[split]
    if isinstance(source, Dataset):
        return source
    files = source if isinstance(source, list) else sorted(glob.glob(source)) if glob.has_magic(source) else [source]
    if files and all(os.path.isfile(f) for f in files):
        builders = {_file_builder(f) for f in files}
        if None in builders or len(builders) > 1:
            raise ValueError(f"{source}: files must share one type of {sorted(_FILE_BUILDERS)} (optionally .gz)")
        return load_dataset(builders.pop(), data_files=files, split="train", streaming=streaming)
    if isinstance(source, list) or glob.has_magic(source):
        raise FileNotFoundError(f"no data files at {source}")
    return load_dataset(source, name, data_dir=data_dir, split=split, streaming=streaming)


def detect_format(columns: list[str], first_row: dict) -> str:
    """The format of rows with these columns, judged by the first row's values."""
    if {"chosen", "rejected"} - set(columns):
        raise ValueError(f"data has columns {sorted(columns)}; expected 'chosen' and 'rejected' (and 'prompt'): "
                         "map yours with --data.prompt_column / chosen_column / rejected_column")
    if isinstance(first_row["chosen"], list):
        return "conversational"
    if "prompt" in columns:
        return "explicit"
    return "hh" if HH_ASSISTANT in (first_row["chosen"] or "") else "implicit"


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """HH dialogues: (prompt, chosen response, rejected response), or None if the prompts differ.

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


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Implicit texts: the shared prefix up to its last whitespace is the prompt; None if there is none.

    Example:
        >>> split_shared_prefix("The sky is blue.", "The sky is bright.")
        ('The sky is', ' blue.', ' bright.')
    """
    n = len(os.path.commonprefix([chosen, rejected]))
    cut = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1))
    if cut <= 0:
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def render_conversation(prompt: list[dict] | None, chosen: list[dict], rejected: list[dict],
                        tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str] | None:
    """Chat-template texts (prompt, chosen response, rejected response); None if they cannot be split.

    Without a `prompt`, the leading messages that chosen and rejected share are the prompt.
    """
    if prompt is None:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
        return None
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    responses = []
    for answer in (chosen, rejected):
        whole = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        if not whole.startswith(prompt_text):  # the template renders the prompt differently once answered
            return None
        responses.append(whole[len(prompt_text):])
    return prompt_text, *responses


# drop reason -> what a user can do about it, for strict mode's errors and the README's table.
FIXES = {
    "missing": "fill the field or filter the row out",
    "not text": "convert the field to text, or set --data.dataset_format",
    "empty": "remove the row: an empty answer teaches nothing",
    "chosen == rejected": "remove the row: a tie carries no preference",
    "prompts differ": "fix the row so both sides share the prompt, or give an explicit prompt column",
    "no shared prompt": "give an explicit prompt column",
}


def _reason(kind: str, field: str, index: int, strict: bool) -> str:
    reason = kind if kind in ("chosen == rejected", "prompts differ", "no shared prompt") else f"{kind} {field}"
    if strict:
        raise ValueError(f"row {index}: field {field!r}: {reason}; {FIXES[kind]} (or drop such rows: strict=False)")
    return reason


def to_strings(row: dict, index: int, dataset_format: str, tokenizer: PreTrainedTokenizerBase | None = None,
               strict: bool = False) -> dict[str, Any]:
    """Rule 1 and the row checks: `prompt`, `chosen`, `rejected` strings, a `drop_reason` ("" if kept) and
    the row's position in its split as `row_id` (batches carry it: error messages and cached reference
    log-probs name rows by it)."""
    return {**_split_and_check(row, index, dataset_format, tokenizer, strict), "row_id": index}


def _split_and_check(row: dict, index: int, dataset_format: str, tokenizer: PreTrainedTokenizerBase | None,
                     strict: bool) -> dict[str, Any]:
    fields = FIELDS if "prompt" in row and dataset_format in ("explicit", "conversational") else FIELDS[1:]
    wanted = list if dataset_format == "conversational" else str
    empty = {field: "" for field in FIELDS}
    for field in fields:
        value = row[field]
        if value is None:
            return {**empty, "drop_reason": _reason("missing", field, index, strict)}
        if not isinstance(value, wanted) or (wanted is list and not all(isinstance(m, dict) for m in value)):
            return {**empty, "drop_reason": _reason("not text", field, index, strict)}
    if dataset_format == "explicit":
        parts = row["prompt"], row["chosen"], row["rejected"]
    elif dataset_format == "hh":
        parts = split_dialogue(row["chosen"], row["rejected"])
    elif dataset_format == "implicit":
        parts = split_shared_prefix(row["chosen"], row["rejected"])
    else:
        parts = render_conversation(row.get("prompt"), row["chosen"], row["rejected"], tokenizer)
    if parts is None:
        kind = "no shared prompt" if dataset_format == "implicit" else "prompts differ"
        return {**empty, "drop_reason": _reason(kind, "rejected", index, strict)}
    out = dict(zip(FIELDS, parts))
    for field in ("chosen", "rejected"):
        if not out[field].strip():
            return {**out, "drop_reason": _reason("empty", field, index, strict)}
    if out["chosen"] == out["rejected"]:
        return {**out, "drop_reason": _reason("chosen == rejected", "rejected", index, strict)}
    return {**out, "drop_reason": ""}
