"""Public preference datasets' layouts (schemas), detected from their columns and mapped onto the fields.

Each schema names a layout by the columns that identify it and maps one raw row onto `prompt`, `chosen`,
`rejected` (text or messages, for rules.py's formats; a row's `tools` and `chat_template_kwargs` pass through) or
onto a `source_issue`, the reason its row is dropped and counted. sources.py applies the mapping while reading;
the summary line names the schema.

Sets that store two responses and a label saying which one is preferred are one mechanism, `Pair`: the prompt
column, the two response columns and each label column with how to read it. Where a set has two labels
(PKU-SafeRLHF: better and safer), `--data.label_column` picks one; without it the set is refused, naming both. A
column mapping that pins chosen/rejected onto the responses a label picks between is refused: it would train
every row the label decides the other way inverted.

| schema | identified by | prompt | chosen / rejected |
|---|---|---|---|
| OpenAI preference JSONL | input, preferred_output, non_preferred_output | input.messages (tools: input.tools) | the outputs |
| HelpSteer3 preference | context, response1, response2, overall_preference | context | response1 when overall_preference < 0, response2 when > 0; 0: a tie, dropped |
| SHP | history, human_ref_A, human_ref_B, labels | history | human_ref_A when labels == 1, human_ref_B when 0 |
| PKU-SafeRLHF | prompt, response_0, response_1, better_response_id and/or safer_response_id | prompt | response_<label> |
| arena | conversation_a, conversation_b, winner | the conversations' shared turns | the winner's conversation; tie, tie (bothbad), both_bad: dropped |
| StackExchange-paired | question, response_j, response_k | question | response_j (the higher-voted answer), response_k |
| system + question/prompt | question, chosen, rejected (no prompt); or system, prompt, chosen, rejected | [system (when non-empty), user: question] through the chat template; without one, "system\n\nquestion\n\n" | the answers |

Whole conversations beside a text `prompt` (UltraFeedback, Tulu 3, Capybara, ORPO mix) need no mapping:
formats.py ignores the text prompt (as TRL does).
"""

from dataclasses import dataclass, replace
from typing import Any, Callable

from dpo_lightning.data.rows import TEMPLATE_COLUMNS

ARENA_TIES = ("tie", "tie (bothbad)", "both_bad")


def _text(row: dict, column: str) -> tuple[Any, str]:
    """`row[column]` and "" if it is text, else the drop reason naming the column."""
    value = row.get(column)
    return value, "" if isinstance(value, str) else "missing " + column if value is None else "not text " + column


