"""Tokenization rules, batch layout and row checks of `dpo_lightning.data.datamodule`, token by token.

The tokenizer is `conftest.ascii_tokenizer`: one token per character with id = its ASCII code, EOS = 2,
BOS = 1, so every expected id list is written out from the rules, not read off the code's output.
Data files are written to temp folders; nothing touches the network.
"""

import json
import warnings
from pathlib import Path

import pytest
from conftest import BOS, EOS, ascii_tokenizer, ids, rows
from datasets import Dataset, DatasetDict

import dpo_lightning.data.datamodule
from dpo_lightning.data.batches import collate_pairs
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.data.rules import adds_bos, prepare_rows, split_dialogue, split_shared_prefix, to_strings
from dpo_lightning.data.sources import load_rows
from dpo_lightning.data.summary import fingerprint

HH_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-1500.jsonl.gz"


def tokenize_one(row, tokenizer, bos, max_length, max_prompt_length, truncation_mode="keep_end"):
    """`row` through `prepare_rows`, the batched code training maps over every split, as a batch of one."""
    out = prepare_rows({k: [v] for k, v in row.items()}, [0], "explicit", tokenizer, bos, max_length,
                       max_prompt_length, truncation_mode)
    return {k: out[k][0] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}


def tokenize(row, add_bos=False, max_length=64, max_prompt_length=32, truncation_mode="keep_end"):
    tokenizer = ascii_tokenizer(add_bos)
    return tokenize_one(row, tokenizer, adds_bos(tokenizer), max_length, max_prompt_length, truncation_mode)


def test_prompt_and_responses_are_tokenized_separately_with_eos():
    out = tokenize({"prompt": "Hi", "chosen": " yo", "rejected": " no!"})
    assert out == {"prompt_input_ids": ids("Hi"), "chosen_input_ids": ids(" yo") + [EOS],
                   "rejected_input_ids": ids(" no!") + [EOS]}


def test_one_bos_where_the_tokenizer_uses_one():
    assert tokenize({"prompt": "Hi", "chosen": " a", "rejected": " b"}, add_bos=True)["prompt_input_ids"] == [
        BOS, *ids("Hi")]
    # A text prompt is text: "<s>" written in it is three characters, and the one BOS goes in front.
    # (A chat template's own BOS is kept once: test_conversations_render_with_the_chat_template_and_one_bos.)
    assert tokenize({"prompt": "<s>Hi", "chosen": " a", "rejected": " b"}, add_bos=True)["prompt_input_ids"] == [
        BOS, *ids("<s>Hi")]


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
    ({"prompt": 7, "chosen": " a", "rejected": " b"}, "not text prompt"),
    ({"prompt": "p", "chosen": " a", "rejected": "  "}, "empty rejected"),
    ({"prompt": "p", "chosen": " a", "rejected": " a"}, "chosen == rejected"),
])
def test_row_drop_reasons(row, reason):
    assert to_strings(row, 0, "explicit")["drop_reason"] == reason


def test_strict_mode_names_row_field_and_fix():
    with pytest.raises(ValueError, match=r"row 7: field 'rejected': empty rejected; remove the row"):
        to_strings({"prompt": "p", "chosen": " a", "rejected": " "}, 7, "explicit", strict=True)
    dm = PreferenceDataModule(dataset={"prompt": ["p", "q"], "chosen": [" a", None], "rejected": [" c", " d"]},
                              tokenizer=ascii_tokenizer(), strict=True)
    with pytest.raises(ValueError, match=r"row 1: field 'chosen': missing chosen; fill the field"):
        dm.setup("fit")


def test_hh_rows_whose_prompts_differ_are_dropped_and_counted():
    data = {"chosen": ["\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: a\n\nAssistant: b"],
            "rejected": ["\n\nHuman: hi\n\nAssistant: go", "\n\nHuman: other\n\nAssistant: c"]}
    dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), max_length=64, max_prompt_length=32)
    dm.setup("fit")
    assert (dm.summary["train"]["rows"], dm.summary["train"]["kept"]) == (2, 1)
    assert dm.summary["train"]["dropped"] == {"prompts differ": 1}
    assert dm.train_data[0]["prompt_input_ids"] == ids("\n\nHuman: hi\n\nAssistant:")
    assert dm.train_data[0]["chosen_input_ids"] == ids(" hello") + [EOS]


