"""Public preference datasets' layouts (schemas), detected from their columns and mapped onto the fields.

Each schema names a layout by the columns that identify it and maps one raw row onto `prompt`, `chosen`,
`rejected` (text or messages, for rules.py's formats) or onto a `source_issue`, the reason its row is
dropped and counted. sources.py applies the mapping while reading; the summary line names the schema.

| schema | identified by | prompt | chosen / rejected |
|---|---|---|---|
| OpenAI preference JSONL | input, preferred_output, non_preferred_output | input.messages | the outputs |
| HelpSteer3 preference | context, response1, response2, overall_preference | context | response1 when overall_preference < 0, response2 when > 0; 0: dropped as `tie` |
| SHP | history, human_ref_A, human_ref_B, labels | history | human_ref_A when labels == 1, else human_ref_B |
| orca_dpo_pairs | question, chosen, rejected, no prompt | [system (when non-empty), user: question] through the chat template; without one, "system\n\nquestion\n\n" | the answers |

Whole conversations beside a text `prompt` (UltraFeedback, Tulu 3, Capybara, ORPO mix) need no mapping:
formats.py ignores the text prompt (as TRL does).
"""

from dataclasses import dataclass
from typing import Any, Callable

def _text(row: dict, column: str) -> tuple[Any, str]:
    """`row[column]` and "" if it is text, else the drop reason naming the column."""
    value = row.get(column)
    return value, "" if isinstance(value, str) else "missing " + column if value is None else "not text " + column


def _say(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def _question_and_answers(row: dict, chat: bool) -> dict:
    """Intel/orca_dpo_pairs: prompt = [system (when non-empty), user: question], responses = the answers.

    Without a chat template, a plain join: the system text and the question, each followed by a blank line.
    """
    (question, issue), system = _text(row, "question"), row.get("system")
    system = system if isinstance(system, str) and system.strip() else ""
    answers = {side: row.get(side) for side in ("chosen", "rejected")}
    if issue:
        return {"source_issue": issue}
    if not chat:
        return {"prompt": "".join(f"{part}\n\n" for part in (system, question) if part), **answers}
    prompt = (_say("system", system) if system else []) + _say("user", question)
    return {"prompt": prompt, **{side: _say("assistant", text) if isinstance(text, str) else text
                                 for side, text in answers.items()}}


def _labelled_comments(row: dict, chat: bool) -> dict:
    """stanfordnlp/SHP: prompt = history; chosen = the comment `labels` prefers (1: human_ref_A, 0: human_ref_B)."""
    label = row.get("labels")
    if label is None or label not in (0, 1) or isinstance(label, float):
        return {"source_issue": "missing labels" if label is None else "not 0 or 1 labels"}
    a, b = row.get("human_ref_A"), row.get("human_ref_B")
    return {"prompt": row.get("history"), "chosen": a if label == 1 else b, "rejected": b if label == 1 else a}


def _scored_responses(row: dict, chat: bool) -> dict:
    """nvidia/HelpSteer3 preference: prompt = context; chosen = response1 when overall_preference < 0, else
    response2; a tie (0) is dropped as its own reason."""
    score = row.get("overall_preference")
    if not isinstance(score, int) or isinstance(score, bool):
        return {"source_issue": "missing overall_preference" if score is None else "not a number overall_preference"}
    if score == 0:
        return {"source_issue": "tie"}
    (first, issue1), (second, issue2) = _text(row, "response1"), _text(row, "response2")
    if issue1 or issue2:
        return {"source_issue": issue1 or issue2}
    chosen, rejected = (first, second) if score < 0 else (second, first)
    return {"prompt": row.get("context"), "chosen": _say("assistant", chosen), "rejected": _say("assistant", rejected)}


def _openai_preference(row: dict, chat: bool) -> dict:
    """OpenAI preference fine-tuning JSONL: prompt = input.messages, responses = the two outputs."""
    given = row.get("input")
    if not isinstance(given, dict):
        return {"source_issue": "missing input" if given is None else "not messages input"}
    return {"prompt": given.get("messages"), "chosen": row.get("preferred_output"),
            "rejected": row.get("non_preferred_output")}


@dataclass(frozen=True)
class Schema:
    """A public dataset layout: the columns that identify it, what the summary calls it, its row mapping."""
    columns: frozenset
    name: str
    to_row: Callable[[dict, bool], dict]


SCHEMAS = (
    Schema(frozenset({"input", "preferred_output", "non_preferred_output"}),
           "OpenAI preference JSONL (prompt = input.messages)", _openai_preference),
    Schema(frozenset({"context", "response1", "response2", "overall_preference"}),
           "HelpSteer3 preference (chosen by overall_preference, ties dropped)", _scored_responses),
    Schema(frozenset({"history", "human_ref_A", "human_ref_B", "labels"}),
           "SHP (prompt = history, chosen = the comment labels prefers)", _labelled_comments),
    Schema(frozenset({"question", "chosen", "rejected"}),
           "system + question + answers (orca_dpo_pairs)", _question_and_answers),
)


def detect_schema(names: set[str], columns: dict[str, str], label: str) -> Schema | None:
    """The public schema `names` (a source's columns) match, or None for prompt/chosen/rejected columns.

    Columns the user mapped (`--data.prompt_column` ...) win over detection, except where a schema's own
    columns contradict the mapping: SHP's `labels` says which comment is chosen, row by row.
    """
    mapped = {field: column for field, column in columns.items() if column != field}
    shp = SCHEMAS[2]
    if mapped and shp.columns <= names and {"human_ref_A", "human_ref_B"} & set(mapped.values()):
        raise ValueError(f"{label} data has SHP's columns {sorted(shp.columns)}: `labels` says row by row which of "
                         "human_ref_A/human_ref_B is preferred, so a fixed --data.chosen_column / rejected_column "
                         "would train inverted pairs on every labels == 0 row. Remove the column mapping: the "
                         "SHP schema is detected from the columns")
    if mapped:
        return None
    for schema in SCHEMAS:
        if schema.columns <= names and ("prompt" not in names or schema.to_row is not _question_and_answers):
            return schema
    return None
