"""The data rules: a preference row -> (prompt, chosen, rejected) strings -> token ids, cut to fit.

Applied in this order by `prepare_rows`, the one implementation (training, `inspect-data` and the tests all
run it on batches of rows), after the DPO reference's `preference_datasets.py::tokenize_batch_element`.
The file reads top to bottom: `prepare_rows`, then each rule's helpers, then the drop reasons.

1. Prompt. Each row becomes prompt, chosen and rejected strings as its format says (detected by formats.py:
   explicit, HH dialogues, implicit shared prefix, chat-template conversations). A row whose two sides
   do not share a prompt is dropped and counted, never sliced into a corrupt response. Conversations are
   rendered with the row's `tools` and template arguments as TRL passes them (`template_arguments`); a
   response may be a tool call (an assistant message with `tool_calls` and no content), its rendering
   the response.
2. Tokenize prompt, chosen and rejected separately with `add_special_tokens=False`, so the prompt ids
   are identical in both sequences and no token merges across the prompt/response boundary. Text fields
   are text: a special token's text inside one ("</s>" quoted in a response) stays text, never the
   special token; only a chat template's rendering keeps its markers as tokens. One BOS
   goes in front of the prompt where the tokenizer adds one to plain text (`with_bos`: not a second one
   when the text, e.g. a chat template's, already starts with it); EOS is appended to each response,
   except for conversations, whose responses end with the template's own end-of-turn token. A prompt
   with no tokens at all (`""` without BOS) is dropped and counted: no position would predict the first
   response token, so it would silently go unscored. With BOS, an empty prompt is `[BOS]`.
3. If prompt + longer response exceeds `max_length`, a prompt longer than `max_prompt_length` keeps
   `max_prompt_length` tokens (BOS included and kept in front): its end with `truncation_mode="keep_end"`
   (dialogues end with the turn being answered), its start with `"keep_start"`; a shorter prompt stays
   whole. If still too long, both responses are cut to the room left, which is at least one token
   because `max_prompt_length < max_length`: no response is ever empty, and a prompt longer than
   `max_length` is cut like any other rather than dropped (as the DPO reference does).
4. Labels are the input ids with every prompt position set to `IGNORE_INDEX`. The collator places them
   by lengths, never by comparing ids, so a response's EOS is learned even when pad == eos.

Rows that cannot be used (a missing, non-text or empty field, identical responses, prompts that
differ; the bad-input table in docs/data.md lists every reason) are dropped and counted by reason in
`PreferenceDataModule.summary`, or with `strict=True` raise an error naming the split, the row, the
field and the fix. Batches hold chosen rows first, then rejected rows, so one forward pass scores both
(rule 4 is batches.py's `collate_pairs`, or packing.py's `collate_shared`).
"""

import os
from typing import Any

from datasets import Features, List, Value
from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.rows import FIELDS, from_storage, message_problem
from dpo_lightning.data.sources import STAGE_NAMES

HH_ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant", "tool")
PREPARED = Features({"row_id": Value("int64"), "drop_reason": Value("string"),
                     **{f"{field}_input_ids": List(Value("int64")) for field in FIELDS},
                     "length": Value("int64"), "truncated": Value("bool"), "chosen_longer": Value("bool")})


def prepare_rows(batch: dict[str, list], indices: list[int], dataset_format: str, tokenizer: PreTrainedTokenizerBase,
                 bos_token_id: int | None, max_length: int, max_prompt_length: int,
                 truncation_mode: str, chat_template_kwargs: dict | None = None) -> dict[str, list]:
    """Rules 1 to 3 for a batch of rows (a batched `datasets.map` function).

    Returns a `PREPARED` row for every input row: its `row_id` (its position in its split; batches carry
    it, so error messages and cached reference log-probs name rows by it), its `drop_reason` ("" if kept;
    a dropped row's ids are empty) and `truncate`'s fields. Each field is tokenized in one batched call.
    `chat_template_kwargs`: the run's template arguments (a row's own win).
    """
    checked = [to_strings(dict(zip(batch, values)), index, dataset_format, tokenizer,
                          chat_template_kwargs=chat_template_kwargs)
               for index, values in zip(indices, zip(*batch.values()))]
    ids = [encode(tokenizer, [row[field] for row in checked], fields_are_text(dataset_format)) for field in FIELDS]
    eos = [] if dataset_format == "conversational" else [tokenizer.eos_token_id]
    out = {name: [] for name in PREPARED}
    for index, row, prompt, chosen, rejected in zip(indices, checked, *ids):
        prompt = with_bos(prompt, bos_token_id)
        reason = row["drop_reason"] or ("" if prompt else "empty prompt")
        if reason:
            prepared = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": [], "length": 0,
                        "truncated": False, "chosen_longer": False}
        else:
            prepared = truncate(prompt, chosen + eos, rejected + eos, max_length, max_prompt_length,
                                truncation_mode, bos_token_id)
        for name, value in {"row_id": index, "drop_reason": reason, **prepared}.items():
            out[name].append(value)
    return out


