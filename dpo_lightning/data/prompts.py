"""Online DPO's data: prompt-only rows (rules 1-3 for prompts), and their batches.

Online training reads a `prompt` column (text, or messages rendered with the chat template) and nothing else; the
policy writes the responses during training (`online/sampler.py`); rule 3 cuts a long prompt before that, and each
pair's responses once it exists (`PreferenceDataModule.pair_batch`).
"""

import torch
from datasets import Dataset, Features, IterableDataset, LargeList, List, Value
from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.rows import RowKind, from_storage
from dpo_lightning.data.rules import PREPARED, cut_prompt, encode, fields_are_text, template_arguments, with_bos
from dpo_lightning.data.sources import STAGE_NAMES

# Prepared prompt rows: `PREPARED`'s, and the prompt's text as the row gave it (a conversation: its rendering), uncut:
# what a reward reads, as TRL's reward functions get the prompts as written, while the policy completes the cut ids.
PREPARED_PROMPTS = Features({**PREPARED, "prompt_text": Value("string")})


def train_kind(online: object) -> RowKind:
    """What a run's training split holds: prompts when it trains online (`DPOModule(online=...)` set), else pairs."""
    return "prompts" if online else "pairs"


def prompt_format(rows: Dataset | IterableDataset, tokenizer: PreTrainedTokenizerBase, stage: str) -> str:
    """A prompt-only split's format: "conversational" for messages (needs a chat template), else "explicit"."""
    feature = (rows.features or {}).get("prompt")
    if not isinstance(feature, (List, LargeList)):
        return "explicit"
    if not tokenizer.chat_template:
        raise ValueError(f"{STAGE_NAMES[stage]} prompts are conversations but the tokenizer has no chat_template: "
                         "use a chat model's tokenizer, or set tokenizer.chat_template before training")
    return "conversational"


def prepare_prompts(batch: dict[str, list], indices: list[int], dataset_format: str,
                    tokenizer: PreTrainedTokenizerBase, bos_token_id: int | None, max_prompt_length: int,
                    truncation_mode: str, chat_template_kwargs: dict | None = None, **unused) -> dict[str, list]:
    """Rules 1-3 for prompt-only rows (a batched `datasets.map` function, as `rules.prepare_rows`), as
    `PREPARED_PROMPTS` rows with no responses: a conversation rendered with `add_generation_prompt=True` and the run's
    `chat_template_kwargs`, one BOS, no special tokens added; a text prompt's special tokens' text ("</s>" typed
    in it) stays text, as in preference rows (`rules.fields_are_text`). A missing, non-text or empty prompt is
    dropped and counted.

    Rule 3 cuts a prompt longer than `max_prompt_length` here, before the policy completes it (counted as
    truncated): the pair then trains on the very prompt its completions were sampled from, and rule 3 on the
    pair (`PreferenceDataModule.pair_batch`) only cuts its responses, each of which keeps at least
    `max_length - max_prompt_length` tokens (rule 3 on preference rows keeps such a prompt whole where the pair
    fits; an online response is not written yet).
    """
    prompts, reasons = [], []
    for prompt, issue in zip(batch["prompt"], batch.get("source_issue") or [""] * len(indices)):
        prompt = from_storage({"prompt": prompt})["prompt"]
        ok = isinstance(prompt, list if dataset_format == "conversational" else str)
        reasons.append(issue or ("missing prompt" if prompt is None else "" if ok else
                                 f"not {'messages' if dataset_format == 'conversational' else 'text'} prompt"))
        if ok and dataset_format == "conversational":
            try:
                prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                                       **template_arguments({}, chat_template_kwargs))
            except Exception:  # noqa: BLE001 - as in rules.py: what the template raises on a row is the row's
                reasons[-1], prompt = "chat template error", ""
        prompts.append(prompt if ok else "")
    ids = [with_bos(p, bos_token_id) for p in encode(tokenizer, prompts, fields_are_text(dataset_format))]
    reasons = [reason or ("" if p else "empty prompt") for reason, p in zip(reasons, ids)]
    ids = [p if not reason else [] for p, reason in zip(ids, reasons)]
    n = len(indices)
    return {"row_id": indices, "drop_reason": reasons, "prompt_text": prompts,
            "prompt_input_ids": [cut_prompt(p, max_prompt_length, truncation_mode, bos_token_id) for p in ids],
            "chosen_input_ids": [[]] * n, "rejected_input_ids": [[]] * n, "length": [len(p) for p in ids],
            "truncated": [len(p) > max_prompt_length for p in ids], "chosen_longer": [False] * n}


def collate_prompts(rows: list[dict]) -> dict:
    """Prompt-only rows as a batch: their `prompt_input_ids` (lists, unpadded, cut by rule 3), `prompt_text` (the
    uncut text, for the reward) and `row_ids` (B,)."""
    return {"prompt_input_ids": [row["prompt_input_ids"] for row in rows],
            "prompt_text": [row["prompt_text"] for row in rows],
            "row_ids": torch.tensor([row["row_id"] for row in rows])}

