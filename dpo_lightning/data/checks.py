"""The checks that stop a run with our own error: the data module's arguments at construction (each error names the
flag and the fix), a prepared split's drops at setup, and a stream's rows as they come.
"""

from collections import Counter
from typing import Any

from datasets import IterableDataset

from dpo_lightning.data.formats import FORMATS
from dpo_lightning.data.rows import RESERVED
from dpo_lightning.data.rules import drop_error
from dpo_lightning.data.summary import format_summary

_TABLE = "The bad-input table in docs/data.md says what each reason means and how to fix it"


def check_arguments(hp: dict[str, Any]) -> None:
    """The data module's arguments, checked at construction: each error names the flag and the fix."""
    if not 0 < hp.max_prompt_length < hp.max_length:
        raise ValueError(f"--data.max_prompt_length must be in (0, max_length={hp.max_length}) so every "
                         f"response keeps at least one token, got {hp.max_prompt_length}")
    if hp.truncation_mode not in ("keep_end", "keep_start"):
        raise ValueError(f"--data.truncation_mode must be 'keep_end' or 'keep_start', got {hp.truncation_mode!r}")
    if hp.dataset_format != "auto" and hp.dataset_format not in FORMATS:
        raise ValueError(f"--data.dataset_format must be 'auto' or one of {FORMATS}, got {hp.dataset_format!r}")
    if not 0.0 <= hp.eval_fraction < 1.0:
        raise ValueError(f"--data.eval_fraction must be in [0, 1), got {hp.eval_fraction}")
    if hp.streaming and hp.eval_fraction:
        raise ValueError("--data.eval_fraction cannot carve a stream: give eval_dataset or eval_split")
    for name in ("prefix_sharing", "packing"):
        if hp[name] not in (True, False, "auto"):
            raise ValueError(f"--data.{name} must be true, false or auto, got {hp[name]!r}")
    if hp.packing is True and hp.prefix_sharing is False:
        raise ValueError("--data.packing packs shared-prefix rows: set --data.prefix_sharing true (or auto) too, "
                         "or packing false")
    if hp.packing_max_tokens is not None and (hp.packing is False or hp.packing_max_tokens <= 0):
        raise ValueError(f"--data.packing_max_tokens {hp.packing_max_tokens} needs --data.packing true (or auto) "
                         "and a value > 0")
    if set(hp.chat_template_kwargs or {}) & RESERVED:
        raise ValueError(f"--data.chat_template_kwargs {dict(hp.chat_template_kwargs)} sets "
                         f"{sorted(set(hp.chat_template_kwargs) & RESERVED)}, which the data rules set themselves "
                         "(tools: a `tools` column gives them, row by row): give only the chat template's own "
                         "variables, e.g. {enable_thinking: false}")
    if hp.dataset_num_proc is not None and hp.dataset_num_proc < 1:
        raise ValueError(f"--data.dataset_num_proc must be >= 1 (or null for one process), got {hp.dataset_num_proc}")


def check_drops(summary: dict[str, Any], max_drop_fraction: float | None, label: str) -> None:
    """A prepared split's drops: none kept, or more than `max_drop_fraction` dropped, is an error with the counts."""
    if summary["kept"] == 0:
        raise ValueError(f"no usable {label} rows left: {format_summary(summary)}. {_TABLE} (strict: true names the "
                         "first row)")
    dropped = summary["rows"] - summary["kept"]
    if max_drop_fraction is not None and dropped > max_drop_fraction * summary["rows"]:
        raise ValueError(f"{dropped} of {summary['rows']} {label} rows dropped, over max_drop_fraction="
                         f"{max_drop_fraction}: {summary['dropped']}")


def check_stream(prepared: IterableDataset, label: str) -> None:
    """A stream's rows are not counted, but one with no usable row would have the Trainer run empty epochs, never
    reaching max_steps: read it up to its first usable row (usually its first), and raise, with the drop reasons
    seen, when the stream ends before one."""
    seen = Counter()
    for row in prepared:
        if not row["drop_reason"]:
            return
        seen[row["drop_reason"]] += 1
    dropped = ", ".join(f"{reason}: {n}" for reason, n in seen.items())
    raise ValueError(f"no usable {label} rows in the stream: {sum(seen.values())} rows read, dropped {{{dropped}}}. "
                     f"{_TABLE}")


def keep_row(reason: str, row_id: int, strict: bool, stage: str) -> bool:
    """A streamed row's filter: kept without a drop reason; with one, under `strict`, its error."""
    if reason and strict:
        raise drop_error(reason, row_id, stage)
    return not reason