# --- Rule 1: each row's prompt, chosen and rejected strings, or the reason it is dropped. ---

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


def template_arguments(row: dict, run: dict | None = None) -> dict:
    """`apply_chat_template`'s further arguments for a row, as TRL's DPOTrainer passes them: the row's `tools`, then
    its `chat_template_kwargs`; before both, the run's `chat_template_kwargs` (a row's own win). An empty tools
    list is no tools, as TRL's `apply_chat_template` has it: Llama 3's template renders a tool preamble for `[]`.
    """
    return {**(run or {}), **({"tools": row["tools"]} if row.get("tools") else {}),
            **(row.get("chat_template_kwargs") or {})}


def render_conversation(prompt: list[dict] | None, chosen: list[dict], rejected: list[dict],
                        tokenizer: PreTrainedTokenizerBase,
                        arguments: dict | None = None) -> tuple[str, str, str] | None:
    """Chat-template texts (prompt, chosen response, rejected response); None if they cannot be split.

    Without a `prompt`, every message but the last is the prompt, and must be the same on both sides.
    `arguments`: `template_arguments`, passed to every rendering.
    """
    if prompt is None:
        if not chosen or chosen[:-1] != rejected[:-1]:
            return None
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if not prompt:
        return None
    arguments = arguments or {}
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **arguments)
    responses = []
    for answer in (chosen, rejected):
        whole = tokenizer.apply_chat_template(prompt + answer, tokenize=False, **arguments)
        if not whole.startswith(prompt_text):  # the template renders the prompt differently once answered
            return None
        responses.append(whole[len(prompt_text):])
    return prompt_text, *responses


def to_strings(row: dict, index: int, dataset_format: str, tokenizer: PreTrainedTokenizerBase | None = None,
               strict: bool = False, stage: str = "train", chat_template_kwargs: dict | None = None) -> dict[str, Any]:
    """Rule 1 and the row checks: `prompt`, `chosen`, `rejected` strings and a `drop_reason` ("" if kept).

    With `strict=True` a row that would be dropped raises `drop_error` instead.
    """
    out = _split_and_check(row, dataset_format, tokenizer, chat_template_kwargs)
    if strict and out["drop_reason"]:
        raise drop_error(out["drop_reason"], index, stage)
    return out


def _split_and_check(row: dict, dataset_format: str, tokenizer: PreTrainedTokenizerBase | None,
                     chat_template_kwargs: dict | None = None) -> dict[str, Any]:
    empty = {field: "" for field in FIELDS}
    if row.get("source_issue"):
        return {**empty, "drop_reason": row["source_issue"]}
    row = from_storage(row)
    fields = FIELDS if "prompt" in row and dataset_format in ("explicit", "conversational") else FIELDS[1:]
    for field in fields:
        problem = _field_problem(row.get(field), dataset_format)
        if problem:
            return {**empty, "drop_reason": f"{problem} {field}"}
    for field in ("chosen", "rejected"):
        if dataset_format == "hh" and HH_ASSISTANT not in row[field]:
            return {**empty, "drop_reason": f"no assistant turn {field}"}
        if dataset_format == "conversational" and not (row[field] and _answers(row[field][-1])):
            return {**empty, "drop_reason": f"empty {field}"}  # the template would render an empty turn
    if dataset_format == "explicit":
        parts = row["prompt"], row["chosen"], row["rejected"]
    elif dataset_format == "hh":
        parts = split_dialogue(row["chosen"], row["rejected"])
    elif dataset_format == "implicit":
        parts = split_shared_prefix(row["chosen"], row["rejected"])
    else:
        try:
            parts = render_conversation(row.get("prompt"), row["chosen"], row["rejected"], tokenizer,
                                        template_arguments(row, chat_template_kwargs))
        except Exception:  # noqa: BLE001 - the template is code run on the row: whatever it raises (its own
            # `raise_exception`: roles out of order; a ZeroDivisionError; a value `tojson` cannot write) is the row's
            return {**empty, "drop_reason": "chat template error"}
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
    if not isinstance(value, list):
        return "not messages"
    problem = next(filter(None, map(message_problem, value)), "")
    if problem:
        return problem
    return "" if all(m.get("role") in ROLES for m in value) else "unknown role"


