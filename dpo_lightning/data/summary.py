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

TOKEN_COLUMNS = ("row_id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


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
    """Rows read, kept, dropped by reason, truncated, length percentiles (before truncation), length bias.

    Read from the Arrow columns of `prepare_rows`' output, kept and dropped rows alike (a row-by-row
    read of 20,000 rows takes seconds).
    """
    table = prepared.select_columns(["drop_reason", "length", "truncated", "chosen_longer"]).with_format("arrow")[:]
    reasons = table.column("drop_reason").to_pylist()
    kept = np.asarray([not reason for reason in reasons], dtype=bool)
    column = {name: table.column(name).to_numpy(zero_copy_only=False)[kept] for name in table.column_names[1:]}
    lengths = column["length"] if kept.any() else np.zeros(1)
    return {"rows": len(reasons), "kept": int(kept.sum()), "dropped": dict(Counter(r for r in reasons if r)),
            "truncated": int(column["truncated"].sum()),
            "length_p50_p95_max": [int(np.percentile(lengths, 50)), int(np.percentile(lengths, 95)),
                                   int(lengths.max())],
            "chosen_longer": int(column["chosen_longer"].sum()), "max_length": max_length}


def format_summary(summary: dict[str, Any]) -> str:
    dropped = ", ".join(f"{reason}: {n}" for reason, n in summary["dropped"].items()) or "none"
    p50, p95, top = summary["length_p50_p95_max"]
    return (f"{summary['rows']} rows, {summary['kept']} kept, dropped {{{dropped}}}, {summary['truncated']} "
            f"truncated to max_length {summary['max_length']}, tokens p50 {p50} / p95 {p95} / max {top}, "
            f"chosen longer than rejected in {summary['chosen_longer']}"
            + (f"; schema: {summary['schema']}" if summary.get("schema") else "")
            + (f"; ignored columns: {', '.join(summary['ignored'])}" if summary.get("ignored") else ""))
