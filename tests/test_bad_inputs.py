"""The bad-input catalogue: malformed rows and sources, each through every source kind it can be written as.

A row-level case puts one bad row (index 2) among three good ones and asserts a counted drop with its
documented reason (the bad-input table in docs/data.md), the good rows intact token for token, and under
`strict: true` an error naming the split, row 2, the field and the fix. A source-level case asserts an
error raised by dpo_lightning's own code (a `ValueError`/`FileNotFoundError` whose traceback ends in our
package, not in pyarrow, datasets or pandas). Source kinds: a list of rows, a dict of columns, a
`datasets.Dataset`, .jsonl, .json, .parquet, .csv files, and a glob of two .jsonl files. A kind that
cannot hold a case (an int among strings in a typed Arrow column, a row that is not a dict in a CSV)
is left out of that case. Files go to temp folders; no network.
"""

import csv
import os
import json
import subprocess
import sys
import traceback

import pytest
from conftest import EOS, ascii_tokenizer, ids
from datasets import Dataset

from dpo_lightning.data import PreferenceDataModule

ALL = ("list", "dict", "dataset", "jsonl", "json", "parquet", "csv", "glob")
PY = ("list", "dict", "jsonl", "json", "glob")  # read in Python: a value of any type can stand anywhere
ROWS = ("list", "jsonl", "json", "glob")  # sources of rows (a row need not be a dict)
TYPED = ("list", "dict", "dataset", "jsonl", "json", "parquet", "glob")  # can hold messages
BAD = 2  # the bad row's index
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                "{% if add_generation_prompt %}assistant:{% endif %}"