def _answers(message: dict) -> bool:
    """Whether a response's last message says something: text, or a tool call (TRL's tool-call format)."""
    return bool((message.get("content") or "").strip() or message.get("tool_calls"))


# --- Rule 2: each string's token ids, one BOS in front of the prompt, EOS after each response. ---

def with_bos(ids: list[int], bos_token_id: int | None) -> list[int]:
    """Rule 2's one BOS: `ids` with `bos_token_id` in front, unless it is None or `ids` already start with it.

    Example:
        with_bos([5, 6], 1) == [1, 5, 6];  with_bos([1, 5], 1) == [1, 5];  with_bos([5], None) == [5]
    """
    return ids if bos_token_id is None or ids[:1] == [bos_token_id] else [bos_token_id, *ids]


def fields_are_text(dataset_format: str) -> bool:
    """Rule 2's as-text rule for rows of `dataset_format`, preference pairs and online prompts alike: a text field is
    text (its special tokens' text stays text, `encode`'s `as_text`); a conversation's chat template rendering keeps
    its markers as the special tokens they stand for."""
    return dataset_format != "conversational"


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], as_text: bool = False) -> list[list[int]]:
    """Each text's ids without added special tokens, in one call: a fast tokenizer encodes the list in Rust.

    With `as_text`, a special token's text inside a text ("</s>", "<|endoftext|>" quoted in a response) is
    tokenized as the text it is, not as the special token (which would put an EOS mid-response); only a
    chat template's rendering is encoded with its markers as the special tokens they stand for.
    """
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer puts one in front of plain text (Llama does, GPT-2 doesn't), else None."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


# --- Rule 3: a pair too long for max_length, cut. ---

def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int,
             truncation_mode: str, bos_token_id: int | None = None) -> dict[str, Any]:
    """Rule 3 on token ids: the prompt (with its BOS) and each response (with its EOS), cut to fit.

    Returns `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (the collator concatenates
    prompt + response and builds the labels, rule 4), and for the data summary: `length` (prompt +
    longer response before truncation), `truncated` and `chosen_longer`.
    """
    length = len(prompt) + max(len(chosen), len(rejected))
    stats = {"length": length, "truncated": length > max_length, "chosen_longer": len(chosen) > len(rejected)}
    if length > max_length:
        prompt = cut_prompt(prompt, max_prompt_length, truncation_mode, bos_token_id)
    room = max_length - len(prompt)
    return {"prompt_input_ids": prompt, "chosen_input_ids": chosen[:room], "rejected_input_ids": rejected[:room],
            **stats}


def cut_prompt(prompt: list[int], max_prompt_length: int, truncation_mode: str,
               bos_token_id: int | None = None) -> list[int]:
    """Rule 3's prompt cut: a prompt longer than `max_prompt_length` keeps that many tokens, BOS kept in front, its
    end (`keep_end`) or its start (`keep_start`); a shorter one stays whole."""
    if len(prompt) <= max_prompt_length:
        return prompt
    head = prompt[:1] if bos_token_id is not None and prompt[:1] == [bos_token_id] else []  # BOS stays in front
    body, keep = prompt[len(head):], max_prompt_length - len(head)
    return head + (body[len(body) - keep:] if truncation_mode == "keep_end" else body[:keep])


