"""Which format preference rows come in, detected from the columns' types and a sample of rows (or named
by `dataset_format`). rules.py splits each format's rows into (prompt, chosen, rejected) strings (rule 1):

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
  Whole conversations beside a text `prompt` column (UltraFeedback, Tulu 3, Capybara, the ORPO mix: the
  text repeats the user turn) are read as whole conversations, the text prompt ignored, as TRL does.

Public datasets whose columns name another layout (OpenAI, HelpSteer3, SHP, PKU-SafeRLHF, arena, ...) are
mapped onto these fields while reading (schemas.py); every split's summary line names the schema it was read as,
and the columns nothing reads: the text prompt beside whole conversations, and `tools` / `chat_template_kwargs`
beside rows that are not conversations (a chat template renders them; text is tokenized as it is).
"""

from dataclasses import replace

from datasets import Dataset, IterableDataset, LargeList, List
from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.rows import FIELDS, TEMPLATE_COLUMNS, Reading, from_storage
from dpo_lightning.data.rules import HH_ASSISTANT
from dpo_lightning.data.sources import STAGE_NAMES

FORMATS = ("explicit", "hh", "implicit", "conversational")
TEXT_PROMPT_IGNORED = "whole conversations + text prompt (text prompt ignored)"
PRESETS = {"hh": ("Anthropic/hh-rlhf", "hh")}  # dataset shorthand -> (hub name, format)
_REQUIRED = {"explicit": FIELDS, "hh": FIELDS[1:], "implicit": FIELDS[1:], "conversational": FIELDS[1:]}


def _kind(feature) -> str | None:
    return None if feature is None else "messages" if isinstance(feature, (List, LargeList)) else "text"


def detect_format(rows: Dataset | IterableDataset, dataset_format: str = "auto", stage: str = "train",
                  tokenizer: PreTrainedTokenizerBase | None = None,
                  reading: Reading = Reading(), prompt_column: str = "prompt") -> tuple[Dataset | IterableDataset,
                                                                                        str, Reading]:
    """The format of `rows` (columns from `sources.load_rows`): `dataset_format`, checked, or detected.

    Returns the rows (without a text prompt that whole conversations make redundant), the format, and
    `reading` completed: its schema for the summary line (a public schema's name, or the format and its
    columns) and the columns this format leaves unread (the text prompt, under `prompt_column`; template
    arguments beside text).
    """
    schema, ignored = reading.schema, set(reading.ignored)
    label = STAGE_NAMES.get(stage, stage)
    sample = [from_storage(row) for row in (rows.take(100) if isinstance(rows, IterableDataset)
                                            else rows.select(range(min(100, len(rows)))))]
    if not sample:
        raise ValueError(f"the {label} dataset is empty: no rows")
    columns = set(rows.column_names or sample[0])
    features = rows.features or {}
    kinds = {f: _kind(features.get(f)) or ("messages" if isinstance(sample[0].get(f), list) else "text")
             for f in FIELDS if f in columns}
    if kinds.get("prompt") == "text" and kinds.get("chosen") == "messages" and _whole_conversations(sample):
        # UltraFeedback, Tulu 3, Capybara, ORPO mix: the text prompt repeats the conversations' user turn.
        rows, schema = rows.remove_columns("prompt"), schema or TEXT_PROMPT_IGNORED
        ignored.add(prompt_column)
        columns.discard("prompt")
        kinds.pop("prompt")
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
    if fmt != "conversational":
        ignored.update(set(TEMPLATE_COLUMNS) & columns)
    schema = schema or f"{fmt} ({', '.join(field for field in FIELDS if field in columns)})"
    return rows, fmt, replace(reading, schema=schema, ignored=tuple(sorted(ignored)))


def _whole_conversations(sample) -> bool:
    """Whether most sampled `chosen` lists are whole conversations: a user turn before the last message."""
    chats = [row["chosen"] for row in sample if isinstance(row.get("chosen"), list)]
    whole = sum(any(isinstance(m, dict) and m.get("role") == "user" for m in chat[:-1]) for chat in chats)
    return 2 * whole > len(chats)

