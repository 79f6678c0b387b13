"""The public preference sets, zero-config: local replicas written from their dataset cards, loaded from
nothing but their path, every kept row's ids checked against an oracle written here.

Each replica has the set's exact column names and nested types (parquet or JSON lines, as the hub stores
it) and a few rows, awkward ones included: ties, multi-turn conversations, system messages, an empty
assistant turn, chosen == rejected. The tokenizer is `conftest.ascii_tokenizer` (one token per
character, BOS added) with a small Zephyr-style chat template; `chat_ids` renders and tokenizes that
template by hand, so the oracle calls neither Jinja nor the package. Each replica also goes through
the CLI once (`dpo-lightning inspect-data`), and one through `dpo-lightning fit` with a tiny Llama. The
`transform` hook (a Python callable, or an import path from YAML) and the guards against rules the
columns contradict are tested last. No network.
"""

import gzip
import json
import shutil
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BOS, EOS, ascii_tokenizer, ids

from dpo_lightning.cli.main import cli_main, main
from dpo_lightning.data import PreferenceDataModule

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))  # as the cards list them


def chat_tokenizer(template: bool = True):
    tokenizer = ascii_tokenizer(add_bos=True)
    tokenizer.chat_template = CHAT_TEMPLATE if template else None
    return tokenizer


def chat_ids(messages: list[dict], generation: bool = False) -> list[int]:
    """CHAT_TEMPLATE rendered and tokenized by hand: BOS, each message's "<|role|>\\ncontent</s>\\n", the
    generation prompt "<|assistant|>\\n"; the markers <s> and </s> are the BOS and EOS tokens."""
    out = [BOS]
    for m in messages:
        out += ids(f"<|{m['role']}|>\n{m['content']}") + [EOS] + ids("\n")
    return out + (ids("<|assistant|>\n") if generation else [])


def say(role, text):
    return {"content": text, "role": role}