# --- Drop reasons: what `strict=True` raises and docs/data.md's bad-input table lists. ---

# drop reason (without its field) -> what a user can do about it: strict mode's errors, docs/data.md's table.
FIXES = {
    "missing": "fill the field or filter the row out",
    "not text": "give the field as text (a JSON string, not a number or object), or filter the row out (ShareGPT's "
                "{'from', 'value'} messages: map them to {'role', 'content'} with --data.transform)",
    "not messages": "give the field as a list of {'role': ..., 'content': ...} messages with text content (or, "
                    "for a tool call, 'tool_calls' and no content); ShareGPT's {'from', 'value'} messages: map them "
                    "to {'role', 'content'} with --data.transform",
    "not tool calls": "give each tool call as {'type': 'function', 'function': {'name': ..., 'arguments': ...}}, "
                      "the form chat templates render (not OpenAI's custom tool calls, not null)",
    "not a list": "give tools as a list of function schemas ({'type': 'function', 'function': {...}}) or a JSON "
                  "string of one",
    "not tool schemas": "give tools as a list of function schemas ({'type': 'function', 'function': {...}}), not "
                        "names or nulls",
    "not template arguments": "give chat_template_kwargs as an object of the chat template's own variables, e.g. "
                              "{'enable_thinking': false}: not messages, tools (the tools column gives them), "
                              "chat_template, tokenize, add_generation_prompt or another of apply_chat_template's "
                              "own arguments",
    "chat template error": "the tokenizer's chat template refused or failed on the row (apply_chat_template on its "
                           "messages, tools and template arguments shows the template's message): fix the row, or "
                           "filter it out",
    "unknown role": f"use the roles {', '.join(ROLES)} (map ShareGPT-style 'human'/'gpt' roles first)",
    "empty": "remove the row: an empty answer teaches nothing",
    "empty prompt": "give the row a prompt: without BOS no position predicts the first response token",
    "chosen == rejected": "remove the row: a tie carries no preference",
    "prompts differ": "fix the row so both sides share the prompt, or give an explicit prompt column",
    "no assistant turn": "end the dialogue's prompt with '\\n\\nAssistant:', or give an explicit prompt column",
    "no shared prompt": "give an explicit prompt column",
    "not a dict": "give each row as a JSON object / dict {'prompt': ..., 'chosen': ..., 'rejected': ...}",
    "not valid JSON": "fix or remove the line (one JSON object per line)",
    "dropped by transform": "nothing, if --data.transform means to drop it; else make it return the row",
    "tie": "nothing: a tie carries no preference",
    "not 0 or 1": "give the label as 0 or 1 (1.0, true or the text 1 read alike), saying which response is "
                  "preferred (the schema table in docs/data.md says which is which)",
    "not an integer": "give the preference as an integer from -3 to 3 (-2.0 or the text -2 read alike; negative: the "
                      "first response preferred)",
    "unknown value": "give winner as model_a, model_b, or a tie (tie, tie (bothbad), both_bad)",
    "not one winner": "give exactly one of winner_model_a, winner_model_b and winner_tie as 1, the others 0",
    "not JSON turns": "give prompt, response_a and response_b as JSON lists of the turns' texts, one answer per prompt "
                      "turn (as lmsys-arena-human-preference-55k stores them), or filter the row out",
}
# reasons that name no field of their own -> the field the error names (None: the whole row)
_ROW_REASONS = {"chosen == rejected": "rejected", "prompts differ": "rejected", "no shared prompt": "rejected",
                "empty prompt": "prompt", "not a dict": None, "not valid JSON": None, "dropped by transform": None,
                "chat template error": None}


def drop_error(reason: str, index: int, stage: str = "train") -> ValueError:
    """The error for a dropped row under `strict=True`: the split, the row, the field and the fix."""
    kind, _, field = (reason, "", _ROW_REASONS[reason]) if reason in _ROW_REASONS else reason.rpartition(" ")
    where = f"field {field!r}: " if field else ""
    return ValueError(f"{STAGE_NAMES.get(stage, stage)} row {index}: {where}{reason}; {FIXES[kind]} "
                      "(or set strict: false to drop and count such rows)")
