"""Offline assets for the quickstart: a sorting-preference data set, a character tokenizer, a tiny model.

The task ("sorting preferences"). Each prompt lists a few distinct lowercase letters in random order
and asks for them sorted; the chosen response is the letters in alphabetical order, the rejected one
is a near miss of the same length:

    {"prompt": "sort dfbca:", "chosen": " abcdf", "rejected": " abdcf"}

Rejected responses come in five kinds, in roughly equal shares. Three put the prompt's own letters in
a wrong order: one adjacent swap of the sorted answer (the hardest to tell apart), one swap of two
non-adjacent letters, a random unsorted shuffle. Two are sorted but get one letter wrong: a letter
that is not in the prompt ("abxdf"), or a neighbour repeated in place of a letter ("abbdf"). Chosen
and rejected always have the same length, so length is no shortcut; a model has to learn both order
and which letters the prompt holds. Without the two wrong-letter kinds, DPO finds a cheaper way to
raise chosen over rejected than sorting: it drifts to strings with no descending pair at all, such as
"eeeee", reaching reward accuracy 1.0 while its greedy answers stop being answers (this was measured
on the first version of this set). Val letter sets never occur in train.

The model starts from a short supervised warm-up on prompt + response, where the response is the
prompt's letters in a random order and then EOS. It learns to answer with some permutation of the
letters, with no preference for sorted order: a sensible reference policy that DPO can then teach to
sort. Sorted responses appear only early in the warm-up (half the rows at first, none after 40% of the
steps): from scratch, random orders alone leave this model stuck at unigram loss (no permutations
after 1200 steps), while a constant sorted half makes sorted the most likely answer, so greedy
decoding sorts every val prompt before DPO starts.

The tokenizer is character-level and deliberately GPT-2-like: `<|endoftext|>` is both EOS and BOS,
no pad token is set and `tokenizer(...)` adds no special tokens, so the library's own pad = EOS
handling is what the quickstart exercises.

Regenerate everything in `dpo_lightning/assets/sort-tiny/` (about a minute on two CPU cores):

    python -m dpo_lightning.tools.quickstart [--out DIR]

The jsonl files are byte-identical on every run (Python's seeded `random`); the model weights are
seeded too but may differ in the last bits across machines and torch versions.
"""

import argparse
import json
import random
import string
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dpo_lightning.data.batches import pad_and_label
from dpo_lightning.online.rewards import format_prompt, format_response, prompt_letters

LETTERS = "abcdefghijklmn"  # 14 letters: enough distinct sets to hold out val sets at every length
MIN_LETTERS, MAX_LETTERS = 3, 8  # 3 is the shortest that allows a non-adjacent swap
REJECTED_KINDS = ("adjacent_swap", "nonadjacent_swap", "shuffle", "foreign_letter", "repeated_letter")
N_TRAIN, N_VAL = 2000, 256
TRAIN_SEED, VAL_SEED, MODEL_SEED, SFT_SEED = 1, 2, 3, 4
SFT_STEPS = 1200
SFT_SORTED_SHARE = 0.5  # at the first step; it decays linearly to 0
SFT_ANNEAL_FRACTION = 0.4  # of the steps, after which no response is sorted
EOS = "<|endoftext|>"
UNK = "<unk>"
DEFAULT_OUT = Path(__file__).parents[1] / "assets" / "sort-tiny"


def _random_letters(rng: random.Random, exclude: set[frozenset[str]]) -> str:
    """Distinct letters in random order, drawn until their set is not in `exclude`."""
    while True:
        letters = "".join(rng.sample(LETTERS, rng.randint(MIN_LETTERS, MAX_LETTERS)))
        if frozenset(letters) not in exclude:
            return letters