def test_batches_name_each_pair_by_its_row_in_the_split_even_after_drops():
    data = {"prompt": ["a", "b", "c", "d"], "chosen": [" x", "", " y", " z"], "rejected": [" q", " r", " s", " t"]}
    dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), max_length=16, max_prompt_length=8)
    dm.setup("fit")
    batch = dm.collate([dm.train_data[i] for i in range(len(dm.train_data))])
    assert batch["row_ids"].tolist() == [0, 2, 3]  # row 1 (empty chosen) dropped, the others keep their ids
    assert batch["input_ids"][:3, 0].tolist() == [ord("a"), ord("c"), ord("d")]


def test_fingerprint_changes_with_any_token_the_order_or_the_truncation_and_nothing_else():
    def prepared(data, max_length=16):
        dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), max_length=max_length, max_prompt_length=2)
        dm.setup("fit")
        return dm.train_data

    base = {"prompt": ["ab", "c"], "chosen": [" x", " yy"], "rejected": [" q", " r"]}
    same = fingerprint(prepared(base))
    assert fingerprint(prepared(dict(base))) == same
    assert fingerprint(prepared({**base, "rejected": [" q", " s"]})) != same  # one token
    assert fingerprint(prepared({k: v[::-1] for k, v in base.items()})) != same  # the order
    assert fingerprint(prepared(base, max_length=4)) != same  # the truncation (" yy</s>" cut to 2)
    # Token boundaries count: "ab" + " x" and "a" + "b x" hold the same ids in another split.
    assert fingerprint(prepared({**base, "prompt": ["a", "c"], "chosen": ["b x", " yy"]})) != same


def test_implicit_prompt_is_the_shared_prefix_cut_at_a_word_boundary():
    assert split_shared_prefix("The sky is blue.", "The sky is bright.") == ("The sky is", " blue.", " bright.")
    # "bl" is shared too, but cutting inside the word would leave responses "ue." and "ack."
    assert split_shared_prefix("It is blue", "It is black") == ("It is", " blue", " black")
    assert split_shared_prefix("Yes", "No") is None
    assert to_strings({"chosen": "Yes", "rejected": "No"}, 0, "implicit")["drop_reason"] == "no shared prompt"


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def chat_tokenizer(add_bos: bool = False):
    tokenizer = ascii_tokenizer(add_bos)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("row", [
    {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "yes"}],
     "rejected": [{"role": "assistant", "content": "no"}]},
    {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}],
     "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}]},
], ids=["prompt+answers", "whole-conversations"])
def test_conversations_render_with_the_chat_template_and_one_bos(row):
    tokenizer = chat_tokenizer(add_bos=True)
    dm = PreferenceDataModule(dataset=[row], tokenizer=tokenizer, max_length=64, max_prompt_length=32)
    dm.setup("fit")
    out = dm.train_data[0]
    # "<s>user: q</s>assistant:" -- the template's BOS, kept once; responses end with its end-of-turn
    # token (here </s>), and no EOS is appended after it.
    assert out["prompt_input_ids"] == [BOS, *ids("user: q"), EOS, *ids("assistant:")]
    assert out["chosen_input_ids"] == [*ids(" yes"), EOS]
    assert out["rejected_input_ids"] == [*ids(" no"), EOS]


def test_column_names_map_to_prompt_chosen_rejected():
    data = {"question": ["Hi"], "good": [" yo"], "bad": [" no"]}
    dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), prompt_column="question",
                              chosen_column="good", rejected_column="bad", max_length=64, max_prompt_length=32)
    dm.setup("fit")
    assert dm.train_data[0]["prompt_input_ids"] == ids("Hi")
    assert dm.train_data[0]["chosen_input_ids"] == ids(" yo") + [EOS]


def test_missing_column_error_names_what_was_found_and_the_mapping_argument():
    dm = PreferenceDataModule(dataset={"prompt": ["p"], "good": [" a"], "bad": [" b"]}, tokenizer=ascii_tokenizer())
    with pytest.raises(ValueError, match=r"columns \['bad', 'good', 'prompt'\]; expected 'chosen' and 'rejected'.*"
                                         r"--data.prompt_column / chosen_column / rejected_column"):
        dm.setup("fit")