EXPLICIT = [{"prompt": f"p{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(3)]
HH = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: a{i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: b{i}"}
      for i in range(3)]
IMPLICIT = [{"chosen": f"Say {i} yes", "rejected": f"Say {i} no"} for i in range(3)]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


CHAT = [{"prompt": user(f"q{i}"), "chosen": assistant(f"a{i}"), "rejected": assistant(f"b{i}")} for i in range(3)]
# Each good row's (prompt, chosen, rejected) text after rule 1, to check the kept rows token by token.
TEXTS = {"explicit": [(r["prompt"], r["chosen"], r["rejected"]) for r in EXPLICIT],
         "hh": [(f"\n\nHuman: q{i}\n\nAssistant:", f" a{i}", f" b{i}") for i in range(3)],
         "implicit": [(f"Say {i}", " yes", " no") for i in range(3)],
         "conversational": [(f"user: q{i}\nassistant:", f" a{i}\n", f" b{i}\n") for i in range(3)]}
GOOD = {"explicit": EXPLICIT, "hh": HH, "implicit": IMPLICIT, "conversational": CHAT}

# (name, format, bad row, reason counted, field named under strict, kinds)
DROPS = [
    ("chosen None", "explicit", {"prompt": "p", "chosen": None, "rejected": " b"}, "missing chosen", "chosen", ALL),
    ("rejected None", "explicit", {"prompt": "p", "chosen": " a", "rejected": None}, "missing rejected", "rejected", ALL),
    ("prompt None", "explicit", {"prompt": None, "chosen": " a", "rejected": " b"}, "missing prompt", "prompt", ALL),
    ("chosen key absent", "explicit", {"prompt": "p", "rejected": " b"}, "missing chosen", "chosen", ALL),
    ("chosen int", "explicit", {"prompt": "p", "chosen": 5, "rejected": " b"}, "not text chosen", "chosen", PY),
    ("chosen float", "explicit", {"prompt": "p", "chosen": 1.5, "rejected": " b"}, "not text chosen", "chosen", PY),
    ("rejected bool", "explicit", {"prompt": "p", "chosen": " a", "rejected": True}, "not text rejected", "rejected", PY),
    ("chosen object", "explicit", {"prompt": "p", "chosen": {"x": 1}, "rejected": " b"}, "not text chosen", "chosen", PY),
    ("prompt list of ints", "explicit", {"prompt": [1, 2], "chosen": " a", "rejected": " b"}, "not text prompt",
     "prompt", PY),
    ("rejected empty", "explicit", {"prompt": "p", "chosen": " a", "rejected": ""}, "empty rejected", "rejected",
     ALL[:-2] + ("glob",)),  # CSV: an empty cell is a missing value (next case)
    ("rejected empty cell", "explicit", {"prompt": "p", "chosen": " a", "rejected": ""}, "missing rejected",
     "rejected", ("csv",)),
    ("chosen whitespace", "explicit", {"prompt": "p", "chosen": "   ", "rejected": " b"}, "empty chosen", "chosen", ALL),
    ("chosen newline and tab", "explicit", {"prompt": "p", "chosen": "\n\t", "rejected": " b"}, "empty chosen",
     "chosen", ALL),
    ("a tie", "explicit", {"prompt": "p", "chosen": " same", "rejected": " same"}, "chosen == rejected", "rejected",
     ALL),
    ("empty prompt, no BOS", "explicit", {"prompt": "", "chosen": " a", "rejected": " b"}, "empty prompt", "prompt",
     ALL[:-2] + ("glob",)),
    ("row is a string", "explicit", "just some text", "not a dict", None, ROWS),
    ("row is a list", "explicit", [1, 2], "not a dict", None, ROWS),
    ("row is null", "explicit", None, "not a dict", None, ROWS),
    ("line not JSON", "explicit", "{not json", "not valid JSON", None, ("jsonl",)),
    ("hh chosen without assistant turn", "hh", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
     "no assistant turn chosen", "chosen", ALL),
    ("hh rejected without assistant turn", "hh", {"chosen": "\n\nHuman: hi\n\nAssistant: a",
                                                  "rejected": "\n\nHuman: hi"}, "no assistant turn rejected",
     "rejected", ALL),
    ("hh prompts differ", "hh", {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: yo\n\nAssistant: b"},
     "prompts differ", "rejected", ALL),
    ("hh rejected has one more exchange", "hh", {"chosen": "\n\nHuman: hi\n\nAssistant: a",
                                                 "rejected": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: and?\n\nAssistant: b"},
     "prompts differ", "rejected", ALL),
    ("hh empty answer", "hh", {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
     "empty chosen", "chosen", ALL),
    ("hh chosen None", "hh", {"chosen": None, "rejected": "\n\nHuman: hi\n\nAssistant: b"}, "missing chosen", "chosen",
     ALL),
    ("implicit nothing shared", "implicit", {"chosen": "Yes please", "rejected": "No thanks"}, "no shared prompt",
     "rejected", ALL),
    ("implicit shared only inside a word", "implicit", {"chosen": "cats purr", "rejected": "catalogues"},
     "no shared prompt", "rejected", ALL),
    ("unknown role", "conversational", {"prompt": [{"role": "human", "content": "q"}], "chosen": assistant("a"),
                                        "rejected": assistant("b")}, "unknown role prompt", "prompt", TYPED),
    ("message without content", "conversational", {"prompt": [{"role": "user"}], "chosen": assistant("a"),
                                                   "rejected": assistant("b")}, "not messages prompt", "prompt", PY),
    ("message content int", "conversational", {"prompt": user(3), "chosen": assistant("a"), "rejected": assistant("b")},
     "not messages prompt", "prompt", PY),
    ("text among messages", "conversational", {"prompt": user("q"), "chosen": " a", "rejected": assistant("b")},
     "not messages chosen", "chosen", PY),
    ("empty assistant turn", "conversational", {"prompt": user("q"), "chosen": assistant(""),
                                                "rejected": assistant("b")}, "empty chosen", "chosen", TYPED),
    ("response messages None", "conversational", {"prompt": user("q"), "chosen": None, "rejected": assistant("b")},
     "missing chosen", "chosen", TYPED),
    ("assistant turn with neither content nor tool calls", "conversational",
     {"prompt": user("q"), "chosen": [{"role": "assistant"}], "rejected": assistant("b")}, "not messages chosen",
     "chosen", PY),
    ("empty content and an empty tool call list", "conversational",
     {"prompt": user("q"), "chosen": [{"role": "assistant", "content": "", "tool_calls": []}],
      "rejected": assistant("b")}, "empty chosen", "chosen", PY),
    ("tools not a list", "conversational", {"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b"),
                                            "tools": "get_weather"}, "not a list tools", "tools", TYPED),
    ("template arguments not an object", "conversational",
     {"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b"),
      "chat_template_kwargs": ["enable_thinking"]}, "not template arguments chat_template_kwargs",
     "chat_template_kwargs", PY),
    ("template arguments set add_generation_prompt", "conversational",
     {"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b"),
      "chat_template_kwargs": {"add_generation_prompt": True}}, "not template arguments chat_template_kwargs",
     "chat_template_kwargs", PY),
    # Issue 29's tester: each of these stopped the run with an error from transformers, jinja or json, no row named.
    *[(f"template arguments set {key}", "conversational",
       {"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b"), "chat_template_kwargs": {key: value}},
       "not template arguments chat_template_kwargs", "chat_template_kwargs", PY)
      for key, value in [("messages", []), ("return_assistant_tokens_mask", True), ("chat_template", "x"),
                         ("tools", [{"type": "function", "function": {"name": "f"}}])]],
    ("tools a list of names", "conversational", {"prompt": user("q"), "chosen": assistant("a"),
                                                 "rejected": assistant("b"), "tools": ["get_weather"]},
     "not tool schemas tools", "tools", TYPED),
    ("tools [null]", "conversational", {"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b"),
                                        "tools": [None]}, "not tool schemas tools", "tools", TYPED),
    ("OpenAI's custom tool call", "conversational",
     {"prompt": user("q"), "chosen": [{"role": "assistant", "tool_calls": [
         {"id": "c1", "type": "custom", "custom": {"name": "grep", "input": "foo"}}]}], "rejected": assistant("b")},
     "not tool calls chosen", "chosen", TYPED),
    ("tool calls [null]", "conversational", {"prompt": user("q"), "chosen": [{"role": "assistant", "tool_calls": [None]}],
                                             "rejected": assistant("b")}, "not tool calls chosen", "chosen", TYPED),
]

