"""The one row model: what every reader hands on, whatever the source kind, and what reading left out.

A row holds the fields `prompt`, `chosen`, `rejected` (each text, or a list of messages), and where its source has
them the two columns TRL passes to `apply_chat_template`: `tools` (the tool schemas a chat template lists) and
`chat_template_kwargs` (the template's own arguments, e.g. `{"enable_thinking": false}`); plus `source_issue`, the
reason the row is dropped ("" if none). Every reader (sources.py) builds its rows with `canonical_row`, so the same
rows give the same row model from a list, a dict of columns, .json/.jsonl/.csv, .parquet, a `datasets.Dataset` or
a stream:

- A message keeps every key it has (`tool_calls`, `tool_call_id`, `name`, `reasoning_content`, ...) and every value
  as written: messages (each one), `tools` and `chat_template_kwargs` are stored as JSON text that Python's `json`
  writes and reads (`from_storage`), so no reader drops or adds a key or changes a number. (`datasets.Json` would
  write every float with 10 digits, 3.1415926536, and refuse an integer beyond 64 bits.)
- A null value is the same as a missing key, at every depth: Arrow (parquet, `datasets`) stores a column of
  objects with the union of their keys, the missing ones null, and cannot tell the two apart.
- A message has a text `role`, and a text `content` (text parts `[{"type": "text", "text": ...}]` joined, as chat
  templates join them) or, in its place, `tool_calls`, function calls (TRL's tool-call format).
- `tools` is a list of tool schemas, or a JSON string of one (as TRL reads it); `chat_template_kwargs` an object
  (or its JSON) that sets none of `apply_chat_template`'s own arguments (`RESERVED`).
- A .json file or an in-memory dict of columns becomes rows by `columns_to_rows`.

`Reading` records what reading a split found: the schema, and the columns nothing reads (named in the data
summary; schemas.py warns for those some known schema would use), and `refuse` names data this package cannot
train (images, rows that are not preference pairs) by what it is.
"""

import inspect
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal

from datasets import Features, List, Value
from transformers import PreTrainedTokenizerBase

FIELDS = ("prompt", "chosen", "rejected")
# What a split's rows hold, decided once by the data module (`PreferenceDataModule.train_kind`) and read by every
# reader: preference pairs, or prompts alone (online training's split: the policy writes the responses).
RowKind = Literal["pairs", "prompts"]
FIELDS_OF: dict[str, tuple[str, ...]] = {"pairs": FIELDS, "prompts": ("prompt",)}
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")  # per-row arguments of apply_chat_template, TRL's names
FIELD_NAMES = {name: name for name in FIELDS + TEMPLATE_COLUMNS}  # a schema's rows hold them under their own names
MESSAGES = List(Value("string"))  # a field of messages: each message as its JSON text
# What template arguments may not set: apply_chat_template's own parameters (the rules set them, the `tools` column
# gives the tools: TRL's apply_chat_template fails on a clash too) and `messages`, the conversation as the template
# sees it; `documents` is a template variable with no column of its own, so it may be given.
RESERVED = frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {
    "self", "kwargs", "documents"} | {"messages"}
# Columns that say a source holds rows of another kind than preference pairs -> what they are.
NOT_PAIRS = (({"completion", "label"}, "unpaired preference rows (prompt, completion, label: TRL's KTO format)"),
             ({"completions", "labels"}, "stepwise supervision rows (prompt, completions, labels)"),
             ({"completion"}, "prompt-completion rows (supervised fine-tuning)"),
             ({"messages"}, "conversations for supervised fine-tuning (a messages column)"),
             ({"text"}, "language-modeling rows (a text column)"))


class NotJSON:
    """A JSON-lines line that does not parse: a row to drop as `not valid JSON`."""


@dataclass(frozen=True)
class Reading:
    """What reading a split found: the schema it was read as, the columns nothing reads, among them those left out
    by the user's own choice (a label other than `--data.label_column`), which `schemas.warn_ignored` spares, and
    whether the user mapped columns (which turns the schemas off)."""
    schema: str = ""
    ignored: tuple[str, ...] = ()
    by_choice: tuple[str, ...] = ()
    mapped: bool = False


def columns_to_rows(data: dict, what: str) -> list[dict]:
    """A dict of columns (one list per column, all of one length) as its rows; `what` names it in the error."""
    lengths = {key: len(value) if isinstance(value, (list, tuple)) else None for key, value in data.items()}
    if None in lengths.values() or len(set(lengths.values())) > 1:
        raise ValueError(f"{what}, a dict of columns, needs one list per column, all of one length; got {lengths} "
                         "(None: not a list)")
    return [dict(zip(data, values)) for values in zip(*data.values())]


def without_nulls(value: Any) -> Any:
    """`value` with every null-valued key of every object removed, at every depth (Arrow's fill for a missing key)."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def message_problem(message: Any) -> str:
    """"" for a message a chat template renders: a text role, and a text content or, in its place, tool calls (TRL's
    tool-call format); else "not messages", or "not tool calls" where its tool calls are not function calls (each
    {"function": {"name": ...}} or, flat, {"name": ...}, as chat templates read them: not OpenAI's custom calls)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        return "not messages"
    calls = message.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(map(_is_function_call, calls))):
        return "not tool calls"
    return "" if isinstance(message.get("content"), str) or (message.get("content") is None and calls) \
        else "not messages"


def _is_function_call(call: Any) -> bool:
    function = call.get("function", call) if isinstance(call, dict) else None
    return isinstance(function, dict) and isinstance(function.get("name"), str)