def test_summary_counts_truncation_length_bias_and_percentiles():
    # lengths before truncation: 1 + 4 = 5, 1 + 5 = 6, 14 + 4 = 18 (truncated at max_length 16)
    data = {"prompt": ["a", "b", "c" * 14], "chosen": [" xy", " xyz", " x"], "rejected": [" x", " w", " vw"]}
    dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), max_length=16, max_prompt_length=8)
    dm.setup("fit")
    summary = dm.summary["train"]
    assert summary["truncated"] == 1 and summary["chosen_longer"] == 2
    # numpy's linear percentiles of [5, 6, 18]: p95 at index 1.9 = 6 + 0.9 * 12 = 16.8
    assert summary["length_p50_p95_max"] == [6, 16, 18]


@pytest.mark.parametrize("max_length, cut", [(16, 1), (32, 0)])
def test_truncation_shows_as_trained_lengths_and_a_large_share_cut_warns_at_setup(max_length, cut):
    # As read: 1 + 4 = 5, 1 + 5 = 6, 14 + 4 = 18. Rule 3 at max_length 16 cuts the third's prompt to
    # max_prompt_length 8: 8 + 4 = 12 as trained. 1 of 3 rows cut is over the 25% that warns; none cut is silent.
    # Before: 2,000 of 2,000 rows cut passed without a word, and the lengths shown were those before the cut.
    data = {"prompt": ["a", "b", "c" * 14], "chosen": [" xy", " xyz", " x"], "rejected": [" x", " w", " vw"]}
    dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), max_length=max_length, max_prompt_length=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    trained = [5, 6, 12] if cut else [5, 6, 18]
    # numpy's linear percentiles: p95 at index 1.9 = 6 + 0.9 * (last - 6)
    assert dm.summary["train"]["trained_p50_p95_max"] == [6, int(6 + 0.9 * (trained[2] - 6)), trained[2]]
    cut_warnings = [str(w.message) for w in caught if "are cut to max_length" in str(w.message)]
    assert cut_warnings == (["1 of 3 train rows (33%) are cut to max_length 16 (rule 3: the prompt to "
                             "max_prompt_length first, then the responses lose their ends); as read, the median pair "
                             "has 6 tokens and the longest 18. Raise --data.max_length (and --data.max_prompt_length) "
                             "if the cut tokens matter"] if cut else [])
    assert ("warning: 1 of 3 train rows (33%) are cut" in dm.inspect(n_rows=0)) == bool(cut)  # inspect-data too


def test_online_prompts_mostly_cut_warn_at_setup_as_pairs_do():
    # The same rule for prompts online DPO trains on: 2 of 3 prompts longer than max_prompt_length 8 are cut before
    # the policy completes them; 1 of 3 (the third) is not. Before: prompts never warned, whatever the share cut.
    prompts = {"prompt": ["a" * 12, "b" * 10, "c"]}
    dm = PreferenceDataModule(dataset=prompts, tokenizer=ascii_tokenizer(), max_length=16, max_prompt_length=8)
    dm.train_kind = "prompts"  # as an online DPOModule tells it at setup, and inspect-data from the config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    cut = [str(w.message) for w in caught if "are cut to --data.max_prompt_length" in str(w.message)]
    assert len(cut) == 1 and cut[0].startswith("2 of 3 train prompts (67%) are cut"), cut


def test_max_drop_fraction_fails_fast():
    data = {"prompt": ["p", "q"], "chosen": [" a", " same"], "rejected": [" b", " same"]}
    dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), max_drop_fraction=0.25)
    with pytest.raises(ValueError, match=r"1 of 2 train rows dropped, over max_drop_fraction=0.25"):
        dm.setup("fit")


def test_inspect_shows_the_masked_prompt_and_the_trained_tokens():
    dm = PreferenceDataModule(dataset={"prompt": ["Hi"], "chosen": [" yo"], "rejected": [" no"]},
                              tokenizer=ascii_tokenizer(), max_length=64, max_prompt_length=32)
    text = dm.inspect(n_rows=1)
    assert "1 rows, 1 kept" in text
    assert "   chosen: [H|i] Ġ|y|o|</s>" in text or "   chosen: [H|i]  |y|o|</s>" in text


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