# (name, source builder or rows, kinds, error pattern)
ERRORS = [
    ("no rows", [], ("list", "dict", "jsonl", "json", "csv"), r"the train dataset is empty"),
    ("no chosen column", [{"prompt": "p", "answer": " a", "rejected": " b"}] * 2, ALL,
     r"train data has columns \[.*'answer'.*\]; expected 'chosen' and 'rejected'.*--data.chosen_column|"
     r"expected 'chosen' and 'rejected'"),
    ("prompt messages, text responses", [{"prompt": user("q"), "chosen": " a", "rejected": " b"}] * 2, TYPED,
     r"'prompt' holds messages but 'chosen' holds text.*\[\{'role': 'assistant'"),
    ("conversations, no chat template", CHAT, TYPED, r"the tokenizer has no chat_template.*tokenizer.chat_template"),
    ("int column", [{"prompt": "p", "chosen": 1, "rejected": " b"}, {"prompt": "q", "chosen": 2, "rejected": " c"}],
     ("dataset", "parquet"), r"every train row: field 'chosen' \(column 'chosen'\) holds .*int64.*not text: cast it"),
    ("unpaired KTO rows", [{"prompt": "p", "completion": " a", "label": True},
                           {"prompt": "q", "completion": " b", "label": False}], ALL,
     r"holds unpaired preference rows \(prompt, completion, label: TRL's KTO format\), not preference pairs"),
    ("prompt-completion rows", [{"prompt": "p", "completion": " a"}] * 2, ALL,
     r"holds prompt-completion rows \(supervised fine-tuning\), not preference pairs"),
    ("an images column", [{"prompt": "p", "chosen": " a", "rejected": " b", "images": ["cat.png"]}] * 2, TYPED,
     r"has 'images': images cannot be trained here"),
    # Told to `cast_column(..., Value('string'))`, which cannot work on a struct.
    ("ShareGPT responses", [{"prompt": "p", "chosen": {"from": "gpt", "value": "a"},
                             "rejected": {"from": "gpt", "value": "b"}}] * 2, ("dataset", "parquet"),
     r"field 'chosen' \(column 'chosen'\) holds ShareGPT-style messages \{'from', 'value'\}.*'role'.*--data.transform"),
]