def _text_parts_joined(message: Any) -> Any:
    """A message whose content is a list of text parts ([{"type": "text", "text": ...}], as arena-human-preference-140k
    stores it) with the texts joined into its content, as chat templates join them; any other message as it is."""
    parts = message.get("content") if isinstance(message, dict) else None
    if not isinstance(parts, list) or not all(isinstance(part, dict) and part.get("type") == "text"
                                              and isinstance(part.get("text"), str) for part in parts):
        return message
    return {**message, "content": "".join(part["text"] for part in parts)}


def _read(name: str, value: Any, feature) -> tuple[Any, str]:
    """A field's value in the row model, and "" or the problem that drops its row."""
    if value is None:
        return None, ""  # the rules' "missing <field>" where the field is needed
    if name in TEMPLATE_COLUMNS:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if name == "tools":
            problem = "not a list" if not isinstance(value, list) else \
                "" if all(isinstance(tool, dict) for tool in value) else "not tool schemas"
            return (None, problem) if problem else (_json(without_nulls(value)), "")
        ok = isinstance(value, dict) and not RESERVED & set(value)
        return (_json(without_nulls(value)), "") if ok else (None, "not template arguments")
    if feature == MESSAGES:
        if not isinstance(value, list):
            return None, "not messages"
        messages = [_text_parts_joined(without_nulls(m)) for m in value]
        problem = next(filter(None, map(message_problem, messages)), "")
        return (None, problem) if problem else ([_json(message) for message in messages], "")
    return (value, "") if isinstance(value, str) else (None, "not text")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def from_storage(row: dict) -> dict:
    """A stored row (`canonical_row`'s) with its JSON text read back: each message of a field, `tools` and
    `chat_template_kwargs`. Values already read (a dict, a list of dicts) pass as they are."""
    out = dict(row)
    for name, value in row.items():
        if name in FIELDS and isinstance(value, list):
            out[name] = [json.loads(m) if isinstance(m, str) else m for m in value]
        elif name in TEMPLATE_COLUMNS and isinstance(value, str):
            out[name] = json.loads(value)
    return out


def features(sample: list, columns: dict[str, str], needed: tuple[str, ...]) -> Features:
    """The row model's features for rows like `sample` (raw rows, or a schema's): each field present as text, or
    messages where most of its values are lists; `tools` and `chat_template_kwargs` where present; `source_issue`."""
    rows = [row for row in sample if isinstance(row, dict)]
    out = {}
    for field, column in columns.items():
        kinds = Counter(type(row[column]) is list for row in rows if row.get(column) is not None)
        if any(column in row for row in rows):
            out[field] = MESSAGES if kinds[True] > kinds[False] else Value("string")
    if not set(needed) <= set(out):  # rows to drop only (a schema's issues, "not a dict")
        out = {**{field: Value("string") for field in needed}, **out}
    out.update({name: Value("string") for name in TEMPLATE_COLUMNS if any(name in row for row in rows)})
    return Features({**out, "source_issue": Value("string")})


def canonical_row(row: Any, columns: dict[str, str], transform: Callable | None, chat: bool, schema,
                  features: Features) -> dict:
    """One raw row -> the row model: each feature's value, or None with `source_issue` saying why."""
    empty = {name: None for name in features}
    if isinstance(row, Mapping):  # `datasets` hands a mapped function a lazy row: the transform gets a dict
        row = dict(row)
    if transform is not None and isinstance(row, dict):
        row = transform(row)
        if row is None:
            return {**empty, "source_issue": "dropped by transform"}
    if not isinstance(row, dict):  # counted, not raised: `datasets` would wrap an error raised in here
        return {**empty, "source_issue": "not valid JSON" if isinstance(row, NotJSON) else "not a dict"}
    issue = ""
    if schema is not None:
        row, columns = schema.map(row, chat), FIELD_NAMES
        issue = row.get("source_issue", "")
    out = {}
    for name, feature in features.items():
        if name != "source_issue":
            out[name], problem = _read(name, row.get(columns.get(name, name)), feature)
            issue = issue or (f"{problem} {name}" if problem else "")
    return {**out, "source_issue": issue}


def refuse(names: set[str], sample: list, label: str, pairs: bool) -> None:
    """Raise for data this package cannot train, by what it is: images (a column, or image parts in messages),
    and, where no chosen/rejected pair is found (`pairs` False), rows of another kind than preference pairs."""
    parts = [part for row in sample if isinstance(row, dict) for value in row.values() if isinstance(value, list)
             for m in value if isinstance(m, dict) and isinstance(m.get("content"), list)
             for part in m["content"] if isinstance(part, dict) and part.get("type") in ("image", "image_url")]
    images = sorted({"image", "images"} & names) or (["image parts in messages"] if parts else [])
    if images:
        raise ValueError(f"{label} data has {images[0]!r}: images cannot be trained here (the package trains causal "
                         "LMs on text, without an image processor). To train on the text alone, remove the images "
                         "with --data.transform")
    for columns, what in NOT_PAIRS if not pairs else ():
        if columns <= names:
            raise ValueError(f"{label} data holds {what}, not preference pairs: DPO trains on a prompt with a chosen "
                             f"and a rejected response. Its columns are {sorted(names)}: pair them into prompt/chosen/"
                             "rejected rows with --data.transform, or map yours with --data.prompt_column / "
                             "chosen_column / rejected_column")