@pytest.mark.parametrize("kind", ["dict", "list", "dataset", "jsonl", "json", "parquet", "csv", "glob", "files"])
def test_every_source_loads_the_same_rows(kind, tmp_path):
    data = rows(6)
    source = {"dict": data, "list": Dataset.from_dict(data).to_list(), "dataset": Dataset.from_dict(data)}.get(kind)
    if kind in ("glob", "files"):
        halves = [{k: v[i * 3:(i + 1) * 3] for k, v in data.items()} for i in range(2)]
        paths = [_write(tmp_path / f"part{i}.jsonl", half) for i, half in enumerate(halves)]
        source = str(tmp_path / "part*.jsonl") if kind == "glob" else paths
    elif source is None:
        source = _write(tmp_path / f"rows.{kind}", data)
    loaded = load_rows(source)[0].to_dict()
    assert {field: loaded[field] for field in data} == data and not any(loaded.get("source_issue", []))


def test_streaming_yields_the_same_batches_as_the_prepared_dataset(tmp_path):
    path = _write(tmp_path / "rows.jsonl", rows(6))
    batches = []
    for streaming in (False, True):
        dm = PreferenceDataModule(dataset=path, tokenizer=ascii_tokenizer(), streaming=streaming, max_length=64,
                                  max_prompt_length=32, batch_size=6)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        order = batch["input_ids"][:6, :4].tolist()  # shuffled differently: compare as sorted rows
        batches.append(sorted(zip(order, batch["labels"][:6].tolist(), batch["labels"][6:].tolist())))
    assert batches[0] == batches[1]


def test_hh_preset_names_the_hub_dataset_and_the_dialogue_format():
    dm = PreferenceDataModule(dataset="hh", eval_split="test")
    assert dm.dataset == "Anthropic/hh-rlhf" and dm.hparams.dataset_format == "hh"


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


def split_rows(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag}{i}", "chosen": f" yes{i}", "rejected": f" no{i}"} for i in range(n)]


def prompts_of(data) -> list[str]:
    return ["".join(map(chr, row["prompt_input_ids"])) for row in data]


def test_a_dataset_dict_saved_to_disk_is_read_by_its_own_split_names(tmp_path):
    # Read as a generic data folder: its splits' names were mangled (train_prefs and train_sft merged into "train",
    # silently), and split="train_prefs" failed inside datasets' arrow_reader.py.
    DatasetDict({"train_prefs": Dataset.from_list(split_rows("P", 3)), "train_sft": Dataset.from_list(split_rows("S", 5)),
                 "test_prefs": Dataset.from_list(split_rows("T", 2))}).save_to_disk(tmp_path / "uf")
    dm = PreferenceDataModule(dataset=str(tmp_path / "uf"), split="train_prefs", eval_split="test_prefs",
                              tokenizer=ascii_tokenizer(), max_length=64, max_prompt_length=32)
    dm.prepare_data()
    dm.setup("fit")
    assert (sorted(prompts_of(dm.train_data)), prompts_of(dm.val_data)) == (["P0", "P1", "P2"], ["T0", "T1"])
    with pytest.raises(ValueError, match=r"split 'train' not in the train dataset; it has \['test_prefs', "
                                         r"'train_prefs', 'train_sft'\]: set --data.split"):
        PreferenceDataModule(dataset=str(tmp_path / "uf"), tokenizer=ascii_tokenizer()).setup("fit")


def test_a_dataset_saved_to_disk_is_read(tmp_path):
    # Failed with datasets' own "use load_from_disk instead".
    Dataset.from_list(split_rows("P", 3)).save_to_disk(tmp_path / "one")
    dm = PreferenceDataModule(dataset=str(tmp_path / "one"), tokenizer=ascii_tokenizer(), max_length=64,
                              max_prompt_length=32)
    dm.setup("fit")
    assert sorted(prompts_of(dm.train_data)) == ["P0", "P1", "P2"]


def test_a_folder_of_split_files_without_the_split_names_the_splits_it_has(tmp_path):
    # A hub-style folder (data/train_prefs-00000-of-00001.parquet) and the default split "train": the error came
    # from inside datasets' arrow_reader.py.
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split, n in (("train_prefs", 3), ("test_prefs", 2)):
        Dataset.from_list(split_rows(split[:2], n)).to_parquet(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"split 'train' not in the train dataset; it has \['test_prefs', "
                                         r"'train_prefs'\]: set --data.split") as error:
        PreferenceDataModule(dataset=str(tmp_path / "hub"), tokenizer=ascii_tokenizer()).setup("fit")
    assert "/dpo_lightning/" in error.traceback[-1].path.as_posix()


