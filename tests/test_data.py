"""Tokenization rules, batch layout and row checks of `dpo_lightning.data`, token by token.

The tokenizer is `conftest.ascii_tokenizer`: one token per character with id = its ASCII code, EOS = 2,
BOS = 1, so every expected id list is written out from the rules, not read off the code's output.
Data files are written to temp folders; nothing touches the network.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import BOS, EOS, ascii_tokenizer, ids, rows
from datasets import Dataset

from dpo_lightning.data import (
    PreferenceDataModule, adds_bos, check_row, collate_pairs, load_rows, split_dialogue, tokenize_row,
)

HH_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-1500.jsonl.gz"


def tokenize(row, add_bos=False, max_length=64, max_prompt_length=32, truncation_mode="keep_end"):
    tokenizer = ascii_tokenizer(add_bos)
    return tokenize_row(row, tokenizer, adds_bos(tokenizer), max_length, max_prompt_length, truncation_mode)


def test_prompt_and_responses_are_tokenized_separately_with_eos():
    out = tokenize({"prompt": "Hi", "chosen": " yo", "rejected": " no!"})
    assert out == {"prompt_input_ids": ids("Hi"), "chosen_input_ids": ids(" yo") + [EOS],
                   "rejected_input_ids": ids(" no!") + [EOS]}


def test_one_bos_where_the_tokenizer_uses_one():
    assert tokenize({"prompt": "Hi", "chosen": " a", "rejected": " b"}, add_bos=True)["prompt_input_ids"] == [
        BOS, *ids("Hi")]
    # A prompt whose text already starts with BOS keeps one, not two.
    assert tokenize({"prompt": "<s>Hi", "chosen": " a", "rejected": " b"}, add_bos=True)["prompt_input_ids"] == [
        BOS, *ids("Hi")]


# prompt "abcdefgh" (8 tokens), rejected " yz" + EOS (4): 12 > max_length 10, so the prompt keeps 4 tokens.
@pytest.mark.parametrize("add_bos, mode, prompt", [
    (False, "keep_end", ids("efgh")),
    (False, "keep_start", ids("abcd")),
    (True, "keep_end", [BOS, *ids("fgh")]),  # BOS counts toward max_prompt_length and stays in front
    (True, "keep_start", [BOS, *ids("abc")]),
])
def test_too_long_pair_truncates_the_prompt(add_bos, mode, prompt):
    out = tokenize({"prompt": "abcdefgh", "chosen": " x", "rejected": " yz"}, add_bos, 10, 4, mode)
    assert out["prompt_input_ids"] == prompt
    assert out["chosen_input_ids"] == ids(" x") + [EOS] and out["rejected_input_ids"] == ids(" yz") + [EOS]


def test_pair_exactly_at_max_length_is_untouched():
    # 8 + 3 == 11 and 7 + 4 == 11: nothing is cut, though each prompt is longer than max_prompt_length.
    out = tokenize({"prompt": "abcdefgh", "chosen": " x", "rejected": "yz"}, max_length=11, max_prompt_length=4)
    assert out["prompt_input_ids"] == ids("abcdefgh")
    out = tokenize({"prompt": "abcdefg", "chosen": " x", "rejected": " yz"}, max_length=11, max_prompt_length=4)
    assert out["prompt_input_ids"] == ids("abcdefg")


def test_responses_are_cut_to_the_room_left_after_the_prompt():
    # prompt -> "efgh" (4 tokens), room 10 - 4 = 6: " 12345" of " 123456789</s>", the EOS cut with it.
    out = tokenize({"prompt": "abcdefgh", "chosen": " 123456789", "rejected": " z"}, max_length=10,
                   max_prompt_length=4)
    assert out["prompt_input_ids"] == ids("efgh")
    assert out["chosen_input_ids"] == ids(" 12345")
    assert out["rejected_input_ids"] == ids(" z") + [EOS]


def test_collate_puts_chosen_rows_first_and_masks_prompt_and_padding():
    rows_ = [{"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 2], "rejected_input_ids": [8, 9, 2]},
             {"prompt_input_ids": [4], "chosen_input_ids": [3], "rejected_input_ids": [3, 3]}]
    batch = collate_pairs(rows_, pad_token_id=0)
    I = -100
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 0], [4, 3, 0, 0, 0], [5, 6, 8, 9, 2], [4, 3, 3, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[I, I, 7, 2, I], [I, 3, I, I, I], [I, I, 8, 9, 2], [I, 3, 3, I, I]]


def test_eos_is_labelled_even_when_pad_is_eos():
    # GPT-2 style: no pad token, so pad = eos = 2; the response's own EOS must still be a label.
    batch = collate_pairs([{"prompt_input_ids": [5], "chosen_input_ids": [7, EOS], "rejected_input_ids": [EOS]}],
                          pad_token_id=EOS)
    assert batch["input_ids"].tolist() == [[5, 7, EOS], [5, EOS, EOS]]
    assert batch["labels"].tolist() == [[-100, 7, EOS], [-100, EOS, -100]]


def test_split_dialogue_takes_the_prompt_through_the_last_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no"
    assert split_dialogue(chosen, rejected) == (
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:", " like this", " no")
    assert split_dialogue(chosen, "\n\nHuman: bye\n\nAssistant: no") is None


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "p", "chosen": " a", "rejected": " b"}, ""),
    ({"prompt": "p", "chosen": None, "rejected": " b"}, "missing chosen"),
    ({"prompt": "p", "chosen": " a", "rejected": "  "}, "empty rejected"),
    ({"prompt": "p", "chosen": " a", "rejected": " a"}, "chosen == rejected"),
])
def test_check_row_reasons(row, reason):
    assert check_row(row, 0, implicit_prompt=False)["drop_reason"] == reason


def test_check_row_names_row_and_field_of_a_wrong_type():
    with pytest.raises(TypeError, match=r"row 7: field 'prompt' is a list"):
        check_row({"prompt": [{"role": "user"}], "chosen": " a", "rejected": " b"}, 7, implicit_prompt=False)


def test_hh_rows_whose_prompts_differ_are_dropped_and_counted():
    data = {"chosen": ["\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: a\n\nAssistant: b"],
            "rejected": ["\n\nHuman: hi\n\nAssistant: go", "\n\nHuman: other\n\nAssistant: c"]}
    dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), max_length=64, max_prompt_length=32)
    dm.setup("fit")
    assert dm.summary["train"] == {"rows": 2, "kept": 1, "dropped": {"dialogues do not share the prompt": 1}}
    assert dm.train_data[0]["prompt_input_ids"] == ids("\n\nHuman: hi\n\nAssistant:")
    assert dm.train_data[0]["chosen_input_ids"] == ids(" hello") + [EOS]


def test_missing_column_error_names_what_was_found():
    dm = PreferenceDataModule(dataset={"prompt": ["p"], "good": [" a"], "bad": [" b"]}, tokenizer=ascii_tokenizer())
    with pytest.raises(ValueError, match=r"columns \['bad', 'good', 'prompt'\]; expected 'chosen' and 'rejected'"):
        dm.setup("fit")


def test_invalid_lengths_are_rejected_at_construction():
    with pytest.raises(ValueError, match="max_prompt_length must be in"):
        PreferenceDataModule(dataset=rows(2), max_length=8, max_prompt_length=8)


def _write(path: Path, data: dict[str, list]) -> str:
    table = Dataset.from_dict(data)
    if path.suffix == ".parquet":
        table.to_parquet(path)
    elif path.suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_list()))
    return str(path)


@pytest.mark.parametrize("kind", ["dict", "list", "dataset", "jsonl", "json", "parquet", "csv"])
def test_every_source_loads_the_same_rows(kind, tmp_path):
    data = rows(5)
    source = {"dict": data, "list": Dataset.from_dict(data).to_list(), "dataset": Dataset.from_dict(data)}.get(kind)
    if source is None:
        source = _write(tmp_path / f"rows.{kind}", data)
    assert load_rows(source).to_dict() == data


def test_hub_style_folder_with_splits_loads_by_split(tmp_path):
    # A folder of split files stands in for a hub repository: same `load_dataset(name, split=...)` call.
    (tmp_path / "hub").mkdir()
    _write(tmp_path / "hub" / "train.jsonl", rows(6))
    _write(tmp_path / "hub" / "test.jsonl", rows(2))
    dm = PreferenceDataModule(dataset=str(tmp_path / "hub"), eval_split="test", tokenizer=ascii_tokenizer(),
                              max_length=64, max_prompt_length=32, batch_size=3)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_data), len(dm.val_data)) == (6, 2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].shape == batch["input_ids"].shape


def test_tokenization_is_cached_and_reused_by_a_second_data_module(tmp_path):
    path = _write(tmp_path / "rows.jsonl", rows(8))
    built = []
    for _ in range(2):
        dm = PreferenceDataModule(dataset=path, tokenizer=ascii_tokenizer(), max_length=64, max_prompt_length=32)
        dm.prepare_data()
        dm.setup("fit")
        built.append(dm.train_data)
    # Same fingerprint and the same cache file: the second module (or DDP rank) read, not re-tokenized.
    assert built[0]._fingerprint == built[1]._fingerprint
    assert built[0].cache_files == built[1].cache_files and built[0].cache_files


def test_eval_fraction_holds_out_a_seeded_split():
    dm = PreferenceDataModule(dataset=rows(20), eval_fraction=0.25, tokenizer=ascii_tokenizer(), max_length=64,
                              max_prompt_length=32)
    dm.setup("fit")
    assert (len(dm.train_data), len(dm.val_data)) == (15, 5)


@pytest.mark.skipif(not HH_DATA.exists(), reason="the shared HH slice is not on this machine")
def test_real_hh_slice_keeps_every_usable_row_intact():
    raw = load_rows(str(HH_DATA))
    checked = [check_row(r, i, implicit_prompt=True) for i, r in enumerate(raw)]
    dropped = {i: c["drop_reason"] for i, c in enumerate(checked) if c["drop_reason"]}
    assert dropped.get(1254) == "dialogues do not share the prompt"
    assert len(dropped) < 0.01 * len(raw)
    for row, c in zip(raw, checked):
        if not c["drop_reason"]:  # nothing lost: prompt + response gives back each whole dialogue
            assert c["prompt"] + c["chosen"] == row["chosen"] and c["prompt"] + c["rejected"] == row["rejected"]
            assert c["prompt"].endswith("\n\nAssistant:")


def test_no_response_is_empty_even_at_the_tightest_truncation():
    # max_length = max_prompt_length + 1 leaves one token of room: every response keeps it, so no
    # per-token mean (IPO, SimPO, the NLL) ever divides by zero. Empty texts are dropped before this.
    data = {"prompt": ["x" * n for n in (1, 5, 30)], "chosen": [" long answer", " a", " bb"],
            "rejected": [" no", " quite a long rejected answer", " c"]}
    dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), max_length=6, max_prompt_length=5)
    dm.setup("fit")
    for row in dm.train_data:
        assert len(row["chosen_input_ids"]) >= 1 and len(row["rejected_input_ids"]) >= 1
        assert len(row["prompt_input_ids"]) + max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"])) <= 6
