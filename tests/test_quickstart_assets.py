"""Tests for the committed quickstart assets in dpo_lightning/assets/sort-tiny/.

They check that every preference row obeys the sorting task, that val is held out from train, that
`dpo_lightning.tools.quickstart` still reproduces the jsonl files byte for byte, and that the saved
tokenizer and model load the way the library will load them. Everything is read from the package
folder, so no network or hub access is needed; the SFT warm-up is not rerun.
"""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.tools.quickstart import (
    DEFAULT_OUT, N_TRAIN, N_VAL, TRAIN_SEED, VAL_SEED, generation_stats, make_pairs, write_jsonl,
)

ASSETS = DEFAULT_OUT
PROMPT = re.compile(r"sort ([a-z]+):")


def _rows(split: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (ASSETS / f"{split}.jsonl").read_text().splitlines()]


def _letter_sets(rows: list[dict[str, str]]) -> set[frozenset[str]]:
    return {frozenset(PROMPT.fullmatch(row["prompt"]).group(1)) for row in rows}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS)


@pytest.mark.parametrize("split, n_rows", [("train", N_TRAIN), ("val", N_VAL)])
def test_every_row_is_a_sorting_preference(split, n_rows):
    rows = _rows(split)
    assert len(rows) == n_rows
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        letters = PROMPT.fullmatch(row["prompt"]).group(1)
        assert 3 <= len(letters) <= 8 and len(set(letters)) == len(letters)
        assert row["chosen"] == " " + "".join(sorted(letters))
        assert len(row["rejected"]) == len(row["chosen"]) and row["rejected"] != row["chosen"]
        assert rejected_kind(row) in ("order", "letter")


def rejected_kind(row: dict[str, str]) -> str:
    """"order": the prompt's letters out of order; "letter": sorted, one letter wrong; else "other"."""
    chosen, rejected = row["chosen"].strip(), row["rejected"].strip()
    if sorted(rejected) == sorted(chosen):
        return "order"
    missing = sum((Counter(chosen) - Counter(rejected)).values())
    return "letter" if list(rejected) == sorted(rejected) and missing == 1 else "other"


def test_rejected_kinds_are_mixed():
    # Five kinds drawn in equal shares: three wrong orders, two wrong letters (see quickstart.REJECTED_KINDS).
    rows = _rows("train")
    counts = Counter(rejected_kind(row) for row in rows)
    assert 0.5 * len(rows) < counts["order"] < 0.7 * len(rows) and counts["letter"] == len(rows) - counts["order"]
    repeated = sum(len(set(row["rejected"])) < len(row["rejected"]) for row in rows)
    assert 0.15 * len(rows) < repeated < 0.25 * len(rows)


def test_val_letter_sets_are_not_in_train():
    assert not _letter_sets(_rows("val")) & _letter_sets(_rows("train"))


def test_make_pairs_reproduces_committed_jsonl(tmp_path: Path):
    val = make_pairs(N_VAL, VAL_SEED)
    train = make_pairs(N_TRAIN, TRAIN_SEED, exclude=_letter_sets(val))
    for split, rows in (("train", train), ("val", val)):
        write_jsonl(rows, tmp_path / f"{split}.jsonl")
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ASSETS / f"{split}.jsonl").read_bytes()


def test_tokenizer_is_character_level_and_round_trips(tokenizer):
    for row in _rows("val")[:50]:
        for text in (row["prompt"], row["chosen"], row["rejected"], row["prompt"] + row["chosen"]):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            assert len(ids) == len(text)  # one id per character
            assert tokenizer.decode(ids) == text  # the leading space of a response survives
    assert tokenizer.decode(tokenizer("a, b!\n1:", add_special_tokens=False).input_ids) == "a, b!\n1:"


def test_tokenizer_is_gpt2_like(tokenizer):
    # The library, not the tokenizer, must supply padding and decide on special tokens.
    assert tokenizer.pad_token is None
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer("sort cab:").input_ids == tokenizer("sort cab:", add_special_tokens=False).input_ids
    assert tokenizer.eos_token_id not in tokenizer("sort cab: abc").input_ids
    assert tokenizer.unk_token_id != tokenizer.eos_token_id


def test_model_loads_and_matches_tokenizer(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(ASSETS)
    config = model.config
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = tokenizer(["sort cab: abc"], return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_reference_model_permutes_but_does_not_sort(tokenizer):
    # The warm-up's goal: answers are the prompt's letters then EOS, in no preferred order
    # (chance of sorted is about 4% on val), which leaves DPO something to teach.
    model = AutoModelForCausalLM.from_pretrained(ASSETS).eval()
    stats = generation_stats(model, tokenizer, _rows("val"))
    assert stats["permutation"] >= 0.9
    assert stats["sorted"] <= 0.2


def test_assets_fit_in_two_megabytes():
    assert sum(f.stat().st_size for f in ASSETS.iterdir()) < 2 * 1024 * 1024