def chat_pair(prompt: list[dict], chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    """The oracle for a conversation: the prompt with the generation prompt, each answer as the rest of the
    whole conversation's rendering (its text, the end-of-turn </s>, the newline)."""
    head = chat_ids(prompt, generation=True)
    return head, *(chat_ids([*prompt, say("assistant", answer)])[len(head):] for answer in (chosen, rejected))


def text_pair(prompt: str, chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    """The oracle for text fields: BOS + the prompt's characters, each response's characters + EOS."""
    return [BOS, *ids(prompt)], ids(chosen) + [EOS], ids(rejected) + [EOS]


def write_parquet(path, columns: dict, types: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=pa.schema(list(types.items()))), path)
    return path


def write_jsonl(path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


# --- The replicas: (file, kept rows' oracle ids by row, drops by reason, the schema named in the summary). ---

UNIQUE, IGNORED = "", "whole conversations + text prompt (text prompt ignored)"


def ultrafeedback(tmp):
    """HuggingFaceH4/ultrafeedback_binarized, split train_prefs: a text prompt beside whole conversations."""
    q = [say("user", "What is 2+2?")]
    multi = [say("user", "Hi"), say("assistant", "Hello!"), say("user", "Name a color")]
    chosen = [[*q, say("assistant", "4")], [*q, say("assistant", "Same")], [*q, say("assistant", "")],
              [*multi, say("assistant", "Blue")]]
    rejected = [[*q, say("assistant", "5")], [*q, say("assistant", "Same")], [*q, say("assistant", "22")],
                [*multi, say("assistant", "Loud")]]
    path = write_parquet(tmp / "data" / "train_prefs-00000-of-00001.parquet", {
        "prompt": ["What is 2+2?"] * 3 + ["Name a color"], "prompt_id": ["a", "b", "c", "d"],
        "chosen": chosen, "rejected": rejected, "messages": chosen,
        "score_chosen": [8.0, 5.0, 1.0, 9.0], "score_rejected": [3.0, 5.0, 4.0, 2.0]},
        {"prompt": pa.string(), "prompt_id": pa.string(), "chosen": MESSAGES, "rejected": MESSAGES,
         "messages": MESSAGES, "score_chosen": pa.float64(), "score_rejected": pa.float64()})
    kept = {0: chat_pair(q, "4", "5"), 3: chat_pair(multi, "Blue", "Loud")}
    return path, kept, {"chosen == rejected": 1, "empty chosen": 1}, IGNORED


def tulu3(tmp):
    """allenai/llama-3.1-tulu-3-8b-preference-mixture: id, prompt, chosen, rejected, source; system messages."""
    system = [say("system", "Answer in one word."), say("user", "Sky color?")]
    plain = [say("user", "Capital of France?")]
    path = write_parquet(tmp / "data" / "train-00000-of-00004.parquet", {
        "id": ["x1", "x2"], "prompt": ["Sky color?", "Capital of France?"],
        "chosen": [[*system, say("assistant", "Blue")], [*plain, say("assistant", "Paris")]],
        "rejected": [[*system, say("assistant", "It is blue")], [*plain, say("assistant", "Lyon")]],
        "source": ["ai2-adapt-dev/if", "ai2-adapt-dev/ultrafeedback"]},
        {"id": pa.string(), "prompt": pa.string(), "chosen": MESSAGES, "rejected": MESSAGES, "source": pa.string()})
    return path, {0: chat_pair(system, "Blue", "It is blue"), 1: chat_pair(plain, "Paris", "Lyon")}, {}, IGNORED


def capybara(tmp):
    """argilla/distilabel-capybara-dpo-7k-binarized: multi-turn conversations, ratings and models."""
    turns = [say("user", "Plan a trip"), say("assistant", "Where to?"), say("user", "Rome")]
    other = [say("user", "Plan a trip"), say("assistant", "Sure."), say("user", "Rome")]  # leading turns differ
    path = write_parquet(tmp / "data" / "train-00000-of-00001.parquet", {
        "source": ["Airoboros", "Dove"], "prompt": ["Plan a trip", "Plan a trip"],
        "chosen": [[*turns, say("assistant", "See the Forum")], [*turns, say("assistant", "Go")]],
        "chosen_rating": [5, 4], "chosen_model": ["gpt-4", "gpt-4"],
        "rejected": [[*turns, say("assistant", "No")], [*other, say("assistant", "Stay")]],
        "rejected_rating": [1, 2], "rejected_model": ["mistral", "mistral"]},
        {"source": pa.string(), "prompt": pa.string(), "chosen": MESSAGES, "chosen_rating": pa.int64(),
         "chosen_model": pa.string(), "rejected": MESSAGES, "rejected_rating": pa.int64(),
         "rejected_model": pa.string()})
    return path, {0: chat_pair(turns, "See the Forum", "No")}, {"prompts differ": 1}, IGNORED


def orpo_mix(tmp):
    """mlabonne/orpo-dpo-mix-40k: source, chosen, rejected, prompt, question (text beside conversations)."""
    system = [say("system", "You are terse."), say("user", "2*3?")]
    path = write_parquet(tmp / "data" / "train-00000-of-00001.parquet", {
        "source": ["Intel/orca_dpo_pairs", "argilla/ultrafeedback"],
        "chosen": [[*system, say("assistant", "6")], [say("user", "Hi"), say("assistant", "Hey")]],
        "rejected": [[*system, say("assistant", "5")], [say("user", "Hi"), say("assistant", "Hey")]],
        "prompt": ["2*3?", "Hi"], "question": ["2*3?", "Hi"]},
        {"source": pa.string(), "chosen": MESSAGES, "rejected": MESSAGES, "prompt": pa.string(),
         "question": pa.string()})
    return path, {0: chat_pair(system, "6", "5")}, {"chosen == rejected": 1}, IGNORED


ORCA = [{"system": "You are an AI assistant.", "question": "What is the capital of Australia?",
         "chosen": "The capital of Australia is Canberra.", "rejected": "The capital of Australia is Sydney."},
        {"system": "", "question": "Translate 'chat'.", "chosen": "cat", "rejected": "chat"},
        {"system": "", "question": "Say yes.", "chosen": "yes", "rejected": "yes"}]


def orca(tmp):
    """Intel/orca_dpo_pairs (orca_rlhf.jsonl): system, question, chosen, rejected, all text."""
    path = write_jsonl(tmp / "orca_rlhf.jsonl", ORCA)
    first = [say("system", ORCA[0]["system"]), say("user", ORCA[0]["question"])]
    kept = {0: chat_pair(first, ORCA[0]["chosen"], ORCA[0]["rejected"]),
            1: chat_pair([say("user", "Translate 'chat'.")], "cat", "chat")}  # an empty system: no message
    return path, kept, {"chosen == rejected": 1}, "system + question + answers (orca_dpo_pairs)"


def shp(tmp):
    """stanfordnlp/SHP (askculinary/train.json, JSON lines): labels 1 prefers human_ref_A, 0 human_ref_B."""
    base = {"post_id": "p", "domain": "askculinary_train", "upvote_ratio": 0.9, "c_root_id_A": "a",
            "c_root_id_B": "b", "created_at_utc_A": 1, "created_at_utc_B": 2, "seconds_difference": 1.0}
    rows = [{**base, "history": "Why rest dough?", "human_ref_A": "Gluten relaxes.", "human_ref_B": "No idea.",
             "labels": 1, "score_A": 40, "score_B": 3, "score_ratio": 13.3},
            {**base, "history": "Salt pasta water?", "human_ref_A": "Never.", "human_ref_B": "Yes, generously.",
             "labels": 0, "score_A": 2, "score_B": 30, "score_ratio": 15.0}]
    path = write_jsonl(tmp / "askculinary" / "train.json", rows)
    kept = {0: text_pair("Why rest dough?", "Gluten relaxes.", "No idea."),
            1: text_pair("Salt pasta water?", "Yes, generously.", "Never.")}  # inverted before: labels == 0
    return path, kept, {}, "SHP (prompt = history, chosen = the comment labels prefers)"


def helpsteer3(tmp):
    """nvidia/HelpSteer3 preference (preference/train.jsonl.gz): context messages, response1/2, a score."""
    one, multi = [say("user", "Fix: prin('x')")], [say("user", "Hi"), say("assistant", "Hello"), say("user", "Joke?")]
    judge = [{"score": -2, "reasoning": "r", "feedback1": "f", "feedback2": "g"}]
    rows = [{"domain": "code", "language": "python", "context": one, "response1": "print('x')",
             "response2": "prin('x')", "overall_preference": -2, "individual_preference": judge},
            {"domain": "general", "language": "english", "context": multi, "response1": "No.",
             "response2": "Why did the chicken...", "overall_preference": 3, "individual_preference": judge},
            {"domain": "general", "language": "english", "context": one, "response1": "a", "response2": "b",
             "overall_preference": 0, "individual_preference": judge}]
    path = write_jsonl(tmp / "preference" / "train.jsonl.gz", rows)
    kept = {0: chat_pair(one, "print('x')", "prin('x')"), 1: chat_pair(multi, "Why did the chicken...", "No.")}
    return path, kept, {"tie": 1}, "HelpSteer3 preference (chosen by overall_preference, ties dropped)"


def openai(tmp):
    """OpenAI preference fine-tuning JSONL: input {messages, tools, parallel_tool_calls}, the two outputs."""
    system = [say("system", "Be brief."), say("user", "How cold is SF?")]
    rows = [{"input": {"messages": [{"role": m["role"], "content": m["content"]} for m in system], "tools": [],
                       "parallel_tool_calls": True},
             "preferred_output": [{"role": "assistant", "content": "About 15C."}],
             "non_preferred_output": [{"role": "assistant", "content": "Cold."}]},
            {"input": {"messages": [{"role": "user", "content": "Hi"}], "tools": [], "parallel_tool_calls": True},
             "preferred_output": [{"role": "assistant", "content": ""}],
             "non_preferred_output": [{"role": "assistant", "content": "Hi!"}]}]
    path = write_jsonl(tmp / "preference.jsonl", rows)
    return path, {0: chat_pair(system, "About 15C.", "Cold.")}, {"empty chosen": 1}, \
        "OpenAI preference JSONL (prompt = input.messages)"


REPLICAS = [ultrafeedback, tulu3, capybara, orpo_mix, orca, shp, helpsteer3, openai]


def check(dm: PreferenceDataModule, kept: dict, dropped: dict, schema: str):
    summary = dm.summary["train"]
    assert summary["dropped"] == dropped and summary["kept"] == len(kept)
    assert summary["schema"] == schema if schema else summary["schema"]
    rows = list(dm.train_data)
    assert [row["row_id"] for row in rows] == sorted(kept)
    for row in rows:
        assert (row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]) == kept[row["row_id"]]


@pytest.mark.parametrize("replica", REPLICAS, ids=[r.__name__ for r in REPLICAS])
def test_a_public_set_trains_zero_config_with_the_ids_users_expect(replica, tmp_path):
    path, kept, dropped, schema = replica(tmp_path)
    dm = PreferenceDataModule(dataset=str(path), tokenizer=chat_tokenizer(), max_length=256, max_prompt_length=128)
    dm.setup("fit")
    check(dm, kept, dropped, schema)


def test_orca_without_a_chat_template_joins_system_and_question_as_documented(tmp_path):
    dm = PreferenceDataModule(dataset=str(write_jsonl(tmp_path / "orca_rlhf.jsonl", ORCA)),
                              tokenizer=chat_tokenizer(template=False), max_length=256, max_prompt_length=128)
    dm.setup("fit")
    first, second = ORCA[0], ORCA[1]
    check(dm, {0: text_pair(f"{first['system']}\n\n{first['question']}\n\n", first["chosen"], first["rejected"]),
               1: text_pair(f"{second['question']}\n\n", "cat", "chat")}, {"chosen == rejected": 1},
          "system + question + answers (orca_dpo_pairs)")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_llama):
    """`tiny_llama` with CHAT_TEMPLATE in its tokenizer: a chat model as a user's hub folder would be."""
    path = tmp_path_factory.mktemp("chat_llama")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    chat_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("replica", REPLICAS, ids=[r.__name__ for r in REPLICAS])
