"""Preference rows in the formats users bring, turned into (prompt, chosen, rejected) strings: rule 1 of data.py.

Formats, detected from the columns' types and a sample of rows (or named by `dataset_format`):

- explicit: `prompt`, `chosen`, `rejected` strings, used as given.
- hh: only `chosen` and `rejected`, whole Anthropic HH dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ...").
  Detected when most sampled `chosen` texts hold "\\n\\nAssistant:". Each dialogue's prompt is its text
  through its own last "\\n\\nAssistant:"; the two prompts must be equal, or the row is dropped (never
  sliced at the chosen prompt's length, which corrupts rows like 1254 of the HH harmless-base test split,
  nor kept when the rejected dialogue carries one more exchange). A dialogue without an assistant turn
  is dropped as `no assistant turn`.
- implicit: only `chosen` and `rejected`, whole texts without HH markers. The prompt is their longest
  shared prefix, cut back to a position that is whitespace in both texts, so no word is split.
- conversational: `prompt` a list of {"role", "content"} messages and `chosen`/`rejected` lists of the
  answering messages, or only `chosen`/`rejected` whole conversations, whose every message but the last
  must be the same on both sides. Rendered with the tokenizer's chat template: the prompt with
  `add_generation_prompt=True`, each response as the rest of the whole conversation's rendering, so it
  ends with the template's own end-of-turn token (no EOS is appended) and carries no second BOS.

`to_strings` returns the strings and a `drop_reason` ("" when the row is kept). `drop_error` turns a
reason into the error `strict=True` raises: the split, the row, the field and the fix (`FIXES`).
"""

import os
from typing import Any

from datasets import Dataset, IterableDataset, LargeList, List
from transformers import PreTrainedTokenizerBase

from dpo_lightning.sources import FIELDS, STAGE_NAMES

HH_ASSISTANT = "\n\nAssistant:"
FORMATS = ("explicit", "hh", "implicit", "conversational")
ROLES = ("system", "user", "assistant", "tool")
PRESETS = {"hh": ("Anthropic/hh-rlhf", "hh")}  # dataset shorthand -> (hub name, format)
_REQUIRED = {"explicit": FIELDS, "hh": FIELDS[1:], "implicit": FIELDS[1:], "conversational": FIELDS[1:]}

# drop reason (without its field) -> what a user can do about it: strict mode's errors, the README's table.
FIXES = {
    "missing": "fill the field or filter the row out",
    "not text": "give the field as text (a JSON string, not a number or object), or filter the row out",
    "not messages": "give the field as a list of {'role': ..., 'content': ...} messages with text content",
    "unknown role": f"use the roles {', '.join(ROLES)} (map ShareGPT-style 'human'/'gpt' roles first)",
    "empty": "remove the row: an empty answer teaches nothing",
    "empty prompt": "give the row a prompt: without BOS no position predicts the first response token",
    "chosen == rejected": "remove the row: a tie carries no preference",
    "prompts differ": "fix the row so both sides share the prompt, or give an explicit prompt column",
    "no assistant turn": "end the dialogue's prompt with '\\n\\nAssistant:', or give an explicit prompt column",
    "no shared prompt": "give an explicit prompt column",
    "not a dict": "give each row as a JSON object / dict {'prompt': ..., 'chosen': ..., 'rejected': ...}",
    "not valid JSON": "fix or remove the line (one JSON object per line)",
}
# reasons that name no field of their own -> the field the error names (None: the whole row)
_ROW_REASONS = {"chosen == rejected": "rejected", "prompts differ": "rejected", "no shared prompt": "rejected",
                "empty prompt": "prompt", "not a dict": None, "not valid JSON": None}


def drop_error(reason: str, index: int, stage: str = "train") -> ValueError:
    """The error for a dropped row under `strict=True`: the split, the row, the field and the fix."""
    kind, _, field = (reason, "", _ROW_REASONS[reason]) if reason in _ROW_REASONS else reason.rpartition(" ")
    where = f"field {field!r}: " if field else ""
    return ValueError(f"{STAGE_NAMES.get(stage, stage)} row {index}: {where}{reason}; {FIXES[kind]} "
                      "(or set strict: false to drop and count such rows)")


def _kind(feature) -> str | None:
    return None if feature is None else "messages" if isinstance(feature, (List, LargeList)) else "text"


