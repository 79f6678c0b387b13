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
import gzip
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
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


def module(kind: str, rows: list[dict], tokenizer, folder: Path) -> PreferenceDataModule:
    dm = PreferenceDataModule(dataset=write(kind, rows, folder), tokenizer=tokenizer, max_length=4096,
                              max_prompt_length=2048, streaming=kind == "stream")
    dm.setup("fit")
    return dm


def kept_ids(kind: str, rows: list[dict], tokenizer, folder: Path) -> dict[int, tuple]:
    return {row["row_id"]: (row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"])
            for row in module(kind, rows, tokenizer, folder).train_data}


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


# --- Issue 29, the tester's round: every source kind decides alike, from all its rows (each failed before). ---

def say(role: str, text: str) -> dict:
    return {"role": role, "content": text}


@pytest.mark.parametrize("kind", KINDS)
def test_a_column_that_first_appears_after_row_100_is_read_by_every_source_kind(kind, tmp_path):
    # Lists, dicts, .json and .jsonl took their columns from the first 100 rows: row 100's tools and thinking switch
    # were dropped without a word (not even named as ignored), while parquet, a Dataset and a stream used them.
    rows = [{"prompt": [say("user", f"q{i}")], "chosen": [say("assistant", "a")],
             "rejected": [say("assistant", "b")]} for i in range(101)]
    rows[100] = {**rows[100], "tools": TOOLS[:1], "chat_template_kwargs": {"enable_thinking": False}}
    dm = module(kind, rows, qwen_tokenizer(), tmp_path)
    assert {row["row_id"]: (row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"])
            for row in dm.train_data} == oracle(rows)
    assert oracle(rows)[100] != oracle(rows)[99][:1] + oracle(rows)[99][1:]  # row 100 renders its tools
    assert dm.summary.get("train", {}).get("ignored", []) == []


@pytest.mark.parametrize("kind", (*KINDS, "csv"))
def test_a_late_system_column_is_read_alike_by_every_source_kind(kind, tmp_path):
    # A `system` column null but in row 100: a Dataset and parquet read the rows as system + prompt + answers through
    # the chat template, lists and .jsonl as explicit text that neither used nor named `system`.
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(101)]
    rows[100]["system"] = "Be terse."
    expected = {i: qwen_pair([*([say("system", row["system"])] if "system" in row else []), say("user", row["prompt"])],
                             say("assistant", row["chosen"]), say("assistant", row["rejected"]))
                for i, row in enumerate(rows)}
    dm = module(kind, rows, qwen_tokenizer(), tmp_path)
    assert {row["row_id"]: (row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"])
            for row in dm.train_data} == expected
    assert dm.summary.get("train", {"schema": "system + prompt + answers"})["schema"] == "system + prompt + answers"


NUMBERS = [1, 1.5, 2 ** 63 + 5, 3.141592653589793, 2 ** 70, -0.1]


@pytest.mark.parametrize("kind", ("list", "dict", "jsonl", "json", "stream"))
def test_numbers_in_tool_calls_reach_the_template_as_written(kind, tmp_path):
    # A stream read .jsonl through `datasets`' own reader: {"n": 1} beside {"n": 1.5} became 1.0, 2**63 + 5 became
    # 9.223372036854776e+18; and `datasets`' JSON storage wrote every float with 10 digits (3.1415926536) and
    # refused an integer beyond 64 bits (an error deep inside pandas' ujson).
    rows = [{"prompt": [say("user", f"set {i}")], "chosen": [{"role": "assistant", "tool_calls": [
                {"type": "function", "function": {"name": "set_alarm", "arguments": {"n": n}}}]}],
             "rejected": [say("assistant", "no")]} for i, n in enumerate(NUMBERS)]
    assert kept_ids(kind, rows, qwen_tokenizer(), tmp_path) == oracle(rows)
    assert b'"arguments": {"n": 1180591620717411303424}' in bytes(oracle(rows)[4][1])


@pytest.mark.parametrize("name", ["rows.JSONL", "rows.ndjson", "rows.NDJSON.gz", "rows.Json"])
def test_json_lines_files_are_known_by_any_case_and_by_ndjson(name, tmp_path):
    # A single .JSONL or .ndjson file failed with "files must share one type of [...]".
    rows = [{"prompt": f"p{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(2)]
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    (tmp_path / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    dm = PreferenceDataModule(dataset=str(tmp_path / name), tokenizer=ascii_tokenizer(), max_length=64,
                              max_prompt_length=32)
    dm.setup("fit")
    assert [row["chosen_input_ids"] for row in dm.train_data] == [ids(row["chosen"]) + [EOS] for row in rows]


@pytest.mark.parametrize("streaming", (False, True))
@pytest.mark.parametrize("indent", (None, 2))
def test_a_json_file_holding_a_dict_of_columns_is_read_as_columns(streaming, indent, tmp_path):
    # Read as one row and dropped as `not messages prompt`; streamed, it trained nothing and exited 0.
    rows = [{"prompt": [say("user", f"q{i}")], "chosen": [say("assistant", f"a{i}")],
             "rejected": [say("assistant", "b")]} for i in range(3)]
    path = tmp_path / "columns.json"
    path.write_text(json.dumps({key: [row[key] for row in rows] for key in rows[0]}, indent=indent))
    dm = PreferenceDataModule(dataset=str(path), tokenizer=qwen_tokenizer(), max_length=512, max_prompt_length=256,
                              streaming=streaming)
    dm.setup("fit")
    assert {row["row_id"]: (row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"])
            for row in dm.train_data} == oracle(rows)