def test_tokenization_is_cached_and_reused_by_a_second_data_module(tmp_path, monkeypatch):
    path = _write(tmp_path / "rows.jsonl", rows(8))
    built = []
    for code in ("this version", "this version", "an upgraded data.py"):
        monkeypatch.setattr(dpo_lightning.data.datamodule, "DATA_CODE", code)
        dm = PreferenceDataModule(dataset=path, tokenizer=ascii_tokenizer(), max_length=64, max_prompt_length=32)
        dm.prepare_data()
        dm.setup("fit")
        built.append(dm.train_data)
    # Same fingerprint and the same cache file: the second module (or DDP rank) read, not re-tokenized.
    assert built[0]._fingerprint == built[1]._fingerprint
    assert built[0].cache_files == built[1].cache_files and built[0].cache_files
    # Other tokenization code: prepared again, not read from the old rules' cache.
    assert built[2]._fingerprint != built[0]._fingerprint and built[2].cache_files != built[0].cache_files


def test_eval_fraction_holds_out_a_seeded_split():
    dm = PreferenceDataModule(dataset=rows(20), eval_fraction=0.25, tokenizer=ascii_tokenizer(), max_length=64,
                              max_prompt_length=32)
    dm.setup("fit")
    assert (len(dm.train_data), len(dm.val_data)) == (15, 5)


@pytest.mark.skipif(not HH_DATA.exists(), reason="the shared HH slice is not on this machine")
def test_real_hh_slice_drops_exactly_the_broken_rows_and_keeps_every_other_intact():
    raw = load_rows(str(HH_DATA))[0]
    checked = [to_strings(row, i, "hh") for i, row in enumerate(raw)]
    dropped = {i: c["drop_reason"] for i, c in enumerate(checked) if c["drop_reason"]}
    assert dropped == {86: "empty chosen", 516: "empty chosen", 925: "empty chosen", 1103: "empty chosen",
                       1254: "prompts differ"}
    for row, c in zip(raw, checked):
        if not c["drop_reason"]:  # nothing lost: prompt + response gives back each whole dialogue
            assert c["prompt"] + c["chosen"] == row["chosen"] and c["prompt"] + c["rejected"] == row["rejected"]
            assert c["prompt"].endswith("\n\nAssistant:")