def test_a_public_set_loads_through_the_cli(replica, tmp_path, chat_model, capsys):
    path, kept, dropped, schema = replica(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  model_name_or_path: {chat_model}\ndata:\n  dataset: {path}\n"
                      "  max_length: 256\n  max_prompt_length: 128\n")
    main(["inspect-data", "--config", str(config), "--rows", "1"])
    out = capsys.readouterr().out
    assert f"train: {sum(dropped.values()) + len(kept)} rows, {len(kept)} kept" in out
    assert f"schema: {schema}" in out if schema else "schema: " in out


def to_pair(row: dict) -> dict | None:
    """A user's transform for the YAML test: rows of {instruction, good, bad}; a row without `good`: dropped."""
    if not row.get("good"):
        return None
    return {"prompt": row["instruction"], "chosen": row["good"], "rejected": row["bad"]}


ODD_ROWS = [{"instruction": "Q0", "good": " yes", "bad": " no"}, {"instruction": "Q1", "good": "", "bad": " no"},
            {"instruction": "Q2", "good": " sure", "bad": " nah"}]


@pytest.mark.parametrize("kind", ["list", "jsonl", "parquet"])
def test_a_python_transform_maps_each_raw_row_and_none_is_a_counted_drop(kind, tmp_path):
    source = {"list": ODD_ROWS, "jsonl": str(write_jsonl(tmp_path / "odd.jsonl", ODD_ROWS))}.get(kind)
    if source is None:
        columns = {key: [row[key] for row in ODD_ROWS] for key in ODD_ROWS[0]}
        source = str(write_parquet(tmp_path / "odd.parquet", columns, {key: pa.string() for key in columns}))
    dm = PreferenceDataModule(dataset=source, tokenizer=chat_tokenizer(), max_length=64, max_prompt_length=32,
                              transform=to_pair)
    dm.setup("fit")
    check(dm, {0: text_pair("Q0", " yes", " no"), 2: text_pair("Q2", " sure", " nah")},
          {"dropped by transform": 1}, "explicit (prompt, chosen, rejected)")