def _swap(letters: str, i: int, j: int) -> str:
    chars = list(letters)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def near_miss(sorted_letters: str, kind: str, rng: random.Random) -> str:
    """A wrong answer as long as `sorted_letters`: its letters out of order, or sorted with one letter wrong.

    Args:
        sorted_letters: distinct letters in alphabetical order, at least 3 of them.
        kind: one of `REJECTED_KINDS`.
        rng: source of randomness.
    """
    n = len(sorted_letters)
    if kind == "adjacent_swap":
        i = rng.randrange(n - 1)
        return _swap(sorted_letters, i, i + 1)
    if kind == "nonadjacent_swap":
        i, j = sorted(rng.sample(range(n), 2))
        while j - i < 2:
            i, j = sorted(rng.sample(range(n), 2))
        return _swap(sorted_letters, i, j)
    if kind == "shuffle":
        shuffled = sorted_letters
        while shuffled == sorted_letters:
            shuffled = "".join(rng.sample(sorted_letters, n))
        return shuffled
    if kind == "foreign_letter":
        i = rng.randrange(n)
        outsider = rng.choice([c for c in LETTERS if c not in sorted_letters])
        return "".join(sorted(sorted_letters[:i] + outsider + sorted_letters[i + 1:]))
    if kind == "repeated_letter":
        i = rng.randrange(1, n)  # letter i becomes a copy of letter i - 1: still in order, one letter lost
        return sorted_letters[:i] + sorted_letters[i - 1] + sorted_letters[i + 1:]
    raise ValueError(f"kind must be one of {REJECTED_KINDS}, got {kind!r}")


def make_pairs(n: int, seed: int, exclude: set[frozenset[str]] | None = None) -> list[dict[str, str]]:
    """`n` preference rows {"prompt", "chosen", "rejected"} for the sorting task.

    Args:
        n: number of rows.
        seed: seed of the `random.Random` that draws everything; the same seed gives the same rows.
        exclude: letter sets never used as a prompt (pass the val sets when drawing train).
    """
    rng = random.Random(seed)
    exclude = exclude or set()
    rows = []
    for _ in range(n):
        letters = _random_letters(rng, exclude)
        answer = "".join(sorted(letters))
        kind = rng.choice(REJECTED_KINDS)
        rows.append({
            "prompt": format_prompt(letters),
            "chosen": format_response(answer),
            "rejected": format_response(near_miss(answer, kind, rng)),
        })
    return rows


def letter_sets(rows: list[dict[str, str]]) -> set[frozenset[str]]:
    return {frozenset(prompt_letters(row["prompt"])) for row in rows}