@pytest.mark.skipif(not HH_DATA.exists(), reason="the shared HH slice is not on this machine")
def test_real_hh_slice_through_the_data_module_decodes_back_to_the_dialogues(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    # Byte-level tokenizer (256 byte tokens + EOS): every dialogue round-trips exactly through decode.
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    dm = PreferenceDataModule(dataset=str(HH_DATA), dataset_format="hh", tokenizer=tokenizer, max_length=100_000,
                              max_prompt_length=50_000)
    dm.setup("fit")
    assert dm.summary["train"]["rows"] == 1500 and dm.summary["train"]["kept"] == 1495
    assert dm.summary["train"]["dropped"] == {"empty chosen": 4, "prompts differ": 1}
    kept = [row for i, row in enumerate(load_rows(str(HH_DATA))[0]) if i not in (86, 516, 925, 1103, 1254)]
    for row, tokens in zip(kept, dm.train_data):
        eos = [tokenizer.eos_token_id]
        assert tokens["chosen_input_ids"][-1:] == eos and tokens["rejected_input_ids"][-1:] == eos
        assert tokenizer.decode(tokens["prompt_input_ids"] + tokens["chosen_input_ids"][:-1]) == row["chosen"]
        assert tokenizer.decode(tokens["prompt_input_ids"] + tokens["rejected_input_ids"][:-1]) == row["rejected"]


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


def test_prompt_and_response_never_merge_into_one_bpe_token():
    # A real BPE whose merges join "a" + "b": tokenized jointly, prompt "xa" + response "b!" would give
    # [x, ab, !], so the prompt would lose its last token into the response. Separately: [x, a] + [b, !].
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(["ab ab ab x !"] * 10, trainers.BpeTrainer(special_tokens=["</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    vocab = tokenizer.get_vocab()
    assert tokenizer("xab!", add_special_tokens=False)["input_ids"][1] == vocab["ab"]  # the merge is real
    out = tokenize_one({"prompt": "xa", "chosen": "b!", "rejected": "a"}, tokenizer, None, 64, 32)
    assert out["prompt_input_ids"] == [vocab["x"], vocab["a"]]
    assert out["chosen_input_ids"] == [vocab["b"], vocab["!"], vocab["</s>"]]


# --- The 13 defects of issue 13, one test each (each failed before its fix). ---

def test_keep_end_keeps_a_prompt_that_already_fits_max_prompt_length():
    # prompt 11 tokens <= max_prompt_length 16, chosen 99 + EOS = 100 > room: only the responses are cut.
    out = tokenize({"prompt": "abcdefghijk", "chosen": "x" * 99, "rejected": " b"}, max_length=64, max_prompt_length=16)
    assert out["prompt_input_ids"] == ids("abcdefghijk")
    assert out["chosen_input_ids"] == ids("x" * 53)


def test_hh_rejected_dialogue_with_an_extra_exchange_is_dropped_not_kept_with_turns_in_its_response():
    chosen = "\n\nHuman: hi\n\nAssistant: hello"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant: no"
    assert split_dialogue(chosen, rejected) is None
    assert to_strings({"chosen": chosen, "rejected": rejected}, 0, "hh")["drop_reason"] == "prompts differ"


def test_whole_conversations_must_share_every_leading_message():
    tokenizer = chat_tokenizer()
    user, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    row = {"chosen": [user, answer], "rejected": [user, answer, {"role": "user", "content": "r"},
                                                  {"role": "assistant", "content": "b"}]}
    assert to_strings(row, 0, "conversational", tokenizer)["drop_reason"] == "prompts differ"


def test_format_is_detected_from_a_sample_and_a_row_without_an_assistant_turn_is_dropped():
    data = {"chosen": ["\n\nHuman: hi", "\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: d"],
            "rejected": ["\n\nHuman: hi there", "\n\nHuman: a\n\nAssistant: x", "\n\nHuman: c\n\nAssistant: y"]}
    dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), max_length=64, max_prompt_length=32)
    dm.setup("fit")
    assert dm.summary["train"]["dropped"] == {"no assistant turn chosen": 1}
    assert dm.train_data[0]["prompt_input_ids"] == ids("\n\nHuman: a\n\nAssistant:")
    strict = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(), strict=True)
    with pytest.raises(ValueError, match=r"train row 0: field 'chosen': no assistant turn"):
        strict.setup("fit")


def test_every_row_dropped_gives_the_no_usable_rows_error_with_the_counts():
    dm = PreferenceDataModule(dataset={"prompt": ["p", "q"], "chosen": [" a", " b"], "rejected": [" a", " b"]},
                              tokenizer=ascii_tokenizer())
    with pytest.raises(ValueError, match=r"no usable train rows left: 2 rows, 0 kept, dropped \{chosen == rejected: 2\}"):
        dm.setup("fit")


@pytest.mark.parametrize("kind", ["list", "dict", "jsonl"])
def test_empty_input_says_which_dataset_is_empty(kind, tmp_path):
    empty = {"list": [], "dict": {}, "jsonl": None}[kind]
    if kind == "jsonl":
        (tmp_path / "empty.jsonl").write_text("")
        empty = str(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match=r"the train dataset is empty"):
        PreferenceDataModule(dataset=empty, tokenizer=ascii_tokenizer()).setup("fit")
    with pytest.raises(ValueError, match=r"the eval dataset is empty"):
        PreferenceDataModule(dataset=rows(2), eval_dataset=empty, tokenizer=ascii_tokenizer()).setup("fit")


def test_forced_explicit_format_with_a_missing_prompt_column_names_it():
    dm = PreferenceDataModule(dataset={"chosen": [" a"], "rejected": [" b"]}, dataset_format="explicit",
                              tokenizer=ascii_tokenizer())
    with pytest.raises(ValueError, match=r"dataset_format 'explicit' needs columns \['chosen', 'prompt', 'rejected'\]"
                                         r".*no 'prompt'.*--data.prompt_column"):
        dm.setup("fit")


def test_a_number_in_a_text_column_of_a_list_of_rows_is_a_counted_drop():
    data = [{"prompt": "p", "chosen": " a", "rejected": " b"}, {"prompt": "q", "chosen": 5, "rejected": " c"}]
    dm = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer())
    dm.setup("fit")
    assert dm.summary["train"]["dropped"] == {"not text chosen": 1} and dm.summary["train"]["kept"] == 1