def test_a_transform_by_import_path_from_yaml_trains_through_dpo_lightning_fit(tmp_path, chat_model, monkeypatch):
    (tmp_path / "my_rows.py").write_text(textwrap.dedent('''
        def to_pair(row):
            if not row.get("good"):
                return None
            return {"prompt": row["instruction"], "chosen": row["good"], "rejected": row["bad"]}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "odd.jsonl", ODD_ROWS * 2)
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  model_name_or_path: {chat_model}\ndata:\n  dataset: {data}\n"
                      "  transform: my_rows.to_pair\n  max_length: 64\n  max_prompt_length: 32\n  batch_size: 2\n"
                      "trainer:\n  max_steps: 1\n  accelerator: cpu\n  logger: false\n  enable_checkpointing: false\n"
                      f"  enable_progress_bar: false\n  default_root_dir: {tmp_path}\n  callbacks: []\n")
    cli = cli_main(["fit", "--config", str(config)])
    assert cli.trainer.global_step == 1
    assert cli.datamodule.summary["train"]["dropped"] == {"dropped by transform": 2}
    assert cli.datamodule.train_data[0]["prompt_input_ids"] == [BOS, *ids("Q0")]


def test_an_unimportable_transform_names_the_setting(tmp_path):
    dm = PreferenceDataModule(dataset=ODD_ROWS, tokenizer=chat_tokenizer(), transform="no_such_module.to_pair")
    with pytest.raises(ValueError, match=r"--data.transform 'no_such_module.to_pair': no function at that import"):
        dm.setup("fit")


def test_text_columns_beside_a_missing_prompt_warn(tmp_path):
    rows = [{"instruction": f"Q{i}", "chosen": f"It is {i} yes", "rejected": f"It is {i} no"} for i in range(3)]
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer(), max_length=64, max_prompt_length=32)
    with pytest.warns(UserWarning, match=r"no 'prompt' column but text columns \['instruction'\].*prompt_column"):
        dm.setup("fit")


def test_shp_columns_mapped_by_hand_are_refused_not_trained_inverted(tmp_path):
    path, *_ = shp(tmp_path)
    dm = PreferenceDataModule(dataset=str(path), tokenizer=chat_tokenizer(), prompt_column="history",
                              chosen_column="human_ref_A", rejected_column="human_ref_B")
    with pytest.raises(ValueError, match=r"SHP's columns .*inverted pairs on every labels == 0 row"):
        dm.setup("fit")


def test_text_prompt_beside_answer_only_messages_is_not_silently_ignored():
    rows = [{"prompt": "Q", "chosen": [say("assistant", "a")], "rejected": [say("assistant", "b")]}] * 2
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer())
    with pytest.raises(ValueError, match=r"'prompt' holds text but 'chosen' holds messages"):
        dm.setup("fit")


def test_a_schema_drop_under_strict_names_the_row_the_column_and_the_fix(tmp_path):
    path, *_ = helpsteer3(tmp_path)
    dm = PreferenceDataModule(dataset=str(path), tokenizer=chat_tokenizer(), strict=True)
    with pytest.raises(ValueError, match=r"^train row 2: field 'overall_preference': tie; nothing: a tie"):
        dm.setup("fit")
    dm = PreferenceDataModule(dataset=ODD_ROWS, tokenizer=chat_tokenizer(), transform=to_pair, strict=True)
    with pytest.raises(ValueError, match=r"^train row 1: dropped by transform; nothing, if --data.transform"):
        dm.setup("fit")


def test_shp_labels_other_than_0_or_1_are_counted_drops(tmp_path):
    path, *_ = shp(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["labels"] = 2
    write_jsonl(path, rows)
    dm = PreferenceDataModule(dataset=str(path), tokenizer=chat_tokenizer(), max_length=256, max_prompt_length=128)
    dm.setup("fit")
    check(dm, {0: text_pair("Why rest dough?", "Gluten relaxes.", "No idea.")}, {"not 0 or 1 labels": 1},
          "SHP (prompt = history, chosen = the comment labels prefers)")
