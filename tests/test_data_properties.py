"""Property-based tests of the data rules: tokenization, truncation, both batch layouts, the format splitters.

Each rule is stated as invariants and checked by `hypothesis` on random inputs against a small oracle
written here from the rule's docstring (data.py's numbered rules, `collate_pairs`, `packing.collate_shared`,
formats.py), never by calling the package's own helpers. The tokenizer is `conftest.ascii_tokenizer`
(one token per character; "<s>", "</s>", "<unk>" are its special tokens, but in a text field their text
is text, character by character (rule 2); other characters outside printable ASCII are <unk> = 0), so
the oracle can tokenize by hand. No network.

Examples per test: 40 in the suite; set DPO_PROPERTY_EXAMPLES (e.g. 2000) for a long search.
"""

import os

import pytest
from conftest import BOS, EOS, UNK, ascii_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo_lightning.data.batches import collate_pairs
from dpo_lightning.data.rules import prepare_rows, split_dialogue, split_shared_prefix
from dpo_lightning.data.packing import collate_shared

SETTINGS = settings(max_examples=int(os.environ.get("DPO_PROPERTY_EXAMPLES", 40)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOKENIZERS = {False: ascii_tokenizer(add_bos=False), True: ascii_tokenizer(add_bos=True)}
HH = "\n\nAssistant:"

# Printable ASCII without "<" (so specials only appear where a strategy puts them), whitespace, unicode.
CHARS = st.one_of(st.sampled_from([chr(i) for i in range(32, 127) if chr(i) != "<"] + ["\n", "\t", " "]),
                  st.sampled_from(["é", "😀", "\u0301", "中"]))
TEXT = st.text(CHARS, max_size=30)


def prepare_one(row, tokenizer, bos, max_length, max_prompt_length, mode):
    """One row through `prepare_rows` (the batched code training runs) as a batch of one, its row's fields."""
    out = prepare_rows({k: [v] for k, v in row.items()}, [0], "explicit", tokenizer, bos, max_length,
                       max_prompt_length, mode)
    return {k: v[0] for k, v in out.items()}


def expected_drop(row, add_bos):
    """The drop checks on a text row, in the order rule 1's row checks and rule 2 apply them ("" if kept)."""
    return ("empty chosen" if not row["chosen"].strip() else "empty rejected" if not row["rejected"].strip()
            else "chosen == rejected" if row["chosen"] == row["rejected"]
            else "empty prompt" if not add_bos and row["prompt"] == "" else "")


def oracle_ids(text: str) -> list[int]:
    """ascii_tokenizer on a text field, by hand: each character's code (or <unk>); "<s>" is three characters."""
    return [ord(c) if 32 <= ord(c) < 127 or c == "\n" else UNK for c in text]


@st.composite
def pairs(draw):
    """A row of strings and lengths whose sums fall on both sides of max_length and max_prompt_length."""
    max_length = draw(st.integers(2, 40))
    max_prompt_length = draw(st.integers(1, max_length - 1))
    near = st.sampled_from([0, 1, max_prompt_length // 2 + 1, max_prompt_length - 2, max_prompt_length - 1,
                            max_prompt_length, max_prompt_length + 1, max_length - 1, max_length, max_length + 1])
    prompt_length = max(0, draw(st.one_of(near, near, near, st.integers(0, 2 * max_length))))
    prompt = draw(st.sampled_from(["", "<s>", "</s>"])) + draw(st.text(CHARS, min_size=prompt_length, max_size=prompt_length))
    room = max_length - prompt_length  # responses (EOS included) just under, at and just over the room left
    sizes = st.one_of(st.sampled_from([max(1, room + d) for d in (-2, -1, 0, 1)]),
                      st.integers(1, max_length + 2))
    chosen, rejected = (draw(st.text(CHARS, min_size=n, max_size=n)) for n in (draw(sizes), draw(sizes)))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, max_length, max_prompt_length


@SETTINGS
@given(case=pairs(), add_bos=st.booleans(), mode=st.sampled_from(["keep_end", "keep_start"]))
def test_prepared_row_follows_rules_2_and_3(case, add_bos, mode):
    row, max_length, max_prompt_length = case
    out = prepare_one(row, TOKENIZERS[add_bos], BOS if add_bos else None, max_length, max_prompt_length, mode)
    assert out["drop_reason"] == expected_drop(row, add_bos)
    if out["drop_reason"]:
        return
    raw = oracle_ids(row["prompt"])
    full = {side: oracle_ids(row[side]) + [EOS] for side in ("chosen", "rejected")}
    whole_prompt = ([BOS] if add_bos else []) + raw  # a text prompt never starts with the BOS token itself
    too_long = len(whole_prompt) + max(map(len, full.values())) > max_length
    assert out["truncated"] == too_long
    # The prompt: whole when the pair fits (or the prompt fits max_prompt_length), else the mode's slice.
    prompt = out["prompt_input_ids"]
    if not too_long or len(whole_prompt) <= max_prompt_length:
        assert prompt == whole_prompt
    else:
        head = whole_prompt[:1] if add_bos else []
        body = whole_prompt[len(head):]
        keep = max_prompt_length - len(head)
        kept = body[len(body) - keep:] if mode == "keep_end" else body[:keep]
        assert prompt == head + kept and len(prompt) == max_prompt_length
    if add_bos:
        assert prompt[:1] == [BOS] and prompt[1:2] != [BOS]  # exactly one BOS, in front
    for side, ids in full.items():
        response = out[f"{side}_input_ids"]
        assert response and response == ids[: len(response)]  # a non-empty prefix of its ids + EOS
        assert len(prompt) + len(response) <= max_length
        assert response == ids[: max_length - len(prompt)]  # cut only to the room the prompt leaves


@SETTINGS
@given(rows=st.lists(pairs(), min_size=1, max_size=6), add_bos=st.booleans(),
       mode=st.sampled_from(["keep_end", "keep_start"]))
def test_batched_preparation_gives_each_row_the_ids_it_gets_alone(rows, add_bos, mode):
    max_length, max_prompt_length = rows[0][1], rows[0][2]
    batch = {field: [row[field] for row, _, _ in rows] for field in ("prompt", "chosen", "rejected")}
    tokenizer = TOKENIZERS[add_bos]
    bos = BOS if add_bos else None
    out = prepare_rows(batch, list(range(len(rows))), "explicit", tokenizer, bos, max_length, max_prompt_length, mode)
    for i, (row, _, _) in enumerate(rows):
        expected = expected_drop(row, add_bos)
        assert out["drop_reason"][i] == expected
        if not expected:
            single = prepare_one(row, tokenizer, bos, max_length, max_prompt_length, mode)
            assert {k: out[k][i] for k in single if k != "row_id"} == {k: v for k, v in single.items() if k != "row_id"}


def oracle_padded(rows, pad):
    """The padded layout from `collate_pairs`' docstring: chosen rows, then rejected rows, right-padded."""
    sequences = [(row["prompt_input_ids"], row[side]) for side in ("chosen_input_ids", "rejected_input_ids")
                 for row in rows]
    width = max(len(p) + len(r) for p, r in sequences)
    ids = [p + r + [pad] * (width - len(p) - len(r)) for p, r in sequences]
    mask = [[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in sequences]
    labels = [[-100] * len(p) + r + [-100] * (width - len(p) - len(r)) for p, r in sequences]
    return ids, mask, labels


IDS = st.lists(st.integers(0, 9), max_size=6)  # small ids: pad, EOS and response ids collide often
TOKENIZED = st.fixed_dictionaries({"prompt_input_ids": st.lists(st.integers(0, 9), min_size=1, max_size=6),
                                   "chosen_input_ids": IDS.map(lambda ids: ids + [EOS]),
                                   "rejected_input_ids": IDS.map(lambda ids: ids + [EOS])})


@SETTINGS
@given(rows=st.lists(TOKENIZED, min_size=1, max_size=5), pad=st.sampled_from([0, EOS, 7]))
def test_collate_pairs_matches_the_padded_layout(rows, pad):
    batch = collate_pairs(rows, pad)
    ids, mask, labels = oracle_padded(rows, pad)
    assert batch["input_ids"].tolist() == ids and batch["attention_mask"].tolist() == mask
    assert batch["labels"].tolist() == labels  # -100 exactly over prompt and padding, even when pad == EOS


@SETTINGS
@given(rows=st.lists(TOKENIZED, min_size=1, max_size=5), pad=st.sampled_from([0, EOS]), packing=st.booleans(),
       budget=st.integers(1, 40))
def test_collate_shared_reads_back_the_padded_layout(rows, pad, packing, budget):
    shared = collate_shared(rows, pad, packing, budget)
    ids, _, labels = oracle_padded(rows, pad)
    flat_ids, flat_pos = shared["input_ids"].flatten(), shared["position_ids"].flatten()
    pair, branch = shared["pair_ids"].flatten(), shared["branch_ids"].flatten()
    for k in range(2 * len(rows)):
        row = rows[k % len(rows)]
        n, m = len(row["prompt_input_ids"]), len(row["chosen_input_ids" if k < len(rows) else "rejected_input_ids"])
        at = shared["response_positions"][k, : m + 1]
        # Column t of response k holds the padded row's token n - 1 + t, at its padded position, and scores label t + 1.
        assert flat_ids[at].tolist() == ids[k][n - 1: n + m] and flat_pos[at].tolist() == list(range(n - 1, n + m))
        assert shared["labels"][k].tolist() == [-100] + labels[k][n: n + m] + [-100] * (shared["labels"].shape[1] - m - 1)
        # What each of those tokens attends to (same pair, not later, a prompt token or its own branch, as
        # packing.py's docstring says) is exactly its padded row's prefix.
        width = shared["input_ids"].shape[1]
        for t, q in enumerate(at.tolist()):
            start = q - q % width
            keys = [j for j in range(start, q + 1) if pair[j] == pair[q] and branch[j] in (0, branch[q])]
            assert flat_ids[keys].tolist() == ids[k][: n + t]


TURN = st.text(st.sampled_from("ab :\n?"), max_size=8)


@st.composite
def dialogues(draw):
    """HH dialogues: a shared history, each side answered; sometimes a side gets another exchange or no turn."""
    history = "".join(f"\n\nHuman:{draw(TURN)}\n\nAssistant:{draw(TURN)}" for _ in range(draw(st.integers(0, 2))))
    prompt = history + f"\n\nHuman:{draw(TURN)}" + HH
    texts = []
    for _ in range(2):
        kind = draw(st.sampled_from(["answer", "answer", "extra exchange", "no turn", "other prompt"]))
        answer = draw(TURN)
        texts.append({"answer": prompt + answer, "extra exchange": prompt + answer + f"\n\nHuman:{draw(TURN)}" + HH +
                      draw(TURN), "no turn": f"\n\nHuman:{draw(TURN)}", "other prompt": f"\n\nHuman:x{draw(TURN)}" + HH +
                      answer}[kind])
    return texts


@SETTINGS
@given(texts=dialogues())
def test_split_dialogue_cuts_each_side_at_its_own_last_assistant_turn(texts):
    chosen, rejected = texts
    prompts = [text[: len(text) - len(text.split(HH)[-1])] if HH in text else None for text in (chosen, rejected)]
    out = split_dialogue(chosen, rejected)
    if prompts[0] is None or prompts[0] != prompts[1]:
        assert out is None
    else:
        prompt, chosen_response, rejected_response = out
        assert prompt == prompts[0] and prompt.endswith(HH)
        assert prompt + chosen_response == chosen and prompt + rejected_response == rejected
        assert HH not in chosen_response and HH not in rejected_response


@SETTINGS
@given(shared=st.text(st.sampled_from("ab \n\t"), max_size=10), chosen=st.text(st.sampled_from("ab \n"), max_size=6),
       rejected=st.text(st.sampled_from("abc \n"), max_size=6))
def test_split_shared_prefix_cuts_at_the_last_position_that_is_whitespace_in_both(shared, chosen, rejected):
    chosen, rejected = shared + chosen, shared + rejected
    cuts = [i for i in range(1, min(len(chosen), len(rejected)))
            if chosen[:i] == rejected[:i] and chosen[i].isspace() and rejected[i].isspace()]
    out = split_shared_prefix(chosen, rejected)
    if not cuts:
        assert out is None
    else:
        assert out == (chosen[: max(cuts)], chosen[max(cuts):], rejected[max(cuts):])


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A real byte-level BPE (merges across characters), so batched and single encodes could differ."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat; a b ab abc é 😀"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


@SETTINGS
@given(rows=st.lists(st.tuples(st.text(max_size=20), st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20)),
                     min_size=1, max_size=6))
def test_batched_bpe_preparation_gives_the_row_wise_ids(bpe_tokenizer, rows):
    batch = {"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows], "rejected": [r[2] for r in rows]}
    out = prepare_rows(batch, list(range(len(rows))), "explicit", bpe_tokenizer, None, 24, 8, "keep_end")
    for i, (prompt, chosen, rejected) in enumerate(rows):
        if not out["drop_reason"][i]:
            single = prepare_one({"prompt": prompt, "chosen": chosen, "rejected": rejected}, bpe_tokenizer, None, 24,
                                 8, "keep_end")
            assert {k: out[k][i] for k in single if k != "row_id"} == {k: v for k, v in single.items() if k != "row_id"}