def make_splits() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The committed (train, val) rows. Val is drawn first so train can avoid its letter sets."""
    val = make_pairs(N_VAL, VAL_SEED)
    train = make_pairs(N_TRAIN, TRAIN_SEED, exclude=letter_sets(val))
    return train, val


def to_jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    # newline="\n" keeps the file byte-identical on Windows too.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(to_jsonl(rows))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character, special tokens last (as GPT-2 has EOS last).

    Covers lowercase letters, digits, space, newline and some punctuation; any other character maps
    to `<unk>` (a separate token, so an unknown character never reads as end of text).
    """
    chars = string.ascii_lowercase + string.digits + " \n:.,;!?'\"-()"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab[UNK], vocab[EOS] = len(chars), len(chars) + 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # "[\s\S]" is any single character; "." skips newlines, leaving "\n\n" as one (unknown) piece.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without the default separating spaces
    # No post-processor: tokenizer(...) adds no BOS/EOS, as with GPT-2. No pad token on purpose.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=UNK,
        model_max_length=64,
        clean_up_tokenization_spaces=False,  # it would turn " ," into "," and break round trips
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = MODEL_SEED) -> LlamaForCausalLM:
    """A freshly initialised ~0.1M-parameter Llama whose vocabulary is the tokenizer's."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,  # GPT-2-like: one table maps ids in and logits out
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _sft_batch(tokenizer: PreTrainedTokenizerFast, rng: random.Random, batch_size: int,
               sorted_share: float, exclude: set[frozenset[str]]) -> dict[str, torch.Tensor]:
    """Prompt + response + EOS rows, right-padded; a `sorted_share` of responses are sorted, the rest random.

    Returns input_ids, attention_mask and labels, each (B, T); labels are IGNORE_INDEX on the prompt
    and on padding, so the loss covers the response and its EOS only.
    """
    eos = tokenizer.eos_token_id
    sequences = []
    for _ in range(batch_size):
        letters = _random_letters(rng, exclude)
        shuffled = "".join(rng.sample(letters, len(letters)))
        answer = "".join(sorted(letters)) if rng.random() < sorted_share else shuffled
        prompt_ids = tokenizer(format_prompt(letters), add_special_tokens=False).input_ids
        sequences.append((prompt_ids, tokenizer(format_response(answer), add_special_tokens=False).input_ids + [eos]))
    return pad_and_label(sequences, pad_token_id=eos)  # pad = EOS; the attention mask hides it


def sft_warmup(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, steps: int = SFT_STEPS,
               seed: int = SFT_SEED, batch_size: int = 64, lr: float = 3e-3,
               sorted_share: float = SFT_SORTED_SHARE, anneal_fraction: float = SFT_ANNEAL_FRACTION,
               exclude: set[frozenset[str]] | None = None) -> list[float]:
    """Supervised warm-up in place: answer with the prompt's letters in any order, then EOS.

    Sorted responses early on get the model past its unigram plateau; they are phased out so that the
    finished model has no preference for sorted order (see the module docstring).

    Args:
        model: the model to train, in place.
        tokenizer: the tokenizer from `build_tokenizer`.
        steps: optimizer steps.
        seed: seeds both the data (`random.Random`) and torch.
        batch_size: sequences per step.
        lr: peak AdamW learning rate, decayed linearly to zero.
        sorted_share: share of sorted responses at the first step (the others are random orders).
        anneal_fraction: share of the steps over which `sorted_share` decays linearly to zero.
        exclude: letter sets never trained on (pass the val sets to keep val unseen).

    Returns:
        The training loss of every step.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    losses = []
    for step in range(steps):
        share = sorted_share * max(0.0, 1 - step / (anneal_fraction * steps))
        loss = model(**_sft_batch(tokenizer, rng, batch_size, share, exclude or set())).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def generate_responses(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[str],
                       do_sample: bool = False) -> list[str | None]:
    """Each prompt's generated response text, or None where no EOS came within the length budget."""
    responses: list[str | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    eos = tokenizer.eos_token_id
    # Prompts of one length batch without padding, so no left-padding logic is needed here.
    for indices in by_length.values():
        input_ids = torch.tensor([tokenizer(prompts[i], add_special_tokens=False).input_ids for i in indices])
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=do_sample,
                             max_new_tokens=MAX_LETTERS + 2, pad_token_id=eos, eos_token_id=eos)
        for i, new in zip(indices, out[:, input_ids.shape[1]:].tolist()):
            if eos in new:
                responses[i] = tokenizer.decode(new[:new.index(eos)])
    return responses


def generation_stats(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]],
                     do_sample: bool = False) -> dict[str, float]:
    """Share of responses that are a permutation of the prompt's letters (then EOS), and that are sorted."""
    responses = generate_responses(model, tokenizer, [row["prompt"] for row in rows], do_sample)
    permutation = sorted_ = 0
    for row, response in zip(rows, responses):
        letters = prompt_letters(row["prompt"])
        if response is not None and sorted(response) == sorted(format_response(letters)):
            permutation += 1
            sorted_ += response == row["chosen"]
    return {"permutation": permutation / len(rows), "sorted": sorted_ / len(rows)}


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    tokenizer.save_pretrained(out)
    # transformers 5 records its own class name, which transformers 4 cannot resolve; both load this one.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the sort-tiny quickstart assets.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    parser.add_argument("--sft-steps", type=int, default=SFT_STEPS, help="warm-up steps (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    train, val = make_splits()
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(val, args.out / "val.jsonl")

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    start = time.perf_counter()
    losses = sft_warmup(model, tokenizer, args.sft_steps, exclude=letter_sets(val))
    print(f"SFT: {args.sft_steps} steps in {time.perf_counter() - start:.1f} s, final loss {losses[-1]:.3f}")
    for do_sample, name in ((False, "greedy"), (True, "sampled")):
        stats = generation_stats(model, tokenizer, val, do_sample)
        print(f"{name} on val prompts: {stats['permutation']:.1%} permutations, {stats['sorted']:.1%} sorted")

    _save_tokenizer(tokenizer, args.out)
    model.save_pretrained(args.out)  # float32 safetensors
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
