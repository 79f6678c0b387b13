"""What a prepared split says about itself: its token fingerprint and its data summary.

The fingerprint hashes the row ids and token ids a model will see, so a resumed run or a cached reference
table can tell the same pairs from other ones whatever produced them (data, tokenizer, truncation
settings). The summary counts rows kept, dropped by reason and truncated, and the length profile, as
printed at setup and kept in `PreferenceDataModule.summary`.
"""

import hashlib
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.sources import STAGE_NAMES

TOKEN_COLUMNS = ("row_id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
TRUNCATION_WARNING = 0.25  # the share of a split's rows cut by rule 3 above which setup warns


def fingerprint(data: Dataset) -> str:
    """sha256 of the rows' ids and token ids, in order: equal exactly when a model would see the same pairs.

    It covers the data, the tokenizer and the tokenization settings by their result, and is read from
    the Arrow buffers (about a second per million rows), so it is cheap enough to check on every resume.
    """
    digest = hashlib.sha256()
    for table in data.select_columns(list(TOKEN_COLUMNS)).with_format("arrow").iter(batch_size=65_536):
        for name in TOKEN_COLUMNS:
            column = table.column(name).combine_chunks()
            if name != "row_id":  # lists: their lengths, then their values
                digest.update(np.asarray(pc.list_value_length(column), dtype=np.int64).tobytes())
                column = column.flatten()
            digest.update(np.asarray(column, dtype=np.int64).tobytes())
    return digest.hexdigest()


def summarize(prepared: Dataset, max_length: int) -> dict[str, Any]:
    """Rows read, kept, dropped by reason, truncated, length percentiles as read (before truncation) and as
    trained (prompt + the longer response, after rules 1-3), length bias.

    Read from the Arrow columns of `prepare_rows`' output, kept and dropped rows alike (a row-by-row
    read of 20,000 rows takes seconds).
    """
    table = prepared.select_columns(["drop_reason", "length", "truncated", "chosen_longer", *TOKEN_COLUMNS[1:]]
                                    ).with_format("arrow")[:]
    reasons = table.column("drop_reason").to_pylist()
    kept = np.asarray([not reason for reason in reasons], dtype=bool)
    column = {name: table.column(name).to_numpy(zero_copy_only=False)[kept] for name in table.column_names[1:4]}
    prompt, chosen, rejected = (np.asarray(pc.list_value_length(table.column(name).combine_chunks()).fill_null(0))[kept]
                                for name in TOKEN_COLUMNS[1:])
    return {"rows": len(reasons), "kept": int(kept.sum()), "dropped": dict(Counter(r for r in reasons if r)),
            "truncated": int(column["truncated"].sum()), "length_p50_p95_max": _profile(column["length"]),
            "trained_p50_p95_max": _profile(prompt + np.maximum(chosen, rejected)),
            "chosen_longer": int(column["chosen_longer"].sum()), "max_length": max_length}


def _profile(lengths: np.ndarray) -> list[int]:
    lengths = lengths if len(lengths) else np.zeros(1)
    return [int(np.percentile(lengths, 50)), int(np.percentile(lengths, 95)), int(lengths.max())]


def truncation_warning(summary: dict[str, Any], label: str) -> str | None:
    """The warning for a split whose rows rule 3 cuts in a large share (`TRUNCATION_WARNING`), else None: pairs cut
    to max_length, or online prompts cut to max_prompt_length before the policy completes them."""
    cut, kept = summary["truncated"], summary["kept"]
    if not kept or cut <= TRUNCATION_WARNING * kept:
        return None
    p50, _, top = summary["length_p50_p95_max"]
    if summary.get("prompts"):
        return (f"{cut} of {kept} {label} prompts ({cut / kept:.0%}) are cut to --data.max_prompt_length before the "
                f"policy completes them (rule 3); as read, the median prompt has {p50} tokens and the longest {top}. "
                "Raise --data.max_prompt_length (and --data.max_length) if the cut tokens matter")
    return (f"{cut} of {kept} {label} rows ({cut / kept:.0%}) are cut to max_length {summary['max_length']} "
            f"(rule 3: the prompt to max_prompt_length first, then the responses lose their ends); as read, the "
            f"median pair has {p50} tokens and the longest {top}. Raise --data.max_length (and "
            "--data.max_prompt_length) if the cut tokens matter")


def format_summary(summary: dict[str, Any]) -> str:
    dropped = ", ".join(f"{reason}: {n}" for reason, n in summary["dropped"].items()) or "none"
    p50, p95, top = summary["length_p50_p95_max"]
    t50, t95, t_top = summary.get("trained_p50_p95_max", summary["length_p50_p95_max"])
    return (f"{summary['rows']} rows, {summary['kept']} kept, dropped {{{dropped}}}, {summary['truncated']} "
            f"truncated to max_length {summary['max_length']}, tokens p50 {p50} / p95 {p95} / max {top} as read, "
            f"{t50} / {t95} / {t_top} as trained, chosen longer than rejected in {summary['chosen_longer']}"
            + (f"; schema: {summary['schema']}" if summary.get("schema") else "")
            + (f"; ignored columns: {', '.join(summary['ignored'])}" if summary.get("ignored") else ""))


def render(summary: dict[str, Any], stage: str, rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> str:
    """A prepared split's summary, its truncation warning and `rows` token by token: the `[masked]` prompt, then the
    trained tokens (an online run's prompts alone: the policy writes their responses)."""
    lines = [f"{stage}: {format_summary(summary)}"]
    lines += [f"warning: {warning}"] if (warning := truncation_warning(summary, STAGE_NAMES[stage])) else []
    for i, row in enumerate(rows):
        prompt = tokenizer.convert_ids_to_tokens(row["prompt_input_ids"])
        if summary.get("prompts"):
            lines += [f"--- row {i}: prompt {len(prompt)} tokens, completed by the policy during training",
                      f"{'prompt':>9}: [{'|'.join(prompt)}]"]
            continue
        lines.append(f"--- row {i}: prompt {len(prompt)} tokens (masked), responses trained")
        for side in ("chosen", "rejected"):
            tokens = tokenizer.convert_ids_to_tokens(row[f"{side}_input_ids"])
            lines.append(f"{side:>9}: [{'|'.join(prompt)}] {'|'.join(tokens)}")
    return "\n".join(lines)