def detect_format(rows: Dataset | IterableDataset, dataset_format: str = "auto", stage: str = "train",
                  tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The format of `rows` (columns from `sources.load_rows`): `dataset_format`, checked, or detected."""
    label = STAGE_NAMES.get(stage, stage)
    sample = list(rows.take(100)) if isinstance(rows, IterableDataset) else rows.select(range(min(100, len(rows))))
    if not sample:
        raise ValueError(f"the {label} dataset is empty: no rows")
    columns = set(rows.column_names or sample[0])
    features = rows.features or {}
    kinds = {f: _kind(features.get(f)) or ("messages" if isinstance(sample[0].get(f), list) else "text")
             for f in FIELDS if f in columns}
    if {"chosen", "rejected"} - columns:
        raise ValueError(f"{label} data has fields {sorted(columns - {'source_issue'})}; expected 'chosen' and "
                         "'rejected' (and 'prompt'): map yours with --data.prompt_column / chosen_column / "
                         "rejected_column")
    if kinds.get("prompt", kinds["chosen"]) != kinds["chosen"] or kinds["chosen"] != kinds["rejected"]:
        which = "prompt" if kinds.get("prompt", kinds["chosen"]) != kinds["chosen"] else "rejected"
        raise ValueError(f"{label} data: {which!r} holds {kinds[which]} but 'chosen' holds {kinds['chosen']}: give "
                         "prompt, chosen and rejected all as text, or all as messages (responses as lists like "
                         "[{'role': 'assistant', 'content': ...}])")
    fmt = dataset_format
    if fmt == "auto":
        if kinds["chosen"] == "messages":
            fmt = "conversational"
        elif "prompt" in columns:
            fmt = "explicit"
        else:
            texts = [row["chosen"] for row in sample if isinstance(row["chosen"], str)]
            fmt = "hh" if 2 * sum(HH_ASSISTANT in text for text in texts) > len(texts) else "implicit"
    missing = set(_REQUIRED[fmt]) - columns
    if missing:
        raise ValueError(f"dataset_format {fmt!r} needs columns {sorted(_REQUIRED[fmt])}; the {label} data has no "
                         f"{sorted(missing)[0]!r}: map yours with --data.prompt_column / chosen_column / "
                         "rejected_column, or set --data.dataset_format")
    if fmt == "conversational" and (tokenizer is None or not tokenizer.chat_template):
        raise ValueError(f"{label} data holds conversations but the tokenizer has no chat_template: use a chat "
                         "model's tokenizer, or set tokenizer.chat_template (a Jinja template) before training")
    return fmt


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """HH dialogues: (prompt, chosen response, rejected response), or None if their prompts differ.

    Each dialogue's prompt is its text through its own last "\\n\\nAssistant:".

    Example:
        >>> split_dialogue("\\n\\nHuman: hi\\n\\nAssistant: hello", "\\n\\nHuman: hi\\n\\nAssistant: go away")
        ('\\n\\nHuman: hi\\n\\nAssistant:', ' hello', ' go away')
    """
    ends = [text.rfind(HH_ASSISTANT) + len(HH_ASSISTANT) for text in (chosen, rejected)]
    if min(ends) < len(HH_ASSISTANT) or chosen[: ends[0]] != rejected[: ends[1]]:
        return None
    return chosen[: ends[0]], chosen[ends[0]:], rejected[ends[1]:]


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Implicit texts: the shared prefix, cut where both texts have whitespace, is the prompt; None if none.

    Example:
        >>> split_shared_prefix("The cat sat down.", "The cats ran off.")
        ('The', ' cat sat down.', ' cats ran off.')
    """
    n = len(os.path.commonprefix([chosen, rejected]))
    # Up to n the texts agree; at n itself (the first difference) both must be whitespace.
    cut = next((i for i in range(min(n, len(chosen) - 1, len(rejected) - 1), 0, -1)
                if chosen[i].isspace() and rejected[i].isspace()), 0)
    if cut <= 0:
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def render_conversation(prompt: list[dict] | None, chosen: list[dict], rejected: list[dict],
                        tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str] | None:
    """Chat-template texts (prompt, chosen response, rejected response); None if they cannot be split.

    Without a `prompt`, every message but the last is the prompt, and must be the same on both sides.
    """
    if prompt is None:
        if not chosen or chosen[:-1] != rejected[:-1]:
            return None
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
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


def to_strings(row: dict, index: int, dataset_format: str, tokenizer: PreTrainedTokenizerBase | None = None,
               strict: bool = False, stage: str = "train") -> dict[str, Any]:
    """Rule 1 and the row checks: `prompt`, `chosen`, `rejected` strings and a `drop_reason` ("" if kept).

    With `strict=True` a row that would be dropped raises `drop_error` instead.
    """
    out = _split_and_check(row, dataset_format, tokenizer)
    if strict and out["drop_reason"]:
        raise drop_error(out["drop_reason"], index, stage)
    return out


def _split_and_check(row: dict, dataset_format: str, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    empty = {field: "" for field in FIELDS}
    if row.get("source_issue"):
        return {**empty, "drop_reason": row["source_issue"]}
    fields = FIELDS if "prompt" in row and dataset_format in ("explicit", "conversational") else FIELDS[1:]
    for field in fields:
        problem = _field_problem(row.get(field), dataset_format)
        if problem:
            return {**empty, "drop_reason": f"{problem} {field}"}
    if dataset_format == "hh":
        for field in ("chosen", "rejected"):
            if HH_ASSISTANT not in row[field]:
                return {**empty, "drop_reason": f"no assistant turn {field}"}
    if dataset_format == "explicit":
        parts = row["prompt"], row["chosen"], row["rejected"]
    elif dataset_format == "hh":
        parts = split_dialogue(row["chosen"], row["rejected"])
    elif dataset_format == "implicit":
        parts = split_shared_prefix(row["chosen"], row["rejected"])
    else:
        parts = render_conversation(row.get("prompt"), row["chosen"], row["rejected"], tokenizer)
    if parts is None:
        return {**empty, "drop_reason": "no shared prompt" if dataset_format == "implicit" else "prompts differ"}
    out = dict(zip(FIELDS, parts))
    for field in ("chosen", "rejected"):
        if not out[field].strip():
            return {**out, "drop_reason": f"empty {field}"}
    return {**out, "drop_reason": "chosen == rejected" if out["chosen"] == out["rejected"] else ""}


def _field_problem(value: Any, dataset_format: str) -> str:
    """Why a field's value cannot be used ("" if it can)."""
    if value is None:
        return "missing"
    if dataset_format != "conversational":
        return "" if isinstance(value, str) else "not text"
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                              for m in value):
        return "not messages"
    return "" if all(m.get("role") in ROLES for m in value) else "unknown role"
