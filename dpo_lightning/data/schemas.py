"""Public preference datasets' layouts (schemas), detected from their columns and mapped onto the fields.

Each schema names a layout by the columns that identify it and maps one raw row onto `prompt`, `chosen`,
`rejected` (text or messages, for rules.py's formats; a row's `tools` and `chat_template_kwargs` pass through) or
onto a `source_issue`, the reason its row is dropped and counted. sources.py applies the mapping while reading;
the summary line names the schema.

A question with text answers becomes one rule's fields (`_turns`), whichever schema holds it: with a chat template,
[system (when non-empty), user: question] and each answer as an assistant message, rendered by the template; without
one, the plain join "system\\n\\nquestion\\n\\n" and the answers. (A user's own text prompt/chosen/rejected columns are
TRL's standard format instead, used as written.)

Sets that store two responses and a label saying which one is preferred are one mechanism, `Pair`: the prompt
column, the two response columns and each `Label` with the column(s) it reads and how. A label is an integer
where the card says so: an int, a bool, an integral float (a pandas column with a null holds -2.0) or integer text
(CSV cells are text); NaN is a missing label. Where a set has two labels (PKU-SafeRLHF: better and safer),
`--data.label_column` picks one; without it the set is refused, naming both. A column mapping that pins
chosen/rejected onto two responses beside a known set's label is refused: it would train every row the label
decides the other way inverted.

| schema | identified by | prompt | chosen / rejected |
|---|---|---|---|
| OpenAI preference JSONL | input, preferred_output, non_preferred_output | input.messages (tools: input.tools) | the outputs |
| HelpSteer3 preference | context, response1, response2, overall_preference | context | response1 when overall_preference < 0, response2 when > 0; 0: a tie, dropped |
| HelpSteer2 preference | prompt, response_1, response_2, preference_strength | prompt | response_1 when preference_strength < 0, response_2 when > 0; 0: a tie, dropped |
| SHP | history, human_ref_A, human_ref_B, labels | history | human_ref_A when labels == 1, human_ref_B when 0 |
| PKU-SafeRLHF | prompt, response_0, response_1, better_response_id and/or safer_response_id | prompt | response_<label> |
| arena | conversation_a, conversation_b, winner | the conversations' shared turns | the winner's conversation; tie, tie (bothbad), both_bad: dropped |
| lmsys arena 55k | prompt, response_a, response_b (JSON lists of turns), winner_model_a, winner_model_b, winner_tie | the conversations' shared turns | the winner's conversation; winner_tie: dropped |
| StackExchange-paired | question, response_j, response_k | question | response_j (the higher-voted answer), response_k |
| system + question/prompt | question, chosen, rejected (no prompt); or system, prompt, chosen, rejected | `_turns` | the answers |

Whole conversations beside a text `prompt` (UltraFeedback, Tulu 3, Capybara, ORPO mix) need no mapping:
formats.py ignores the text prompt (as TRL does). `warn_ignored` warns for a column some schema here would read that
a split's layout leaves unread.
"""

import json
import math
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

from dpo_lightning.data.rows import TEMPLATE_COLUMNS, Reading

ARENA_TIES = ("tie", "tie (bothbad)", "both_bad")