def test_jsonl_strings_that_look_like_numbers_stay_text_and_numbers_name_their_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "p", "chosen": "1.5", "rejected": "2"}\n{"prompt": "q", "chosen": 1.5, "rejected": "3"}\n')
    dm = PreferenceDataModule(dataset=str(path), tokenizer=ascii_tokenizer())
    dm.setup("fit")
    assert dm.summary["train"]["dropped"] == {"not text chosen": 1}
    assert dm.train_data[0]["chosen_input_ids"] == ids("1.5") + [EOS]
    with pytest.raises(ValueError, match=r"train row 1: field 'chosen': not text"):
        PreferenceDataModule(dataset=str(path), tokenizer=ascii_tokenizer(), strict=True).setup("fit")


@pytest.mark.parametrize("kind", ["list", "jsonl"])
def test_rows_that_are_not_dicts_are_named(kind, tmp_path):
    source = ["just a string", "another"]
    if kind == "jsonl":
        (tmp_path / "rows.jsonl").write_text('"just a string"\n"another"\n')
        source = str(tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match=r"no usable train rows left: 2 rows, 0 kept, dropped \{not a dict: 2\}"):
        PreferenceDataModule(dataset=source, tokenizer=ascii_tokenizer()).setup("fit")
    with pytest.raises(ValueError, match=r"train row 0: not a dict; give each row as"):
        PreferenceDataModule(dataset=source, tokenizer=ascii_tokenizer(), strict=True).setup("fit")


def test_conversations_without_a_chat_template_name_the_fix():
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "y"}],
           "rejected": [{"role": "assistant", "content": "n"}]}
    with pytest.raises(ValueError, match=r"tokenizer has no chat_template.*tokenizer.chat_template"):
        PreferenceDataModule(dataset=[row], tokenizer=ascii_tokenizer()).setup("fit")


def test_prompt_messages_with_plain_text_responses_name_the_field_and_the_fix():
    tokenizer = chat_tokenizer()
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": " yes", "rejected": " no"}
    with pytest.raises(ValueError, match=r"'prompt' holds messages but 'chosen' holds text.*\{'role': 'assistant'"):
        PreferenceDataModule(dataset=[row], tokenizer=tokenizer).setup("fit")


def test_an_unknown_role_is_a_counted_drop_and_strict_names_the_row():
    tokenizer = chat_tokenizer()
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "y"}],
            "rejected": [{"role": "assistant", "content": "n"}]}
    bad = {**good, "prompt": [{"role": "human", "content": "q"}]}
    dm = PreferenceDataModule(dataset=[good, bad], tokenizer=tokenizer)
    dm.setup("fit")
    assert dm.summary["train"]["dropped"] == {"unknown role prompt": 1}
    with pytest.raises(ValueError, match=r"train row 1: field 'prompt': unknown role prompt; use the roles system, user, assistant"):
        PreferenceDataModule(dataset=[good, bad], tokenizer=tokenizer, strict=True).setup("fit")


def test_implicit_prompt_ends_at_whitespace_in_both_texts():
    assert split_shared_prefix("The cat sat down.", "The cats ran off.") == ("The", " cat sat down.", " cats ran off.")


def test_eval_split_applies_to_eval_dataset():
    from datasets import DatasetDict

    evaluation = DatasetDict({"test": Dataset.from_dict(rows(3))})
    dm = PreferenceDataModule(dataset=rows(4), eval_dataset=evaluation, eval_split="test", tokenizer=ascii_tokenizer())
    dm.setup("fit")
    assert len(dm.val_data) == 3


def test_empty_prompt_scores_every_token_with_bos_and_is_dropped_without():
    data = {"prompt": ["", "p"], "chosen": [" a", " b"], "rejected": [" c", " d"]}
    with_bos = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer(add_bos=True))
    with_bos.setup("fit")
    assert with_bos.train_data[0]["prompt_input_ids"] == [BOS]  # BOS predicts the first response token
    without = PreferenceDataModule(dataset=data, tokenizer=ascii_tokenizer())
    without.setup("fit")
    assert without.summary["train"]["dropped"] == {"empty prompt": 1} and without.summary["train"]["kept"] == 1


def test_file_sources_build_and_report_once(tmp_path, monkeypatch):
    printed = []
    monkeypatch.setattr(dpo_lightning.data.datamodule, "rank_zero_info", printed.append)
    dm = PreferenceDataModule(dataset=_write(tmp_path / "rows.jsonl", rows(4)), tokenizer=ascii_tokenizer())
    dm.prepare_data()
    dm.setup("fit")
    assert len([line for line in printed if "train data" in line]) == 1