def _say(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def _with_system(messages: list, system: str) -> list:
    """The system message first, unless the messages open with one."""
    opens = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    return messages if opens or not system else _say("system", system) + messages


def _system_and(column: str) -> Callable[[dict, bool], dict]:
    """Intel/orca_dpo_pairs (`question`), jondurbin/truthy-dpo (`prompt`): prompt = [system (when non-empty), user:
    the question], responses = the answers. Without a chat template, a plain join: the system text and the
    question, each followed by a blank line. Messages keep their own system message, if they have one."""
    def to_row(row: dict, chat: bool) -> dict:
        question, system = row.get(column), row.get("system")
        system = system if isinstance(system, str) and system.strip() else ""
        answers = {side: row.get(side) for side in ("chosen", "rejected")}
        if isinstance(question, list):
            return {"prompt": _with_system(question, system), **answers}
        if any(isinstance(answer, list) for answer in answers.values()):  # whole conversations: the text is a copy
            return {"prompt": question, **{side: _with_system(answer, system) if isinstance(answer, list) else answer
                                           for side, answer in answers.items()}}
        question, issue = _text(row, column)
        if issue:
            return {"source_issue": issue}
        if not chat:
            return {"prompt": "".join(f"{part}\n\n" for part in (system, question) if part), **answers}
        prompt = _with_system(_say("user", question), system)
        return {"prompt": prompt, **{side: _say("assistant", text) if isinstance(text, str) else text
                                     for side, text in answers.items()}}
    return to_row


def _openai_preference(row: dict, chat: bool) -> dict:
    """OpenAI preference fine-tuning JSONL: prompt = input.messages, tools = input.tools, responses = the outputs."""
    given = row.get("input")
    if not isinstance(given, dict):
        return {"source_issue": "missing input" if given is None else "not messages input"}
    return {"prompt": given.get("messages"), "tools": given.get("tools"), "chosen": row.get("preferred_output"),
            "rejected": row.get("non_preferred_output")}


# --- Labels: a label's value -> 0 (the first response is preferred), 1 (the second), or the problem dropping it. ---

def _first_when(first: int) -> Callable[[Any], int | str]:
    """A 0/1 label saying the first response is preferred when it equals `first`."""
    def read(value: Any) -> int | str:
        if isinstance(value, (bool, float)) or value not in (0, 1):
            return "not 0 or 1"
        return 0 if value == first else 1
    return read


def _sign(value: Any) -> int | str:
    """HelpSteer3's overall_preference, -3..3: negative prefers response1, positive response2, 0 is a tie."""
    if not isinstance(value, int) or isinstance(value, bool):
        return "not a number"
    return "tie" if value == 0 else 0 if value < 0 else 1


def _winner(value: Any) -> int | str:
    """An arena's winner: model_a, model_b, or a tie (ARENA_TIES)."""
    if value in ARENA_TIES:
        return "tie"
    return {"model_a": 0, "model_b": 1}.get(value, "unknown value") if isinstance(value, str) else "unknown value"


@dataclass(frozen=True)
class Pair:
    """Two responses and the label columns each saying, row by row, which one is preferred (none: the first)."""
    prompt: str | None  # None: the responses are whole conversations, their shared turns the prompt
    responses: tuple[str, str]
    labels: tuple[tuple[str, Callable[[Any], int | str]], ...] = ()
    as_messages: bool = False  # text responses answer a prompt of messages: each becomes an assistant message

    def to_row(self, row: dict, label: str) -> dict:
        pick = 0
        if label:
            value = row.get(label)
            pick = "missing" if value is None else dict(self.labels)[label](value)
            if isinstance(pick, str):
                return {"source_issue": f"{pick} {label}"}
        for column in self.responses:
            if row.get(column) is None or (self.as_messages and not isinstance(row[column], str)):
                return {"source_issue": _text(row, column)[1]}
        first, second = (row[column] for column in self.responses)
        chosen, rejected = (first, second) if pick == 0 else (second, first)
        if self.as_messages:
            chosen, rejected = _say("assistant", chosen), _say("assistant", rejected)
        return {**({"prompt": row.get(self.prompt)} if self.prompt else {}), "chosen": chosen, "rejected": rejected}


@dataclass(frozen=True)
class Schema:
    """A public dataset layout: its name, the columns that identify it (`absent`: ones that rule it out), the
    other columns it reads, and its row mapping: a function, or a `Pair` following its `label` column."""
    name: str
    columns: frozenset
    to_row: Callable[[dict, bool], dict] | None = None
    pair: Pair | None = None
    label: str = ""
    absent: frozenset = frozenset()
    also_reads: frozenset = frozenset()

    def labels_in(self, names: set[str]) -> list[str]:
        return [column for column, _ in self.pair.labels if column in names] if self.pair else []

    def matches(self, names: set[str]) -> bool:
        labelled = self.pair is None or not self.pair.labels or bool(self.labels_in(names))
        return self.columns <= names and not self.absent & names and labelled

    def map(self, row: dict, chat: bool) -> dict:
        mapped = self.pair.to_row(row, self.label) if self.pair else self.to_row(row, chat)
        return {**{name: row[name] for name in TEMPLATE_COLUMNS if name in row}, **mapped}

    def reads(self) -> set[str]:
        return {*self.columns, *self.also_reads, *TEMPLATE_COLUMNS, *([self.label] if self.label else [])}

    def describe(self) -> str:
        """The summary line's name: the schema, its prompt and what picks the chosen response."""
        if self.pair is None:
            return self.name
        prompt = f"prompt = {self.pair.prompt}" if self.pair.prompt else "whole conversations"
        return f"{self.name} ({prompt}, chosen " + (f"by {self.label})" if self.label else
                                                    f"= {self.pair.responses[0]})")


def _pair(name: str, prompt: str | None, responses: tuple[str, str], *labels, as_messages: bool = False) -> Schema:
    return Schema(name, frozenset({*([prompt] if prompt else []), *responses}),
                  pair=Pair(prompt, responses, tuple(labels), as_messages))


SCHEMAS = (
    Schema("OpenAI preference JSONL (prompt = input.messages, tools = input.tools)",
           frozenset({"input", "preferred_output", "non_preferred_output"}), _openai_preference),
    _pair("HelpSteer3 preference", "context", ("response1", "response2"), ("overall_preference", _sign),
          as_messages=True),
    _pair("SHP", "history", ("human_ref_A", "human_ref_B"), ("labels", _first_when(1))),
    _pair("PKU-SafeRLHF", "prompt", ("response_0", "response_1"), ("better_response_id", _first_when(0)),
          ("safer_response_id", _first_when(0))),
    _pair("arena", None, ("conversation_a", "conversation_b"), ("winner", _winner)),
    _pair("StackExchange-paired", "question", ("response_j", "response_k")),
    Schema("system + question + answers (orca_dpo_pairs)", frozenset({"question", "chosen", "rejected"}),
           _system_and("question"), absent=frozenset({"prompt"}), also_reads=frozenset({"system"})),
    Schema("system + prompt + answers", frozenset({"system", "prompt", "chosen", "rejected"}), _system_and("prompt")),
)


def detect_schema(names: set[str], columns: dict[str, str], label: str,
                  label_column: str | None = None) -> Schema | None:
    """The public schema `names` (a source's columns) match, following its label, or None for plain columns.

    Columns the user mapped (`--data.prompt_column` ...) win over detection, except where they pin chosen and
    rejected onto the two responses a label picks between, row by row: refused.
    """
    mapped = {field: column for field, column in columns.items() if column != field}
    found = next((schema for schema in SCHEMAS if schema.matches(names)), None)
    labels = found.labels_in(names) if found else []
    if mapped and labels and {columns.get("chosen"), columns.get("rejected")} & set(found.pair.responses):
        first, second = found.pair.responses
        raise ValueError(
            f"{label} data has {found.name}'s columns {sorted(found.columns | set(labels))}: {' and '.join(labels)} "
            f"say{'s' * (len(labels) == 1)} row by row which of {first}/{second} is preferred, so a fixed "
            "--data.chosen_column / rejected_column would train inverted pairs on every row the label decides the "
            f"other way. Remove the column mapping: the {found.name} schema is detected from the columns"
            + (f", and set --data.label_column to {' or '.join(labels)}" if len(labels) > 1 else ""))
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