def write(kind: str, rows: list, tmp_path) -> object:
    """`rows` as a source of `kind`; the string "{not json" stands for a line that does not parse."""
    def line(row):
        return row if row == "{not json" else json.dumps(row)

    dicts = [r for r in rows if isinstance(r, dict)]
    keys = list(dict.fromkeys(k for r in dicts for k in r))
    if kind == "list":
        return rows
    if kind == "dict":
        return {k: [r.get(k) for r in rows] for k in keys}
    if kind in ("dataset", "parquet"):
        data = Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])
        if kind == "dataset":
            return data
        data.to_parquet(tmp_path / "rows.parquet")
        return str(tmp_path / "rows.parquet")
    if kind == "jsonl":
        (tmp_path / "rows.jsonl").write_text("".join(line(r) + "\n" for r in rows))
        return str(tmp_path / "rows.jsonl")
    if kind == "json":
        (tmp_path / "rows.json").write_text(json.dumps(rows))
        return str(tmp_path / "rows.json")
    if kind == "csv":
        with open(tmp_path / "rows.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows({k: "" if r.get(k) is None else r[k] for k in keys} for r in rows)
        return str(tmp_path / "rows.csv")
    for part, chunk in enumerate((rows[:2], rows[2:])):  # a glob of two files: row 2 opens the second
        (tmp_path / f"part{part}.jsonl").write_text("".join(line(r) + "\n" for r in chunk))
    return str(tmp_path / "part*.jsonl")


def data_module(source, fmt: str, **kwargs) -> PreferenceDataModule:
    tokenizer = ascii_tokenizer()
    if kwargs.pop("chat_template", True) and fmt == "conversational":
        tokenizer.chat_template = CHAT_TEMPLATE
    return PreferenceDataModule(dataset=source, tokenizer=tokenizer, max_length=64, max_prompt_length=32, **kwargs)


def test_the_catalogue_holds_at_least_30_malformed_inputs():
    assert len(DROPS) + len(ERRORS) >= 30


@pytest.mark.parametrize("case", DROPS, ids=[c[0] for c in DROPS])
def test_a_bad_row_is_dropped_and_counted_and_strict_names_it(case, tmp_path):
    name, fmt, bad, reason, field, kinds = case
    good = GOOD[fmt]
    rows = [*good[:2], bad, good[2]]
    for kind in kinds:
        folder = tmp_path / kind
        folder.mkdir()
        dm = data_module(write(kind, rows, folder), fmt)
        dm.setup("fit")
        assert dm.summary["train"]["dropped"] == {reason: 1}, kind
        assert dm.summary["train"]["rows"] == 4 and dm.summary["train"]["kept"] == 3, kind
        kept = dm.train_data
        assert kept["row_id"] == [0, 1, 3], kind
        eos = [] if fmt == "conversational" else [EOS]
        for row, (prompt, chosen, rejected) in zip(kept, TEXTS[fmt]):  # the good rows, token for token
            assert row["prompt_input_ids"] == ids(prompt), kind
            assert row["chosen_input_ids"] == ids(chosen) + eos and row["rejected_input_ids"] == ids(rejected) + eos
        where = f"field '{field}': " if field else ""
        with pytest.raises(ValueError, match=rf"^train row {BAD}: {where}{reason}; .+strict: false"):
            data_module(write(kind, rows, folder), fmt, strict=True).setup("fit")


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_a_bad_source_raises_our_error(case, tmp_path):
    name, rows, kinds, pattern = case
    fmt = "conversational" if rows and isinstance(rows[0].get("chosen"), list) else "explicit"
    for kind in kinds:
        folder = tmp_path / kind
        folder.mkdir()
        with pytest.raises(ValueError, match=pattern) as error:
            template = name != "conversations, no chat template"
            data_module(write(kind, rows, folder), fmt, chat_template=template).setup("fit")
        assert "/dpo_lightning/" in traceback.extract_tb(error.tb)[-1].filename, kind  # raised by our code


@pytest.mark.parametrize("kind", ["dict"])
def test_columns_of_unequal_length_are_named(kind):
    with pytest.raises(ValueError, match=r"one list per column, all of one length; got \{'prompt': 2, 'chosen': 1"):
        data_module({"prompt": ["p", "q"], "chosen": [" a"], "rejected": [" b", " c"]}, "explicit").setup("fit")


def test_a_json_file_that_does_not_parse_is_named(tmp_path):
    (tmp_path / "rows.json").write_text('[{"prompt": "p", "chosen": " a", "rejected": " b"},')
    with pytest.raises(ValueError, match=r"train data .*rows.json: not valid JSON .*fix the file"):
        data_module(str(tmp_path / "rows.json"), "explicit").setup("fit")


def test_a_glob_that_matches_nothing_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found: .*nothing\*.jsonl \(working directory"):
        data_module(str(tmp_path / "nothing*.jsonl"), "explicit").setup("fit")


@pytest.mark.parametrize("kind", ALL)
def test_text_that_looks_like_a_number_or_null_stays_text(kind, tmp_path):
    rows = [{"prompt": "NA", "chosen": "1.5", "rejected": "null"}, *EXPLICIT]
    dm = data_module(write(kind, rows, tmp_path), "explicit")
    dm.setup("fit")
    assert dm.summary["train"]["dropped"] == {}
    assert dm.train_data[0]["prompt_input_ids"] == ids("NA") and dm.train_data[0]["chosen_input_ids"] == ids("1.5") + [EOS]


# --- Issue 19's defects, each through every source kind it applies to (each failed before its fix). ---

FILES = ("jsonl", "json", "parquet", "csv", "glob")
QUESTIONS = [{"question": f"Q{i}?", "chosen": f"It is {i} yes", "rejected": f"It is {i} no"} for i in range(4)]


def setup_rows(source, **kwargs) -> list[dict]:
    dm = data_module(source, "explicit", **kwargs)
    dm.setup("fit")
    return list(dm.train_data)


@pytest.mark.parametrize("kind", ALL)
def test_a_mapped_prompt_column_is_the_prompt_for_every_source(kind, tmp_path):
    # Defect 1: .json/.jsonl lost the mapping and trained on the answers' shared prefix "It is" instead.
    kept = setup_rows(write(kind, QUESTIONS, tmp_path), prompt_column="question")
    assert [row["prompt_input_ids"] for row in kept] == [ids(row["question"]) for row in QUESTIONS], kind
    assert [row["chosen_input_ids"] for row in kept] == [ids(row["chosen"]) + [EOS] for row in QUESTIONS], kind


@pytest.mark.parametrize("kind", ALL)
def test_every_mapped_column_is_read_for_every_source(kind, tmp_path):
    rows = [{"q": f"p{i}", "good": f" a{i}", "bad": f" b{i}"} for i in range(3)]
    kept = setup_rows(write(kind, rows, tmp_path), prompt_column="q", chosen_column="good", rejected_column="bad")
    assert [(r["prompt_input_ids"], r["chosen_input_ids"], r["rejected_input_ids"]) for r in kept] == [
        (ids(r["q"]), ids(r["good"]) + [EOS], ids(r["bad"]) + [EOS]) for r in rows], kind


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("field, column", [("prompt", "question_text"), ("chosen", "answer")])
def test_a_missing_mapped_column_is_named_by_its_mapped_name(kind, field, column, tmp_path):
    # Defect 2: reported as "expected 'chosen' and 'rejected'" (a missing prompt: silently no prompt at all).
    with pytest.raises(ValueError, match=rf"no column '{column}' \(--data.{field}_column\); its columns are "
                                         r"\['chosen', 'prompt', 'rejected'\]") as error:
        setup_rows(write(kind, EXPLICIT, tmp_path), **{f"{field}_column": column})
    assert "/dpo_lightning/" in traceback.extract_tb(error.tb)[-1].filename, kind


@pytest.mark.parametrize("kind", ALL)
def test_special_token_text_in_a_field_stays_text(kind, tmp_path):
    # Defect 3: "</s>" quoted in a response became the EOS id mid-response; "<s>" in a prompt became BOS.
    rows = [*EXPLICIT, {"prompt": "<s>What ends a turn?", "chosen": " it is </s> here", "rejected": " <unk>"}]
    kept = setup_rows(write(kind, rows, tmp_path))
    assert kept[3]["prompt_input_ids"] == ids("<s>What ends a turn?"), kind
    assert kept[3]["chosen_input_ids"] == ids(" it is </s> here") + [EOS], kind  # one EOS, at the end
    assert kept[3]["rejected_input_ids"] == ids(" <unk>") + [EOS], kind


@pytest.mark.parametrize("kind", ("jsonl", "json", "csv", "glob"))
def test_a_utf8_byte_order_mark_is_not_part_of_the_data(kind, tmp_path):
    # Defect 4: .jsonl lost row 0 as "not valid JSON", .json dropped every row, .csv died inside datasets.
    source = write(kind, EXPLICIT, tmp_path)
    for path in tmp_path.glob("*.*"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    kept = setup_rows(source)
    assert [row["prompt_input_ids"] for row in kept] == [ids(row["prompt"]) for row in EXPLICIT], kind


@pytest.mark.parametrize("kind", ("jsonl", "json", "parquet", "csv", "glob"))
def test_a_file_rewritten_with_its_old_time_is_read_again(kind, tmp_path):
    # Defect 5: datasets' cache is keyed by path and modification time; `cp -p`/`rsync -t` put the time back.
    source = write(kind, EXPLICIT, tmp_path)
    first = setup_rows(source)
    times = {path: os.stat(path) for path in tmp_path.glob("*.*")}
    new = [{**row, "chosen": row["chosen"].replace("a", "c")} for row in EXPLICIT]  # same sizes, new text
    write(kind, new, tmp_path)
    for path, stat in times.items():
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert os.stat(path).st_mtime_ns == stat.st_mtime_ns and os.stat(path).st_size == stat.st_size
    second = setup_rows(source)
    assert [row["chosen_input_ids"] for row in first] == [ids(row["chosen"]) + [EOS] for row in EXPLICIT], kind
    assert [row["chosen_input_ids"] for row in second] == [ids(row["chosen"]) + [EOS] for row in new], kind


@pytest.mark.parametrize("kind", ALL)
def test_eval_split_on_a_single_split_source_is_refused(kind, tmp_path):
    # Defect 6: `eval_split: test` on one file validated on the training rows, silently.
    with pytest.raises(ValueError, match=r"--data.eval_split 'test': the dataset is one split .*--data.eval_dataset"):
        setup_rows(write(kind, EXPLICIT, tmp_path), eval_split="test")


def test_a_template_that_fails_on_a_row_is_a_counted_drop(tmp_path):
    # A template raising ZeroDivisionError (not jinja's TemplateError) stopped the run from inside jinja.
    rows = [*CHAT[:2], {"prompt": user("boom"), "chosen": assistant("a"), "rejected": assistant("b")}, CHAT[2]]
    tokenizer = ascii_tokenizer()
    tokenizer.chat_template = "{% if messages[0]['content'] == 'boom' %}{{ 1 / 0 }}{% endif %}" + CHAT_TEMPLATE
    dm = PreferenceDataModule(dataset=rows, tokenizer=tokenizer, max_length=64, max_prompt_length=32)
    dm.setup("fit")
    assert dm.summary["train"]["dropped"] == {"chat template error": 1}
    assert [row["prompt_input_ids"] for row in dm.train_data] == [ids(text[0]) for text in TEXTS["conversational"]]


@pytest.mark.parametrize("key, value", [("messages", []), ("return_assistant_tokens_mask", True),
                                        ("chat_template", "x"), ("tools", [])])
def test_run_wide_template_arguments_that_apply_chat_template_sets_itself_are_named(key, value):
    # Run-wide {"messages": []} stopped the run with jinja's "got multiple values for keyword argument 'messages'".
    with pytest.raises(ValueError, match=rf"--data.chat_template_kwargs .* sets \['{key}'\], which the data rules"):
        data_module(CHAT, "conversational", chat_template_kwargs={key: value})


@pytest.mark.parametrize("streaming", [True, False])
def test_a_stream_with_no_usable_row_stops_with_the_drop_reasons(streaming, tmp_path):
    # Streamed, every row dropped (chosen == rejected): `fit` spun at full CPU over empty epochs until killed, its one
    # message Lightning's "Total length of `list` across ranks is zero".
    rows = [{"prompt": f"p{i}", "chosen": " same", "rejected": " same"} for i in range(20)]
    dm = data_module(write("jsonl", rows, tmp_path), "explicit", streaming=streaming)
    with pytest.raises(ValueError, match=r"no usable train rows.*chosen == rejected: 20"):
        dm.setup("fit")


def test_fit_on_a_stream_with_no_usable_row_stops_with_our_error(tiny_llama, tmp_path):
    # The configuration users have: `dpo-lightning fit --data.streaming true`, in a process of its own (before the
    # fix it never ended: the timeout fails the test).
    rows = [{"prompt": f"p{i}", "chosen": " same", "rejected": " same"} for i in range(20)]
    done = subprocess.run([sys.executable, "-m", "dpo_lightning.cli", "fit", "--model.model_name_or_path", tiny_llama,
                           "--data.dataset", write("jsonl", rows, tmp_path), "--data.streaming", "true",
                           "--data.max_length", "64", "--data.max_prompt_length", "32", "--trainer.max_steps", "2",
                           "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                           "--trainer.enable_checkpointing", "false", f"--trainer.default_root_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode != 0
    assert "dpo-lightning: no usable train rows in the stream" in done.stderr and "chosen == rejected: 20" in done.stderr
    assert "Traceback" not in done.stderr  # our own error: one line
