"""The one row model: the same rows give the same token ids from every source kind.

`hypothesis` writes conversational preference rows as users write them today (tool calls as responses, with no
content or content "", a tool call and its result inside the prompt, reasoning in `reasoning_content`, a system
message, a per-row `tools` list and `chat_template_kwargs` switching thinking off) and feeds the same rows as a
list of dicts, a dict of columns, a `datasets.Dataset`, .jsonl, .json, .parquet and a stream (.jsonl through
`datasets`' reader); text rows go through .csv as well. Every kind's kept rows must have the ids the oracle
gives: `conftest.qwen_pair`, QWEN_TEMPLATE rendered by hand (text rows: their characters, EOS after each
response). Before the one row model, .json/.jsonl and lists cut every message to role and content, so a tool
call vanished from those kinds (its row dropped as not messages) while parquet and `Dataset` kept it.

Arrow-backed kinds (parquet, `Dataset`, streams) store a column of objects with the keys in the order first seen
in the column, so rows here write an object's keys in one order (a prefix of a fixed list), as a real set does.
Examples per test: 6 in the suite; set DPO_PROPERTY_EXAMPLES for a longer search. Last, rows read from files
are read again when the reading code changes. Files go to temp folders; no network.
"""

import csv
import functools
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import EOS, ascii_tokenizer, ids, qwen_pair, qwen_tokenizer
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo_lightning.data import PreferenceDataModule, sources

SETTINGS = settings(max_examples=int(os.environ.get("DPO_PROPERTY_EXAMPLES", 6)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
KINDS = ("list", "dict", "dataset", "jsonl", "json", "parquet", "stream")
WORD = st.text("abcdefgh ,.?", min_size=1, max_size=8).filter(str.strip)
ARGUMENT_KEYS = ("city", "unit", "day")  # arguments hold a prefix of these, in this order
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "set_alarm", "description": "Alarm", "parameters": {
             "type": "object", "properties": {"day": {"type": "string"}}}}}]


@st.composite
def tool_call(draw) -> dict:
    arguments = {key: draw(WORD) for key in ARGUMENT_KEYS[:draw(st.integers(1, len(ARGUMENT_KEYS)))]}
    return {"type": "function", "function": {"name": draw(st.sampled_from(["get_weather", "set_alarm"])),
                                             "arguments": arguments}}


@st.composite
def answer(draw, thinking: bool) -> dict:
    """An assistant turn: text, text with its reasoning (not with thinking off: the template would differ from
    the generation prompt), or a tool call with no content or content ""."""
    kind = draw(st.sampled_from(["text", "reasoning", "call", "call with empty content"]))
    if kind == "text" or (kind == "reasoning" and not thinking):
        return {"role": "assistant", "content": draw(WORD)}
    if kind == "reasoning":
        return {"role": "assistant", "content": draw(WORD), "reasoning_content": draw(WORD)}
    return {"role": "assistant", **({"content": ""} if kind.endswith("content") else {}),
            "tool_calls": [draw(tool_call())]}


@st.composite
def conversation_row(draw) -> dict:
    prompt = [{"role": "system", "content": draw(WORD)}] if draw(st.booleans()) else []
    prompt.append({"role": "user", "content": draw(WORD)})
    if draw(st.booleans()):  # a tool call and its result before the answer
        prompt += [{"role": "assistant", "tool_calls": [draw(tool_call())]},
                   {"role": "tool", "name": "get_weather", "content": draw(WORD)}]
    thinking = draw(st.sampled_from([None, True, False]))
    row = {"prompt": prompt, "chosen": [draw(answer(thinking is not False))],
           "rejected": [draw(answer(thinking is not False))]}
    tools = [tool for tool in TOOLS if draw(st.booleans())]
    if tools:
        row["tools"] = tools
    if thinking is not None:
        row["chat_template_kwargs"] = {"enable_thinking": thinking}
    return row


def oracle(rows: list[dict]) -> dict[int, tuple]:
    """Each kept row's ids by its index: QWEN_TEMPLATE by hand; a row whose two responses render alike is dropped."""
    out = {}
    for i, row in enumerate(rows):
        pair = qwen_pair(row["prompt"], row["chosen"][0], row["rejected"][0], row.get("tools"),
                         row.get("chat_template_kwargs", {}).get("enable_thinking"))
        if pair[1] != pair[2]:
            out[i] = pair
    return out


def write(kind: str, rows: list[dict], folder: Path):
    """`rows` as a source of `kind` (a stream reads the .jsonl file through `datasets`)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    full = [{key: row.get(key) for key in keys} for row in rows]  # Arrow's from-list readers read the first row's keys
    if kind == "list":
        return rows
    if kind == "dict":
        return {key: [row.get(key) for row in rows] for key in keys}
    if kind == "dataset":
        return Dataset.from_list(full)
    path = folder / f"rows.{ {'stream': 'jsonl'}.get(kind, kind) }"
    if kind in ("jsonl", "stream"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(full), path)
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(rows)
    return str(path)


def kept_ids(kind: str, rows: list[dict], tokenizer, folder: Path) -> dict[int, tuple]:
    dm = PreferenceDataModule(dataset=write(kind, rows, folder), tokenizer=tokenizer, max_length=4096,
                              max_prompt_length=2048, streaming=kind == "stream")
    dm.setup("fit")
    return {row["row_id"]: (row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"])
            for row in dm.train_data}


@SETTINGS
@given(rows=st.lists(conversation_row(), min_size=2, max_size=4).filter(lambda rows: len(oracle(rows)) > 0))
def test_the_same_conversations_give_the_same_ids_from_every_source_kind(rows):
    expected = oracle(rows)
    with tempfile.TemporaryDirectory() as folder:
        for kind in KINDS:
            (Path(folder) / kind).mkdir()
            assert kept_ids(kind, rows, qwen_tokenizer(), Path(folder) / kind) == expected, kind


@SETTINGS
@given(rows=st.lists(st.fixed_dictionaries({"prompt": WORD, "chosen": WORD, "rejected": WORD, "source": WORD}),
                     min_size=2, max_size=4).filter(lambda rows: any(r["chosen"] != r["rejected"] for r in rows)))
def test_the_same_text_rows_give_the_same_ids_from_every_source_kind_csv_too(rows):
    expected = {i: (ids(row["prompt"]), ids(row["chosen"]) + [EOS], ids(row["rejected"]) + [EOS])
                for i, row in enumerate(rows) if row["chosen"] != row["rejected"]}
    with tempfile.TemporaryDirectory() as folder:
        for kind in (*KINDS, "csv"):
            (Path(folder) / kind).mkdir()
            assert kept_ids(kind, rows, ascii_tokenizer(), Path(folder) / kind) == expected, kind


def test_rows_read_from_a_file_are_read_again_by_new_reading_code(tmp_path, monkeypatch):
    # `datasets` names a generator's cache by the generator's own code, not by the row model it calls: a new version
    # of the reading code must not reuse rows the old one read (a tool call cut away, say).
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    assert sources.load_rows(str(path))[0][0]["prompt"] == "p"
    new_model = functools.partial(lambda row, old, **args: {**old(row, **args), "prompt": "new"},
                                  old=sources.canonical_row)
    monkeypatch.setattr(sources, "canonical_row", new_model)
    assert sources.load_rows(str(path))[0][0]["prompt"] == "p"  # the same reading code: the cache is read
    monkeypatch.setattr(sources, "READING_CODE", "the next version's")
    assert sources.load_rows(str(path))[0][0]["prompt"] == "new"