def _say(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def _with_system(messages: list, system: str) -> list:
    """The system message first, unless the messages open with one."""
    opens = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    return messages if opens or not system else _say("system", system) + messages


def _turns(question: Any, column: str, system: Any, answers: dict, chat: bool) -> dict:
    """A question (text or messages, from `column`) and its answers (text or messages) as the fields: messages keep
    their own system message, a text answer to messages is an assistant message, and a text question with text answers
    is [system, user: question] + assistant answers through a chat template, or without one the plain join
    "system\\n\\nquestion\\n\\n" (system and its blank line left out when empty)."""
    system = system if isinstance(system, str) and system.strip() else ""
    if isinstance(question, list):
        return {"prompt": _with_system(question, system),
                **{side: _say("assistant", text) if isinstance(text, str) else text for side, text in answers.items()}}
    if any(isinstance(answer, list) for answer in answers.values()):  # whole conversations: the text is a copy
        return {"prompt": question, **{side: _with_system(answer, system) if isinstance(answer, list) else answer
                                       for side, answer in answers.items()}}
    if not isinstance(question, str):
        return {"source_issue": f"{'missing' if question is None else 'not text'} {column}"}
    if not chat:
        return {"prompt": "".join(f"{part}\n\n" for part in (system, question) if part), **answers}
    return {"prompt": _with_system(_say("user", question), system),
            **{side: _say("assistant", text) if isinstance(text, str) else text for side, text in answers.items()}}


def _system_and(column: str) -> Callable[[dict, bool], dict]:
    """Intel/orca_dpo_pairs (`question`), jondurbin/truthy-dpo (`prompt`): `_turns` of the question, the system
    prompt and the chosen and rejected answers."""
    def to_row(row: dict, chat: bool) -> dict:
        return _turns(row.get(column), column, row.get("system"), {side: row.get(side) for side in ("chosen", "rejected")},
                      chat)
    return to_row


def _openai_preference(row: dict, chat: bool) -> dict:
    """OpenAI preference fine-tuning JSONL: prompt = input.messages, tools = input.tools, responses = the outputs."""
    given = row.get("input")
    if not isinstance(given, dict):
        return {"source_issue": "missing input" if given is None else "not messages input"}
    return {"prompt": given.get("messages"), "tools": given.get("tools"), "chosen": row.get("preferred_output"),
            "rejected": row.get("non_preferred_output")}


# --- Building a pair: the prompt column and the chosen and rejected columns (the label picked) -> the fields. ---

def _question_and_answers(row: dict, prompt: str, chosen: str, rejected: str, chat: bool) -> dict:
    return _turns(row.get(prompt), prompt, "", {"chosen": row[chosen], "rejected": row[rejected]}, chat)


def _conversations(row: dict, prompt: str | None, chosen: str, rejected: str, chat: bool) -> dict:
    """Whole conversations (arenas): their shared turns are the prompt (rules.py)."""
    return {"chosen": row[chosen], "rejected": row[rejected]}


def _json_turns(row: dict, prompt: str, chosen: str, rejected: str, chat: bool) -> dict:
    """lmsys-arena-human-preference-55k: prompt and responses are JSON lists of the turns' texts, answer i to prompt
    turn i; each side is the whole conversation, so a multi-turn battle whose earlier answers differ has no shared
    prompt (dropped as `prompts differ`, as for the other arenas)."""
    turns = {}
    for column in (prompt, chosen, rejected):
        try:
            value = json.loads(row[column]) if isinstance(row[column], str) else row[column]
        except json.JSONDecodeError:
            value = None
        if not (isinstance(value, list) and value and all(isinstance(turn, str) for turn in value)) or \
                len(value) != len(turns.get(prompt, value)):
            return {"source_issue": f"not JSON turns {column}"}
        turns[column] = value
    return {side: [m for question, answer in zip(turns[prompt], turns[column])
                   for m in _say("user", question) + _say("assistant", answer)]
            for side, column in (("chosen", chosen), ("rejected", rejected))}


# --- Labels: their values -> 0 (the first response is preferred), 1 (the second), or the problem dropping it. ---

def _integer(value: Any) -> int | None:
    """A label's integer: an int, a bool, an integral float or integer text; else None."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(value) if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value) else None


def _first_when(first: int) -> Callable[[Any], int | str]:
    """A 0/1 label saying the first response is preferred when it equals `first`."""
    def read(value: Any) -> int | str:
        value = _integer(value)
        return "not 0 or 1" if value not in (0, 1) else 0 if value == first else 1
    return read


def _sign(value: Any) -> int | str:
    """HelpSteer's preference, -3..3: negative prefers the first response, positive the second, 0 is a tie."""
    value = _integer(value)
    return "not an integer" if value is None else "tie" if value == 0 else 0 if value < 0 else 1


def _winner(value: Any) -> int | str:
    """An arena's winner: model_a, model_b, or a tie (ARENA_TIES)."""
    if value in ARENA_TIES:
        return "tie"
    return {"model_a": 0, "model_b": 1}.get(value, "unknown value") if isinstance(value, str) else "unknown value"


def _one_winner(model_a: Any, model_b: Any, tie: Any) -> int | str:
    """lmsys-arena-55k's three 0/1 columns, exactly one of them 1: model_a, model_b or a tie."""
    flags = [_integer(value) for value in (model_a, model_b, tie)]
    if None in flags or sorted(flags) != [0, 0, 1]:
        return "not one winner"
    return "tie" if flags[2] else 0 if flags[0] else 1


@dataclass(frozen=True)
class Label:
    """A label: the column(s) it reads (named together, joined by "/") and how it reads their values."""
    columns: tuple[str, ...]
    read: Callable[..., int | str]

    @property
    def name(self) -> str:
        return "/".join(self.columns)

    def pick(self, row: dict) -> int | str:
        values = [row.get(column) for column in self.columns]
        missing = any(value is None or (isinstance(value, float) and math.isnan(value)) for value in values)
        return "missing" if missing else self.read(*values)


@dataclass(frozen=True)
class Pair:
    """Two responses and the labels each saying, row by row, which one is preferred (none: the first); `build` turns
    the prompt column and the chosen and rejected columns into the fields."""
    prompt: str | None  # None: the responses are whole conversations, their shared turns the prompt
    responses: tuple[str, str]
    labels: tuple[Label, ...] = ()
    build: Callable[[dict, str | None, str, str, bool], dict] = _question_and_answers

    def to_row(self, row: dict, label: str, chat: bool) -> dict:
        pick = next(known for known in self.labels if known.name == label).pick(row) if label else 0
        if isinstance(pick, str):
            return {"source_issue": f"{pick} {label}"}
        for column in self.responses:
            if not isinstance(row.get(column), (str, list)):
                return {"source_issue": f"{'missing' if row.get(column) is None else 'not text'} {column}"}
        return self.build(row, self.prompt, *(self.responses if pick == 0 else self.responses[::-1]), chat)


@dataclass(frozen=True)
class Schema:
    """A public dataset layout: its name, the columns that identify it (`absent`: ones that rule it out), the
    other columns it reads, and its row mapping: a function, or a `Pair` following its `label`."""
    name: str
    columns: frozenset
    to_row: Callable[[dict, bool], dict] | None = None
    pair: Pair | None = None
    label: str = ""
    absent: frozenset = frozenset()
    also_reads: frozenset = frozenset()

    def labels_in(self, names: set[str]) -> list[str]:
        return [label.name for label in self.pair.labels if set(label.columns) <= names] if self.pair else []

    def matches(self, names: set[str]) -> bool:
        labelled = self.pair is None or not self.pair.labels or bool(self.labels_in(names))
        return self.columns <= names and not self.absent & names and labelled

    def map(self, row: dict, chat: bool) -> dict:
        mapped = self.pair.to_row(row, self.label, chat) if self.pair else self.to_row(row, chat)
        return {**{name: row[name] for name in TEMPLATE_COLUMNS if name in row}, **mapped}

    def label_columns(self, names: set[str]) -> tuple[set[str], set[str]]:
        """The columns of the label followed, and of the labels in `names` not followed (the user's choice)."""
        labels = [label for label in self.pair.labels if set(label.columns) <= names] if self.pair else []
        return ({c for label in labels if label.name == self.label for c in label.columns},
                {c for label in labels if label.name != self.label for c in label.columns})

    def reads(self, names: set[str]) -> set[str]:
        return {*self.columns, *self.also_reads, *TEMPLATE_COLUMNS, *self.label_columns(names)[0]}

    def describe(self) -> str:
        """The summary line's name: the schema, its prompt and what picks the chosen response."""
        if self.pair is None:
            return self.name
        prompt = f"prompt = {self.pair.prompt}" if self.pair.build is _question_and_answers else "whole conversations"
        return f"{self.name} ({prompt}, chosen " + (f"by {self.label})" if self.label else
                                                    f"= {self.pair.responses[0]})")


def _pair(name: str, prompt: str | None, responses: tuple[str, str], *labels: Label, **build) -> Schema:
    return Schema(name, frozenset({*([prompt] if prompt else []), *responses}),
                  pair=Pair(prompt, responses, tuple(labels), **build))


SCHEMAS = (
    Schema("OpenAI preference JSONL (prompt = input.messages, tools = input.tools)",
           frozenset({"input", "preferred_output", "non_preferred_output"}), _openai_preference),
    _pair("HelpSteer3 preference", "context", ("response1", "response2"), Label(("overall_preference",), _sign)),
    _pair("HelpSteer2 preference", "prompt", ("response_1", "response_2"), Label(("preference_strength",), _sign)),
    _pair("SHP", "history", ("human_ref_A", "human_ref_B"), Label(("labels",), _first_when(1))),
    _pair("PKU-SafeRLHF", "prompt", ("response_0", "response_1"), Label(("better_response_id",), _first_when(0)),
          Label(("safer_response_id",), _first_when(0))),
    _pair("arena", None, ("conversation_a", "conversation_b"), Label(("winner",), _winner), build=_conversations),
    _pair("lmsys arena 55k", "prompt", ("response_a", "response_b"),
          Label(("winner_model_a", "winner_model_b", "winner_tie"), _one_winner), build=_json_turns),
    _pair("StackExchange-paired", "question", ("response_j", "response_k")),
    Schema("system + question + answers (orca_dpo_pairs)", frozenset({"question", "chosen", "rejected"}),
           _system_and("question"), absent=frozenset({"prompt"}), also_reads=frozenset({"system"})),
    Schema("system + prompt + answers", frozenset({"system", "prompt", "chosen", "rejected"}), _system_and("prompt")),
)
# A known set's label column -> the set: beside a chosen/rejected mapping, it says the mapping may train inverted.
LABEL_OF = {column: schema.name for schema in SCHEMAS if schema.pair for label in schema.pair.labels
            for column in label.columns}


def detect_schema(names: set[str], columns: dict[str, str], label: str,
                  label_column: str | None = None) -> Schema | None:
    """The public schema `names` (a source's columns) match, following its label, or None for plain columns.

    Columns the user mapped (`--data.prompt_column` ...) win over detection, except where they pin chosen and
    rejected onto two responses beside a known set's label, which picks between them row by row: refused.
    """
    mapped = {field: column for field, column in columns.items() if column != field}
    found = next((schema for schema in SCHEMAS if schema.matches(names)), None)
    labels = found.labels_in(names) if found else []
    if mapped and labels and {columns.get("chosen"), columns.get("rejected")} & set(found.pair.responses):
        first, second = found.pair.responses
        raise ValueError(
            f"{label} data has {found.name}'s columns {sorted(found.columns | set('/'.join(labels).split('/')))}: "
            f"{' and '.join(labels)} "
            f"say{'s' * (len(labels) == 1)} row by row which of {first}/{second} is preferred, so a fixed "
            "--data.chosen_column / rejected_column would train inverted pairs on every row the label decides the "
            f"other way. Remove the column mapping: the {found.name} schema is detected from the columns"
            + (f", and set --data.label_column to {' or '.join(labels)}" if len(labels) > 1 else ""))
    beside = sorted(set(LABEL_OF) & (names - set(columns.values())))
    if {"chosen", "rejected"} & set(mapped) and beside:
        raise ValueError(
            f"{label} data has {', '.join(f'{c!r} ({LABEL_OF[c]} label)' for c in beside)} beside the pinned "
            f"--data.chosen_column {columns['chosen']!r} / rejected_column {columns['rejected']!r}: such a label says "
            "row by row which response is preferred, so a fixed mapping would train inverted pairs on every row it "
            "decides the other way. Build each pair from the label with --data.transform (or, if the column is no "
            "such label, remove it there)")
    if mapped or found is None:
        if label_column is not None:
            raise ValueError(f"--data.label_column {label_column!r}: the {label} data (columns {sorted(names)}) is "
                             "no known set of two responses and a label" + (" under a column mapping" * bool(mapped))
                             + ": remove the setting, or build each pair with --data.transform")
        return None
    if label_column is None and len(labels) > 1:
        raise ValueError(f"{label} data has {found.name}'s two labels {labels}, each saying row by row which of "
                         f"{'/'.join(found.pair.responses)} is preferred, by a different measure: set "
                         f"--data.label_column to the one to train on ({' or '.join(labels)})")
    if label_column is not None and label_column not in labels:
        raise ValueError(f"--data.label_column {label_column!r}: the {label} data's label columns are {labels} "
                         f"({found.name}): set it to one of them, or remove it")
    return replace(found, label=label_column or (labels[0] if labels else ""))


# --- Columns some schema reads, left unread by a split's layout: named in the summary, warned about here. ---

LABELS = ("label", "preference", *LABEL_OF)  # the generic names, and every known set's label column
_TEMPLATE_FIX = ("it is read only for conversations (prompt, chosen and rejected as messages, rendered by a chat "
                 "template) in offline training: give the rows as messages, or remove the column")
_SYSTEM_FIX = ("put it into the prompt as a system message with --data.transform (a column mapping turns off the "
               "schemas that read `system`)")
# A column some known schema reads -> (what it holds, what to do when this data's layout leaves it out).
KNOWN = {"system": ("a system prompt", _SYSTEM_FIX), "system_prompt": ("a system prompt", _SYSTEM_FIX),
         "tools": ("the tools a chat template lists", _TEMPLATE_FIX),
         "chat_template_kwargs": ("the chat template's arguments", _TEMPLATE_FIX),
         **{name: ("a preference label", "chosen and rejected are used as they stand; if it says row by row which "
                                         "response is preferred, build each pair with --data.transform")
            for name in LABELS}}


def warn_ignored(reading: Reading, label: str) -> None:
    """Warn for each ignored column some known schema would use (a system prompt, tools, template arguments, a
    preference label), naming it and what to do; the data summary names every ignored column."""
    for name in reading.ignored:
        if name in KNOWN and name not in reading.by_choice:
            what, fix = KNOWN[name]
            if name in LABELS and reading.mapped:
                fix += " (or remove the column mapping, so that a schema that follows the label is detected)"
            warnings.warn(f"{label} data: column {name!r} ({what}) is not used: {fix}", stacklevel=2)
