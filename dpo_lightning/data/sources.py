"""Reading preference rows from the sources users bring, into the row model (rows.py).

Every source comes out as a `datasets.Dataset` (or `IterableDataset` when streaming) in the one row model: the
fields it has under their canonical names (`prompt_column` etc. renamed), each text or a list of messages that
keep every key they have, and the `tools` / `chat_template_kwargs` columns where present. Each reader hands its
rows to `rows.canonical_row`, so the same rows give the same row model from every source kind. What cannot be
read that way is refused here, by our own code, naming the dataset (train/eval), the row, the field and the fix,
before `datasets`, pyarrow or pandas can fail on it deep inside:

- A list of rows, a dict of columns and .json/.jsonl/.csv files (streamed too) are read in Python, so a value of the
  wrong kind (a number, an object) in a text field is kept as a row to drop, `source_issue = "not text
  chosen"`, instead of making pyarrow fail on the whole column or `datasets` turn the column into JSON
  (which reads the string "1.5" back as the float 1.5). A text column's kind is its values' majority
  kind. CSV cells are text (a response "42" or "NA" stays the text it is); an empty cell is missing.
- Files (files.py) are read as UTF-8 with an optional byte-order mark, and every cache of rows read from files is
  keyed by the files' content, never by path and modification time.
- .parquet files and `datasets` objects keep their types; a field column that holds neither text nor
  messages is an error naming the column. Text columns are renamed in Arrow; messages and template
  arguments are mapped row by row into the row model.
- A `transform` maps each raw row first (None: a counted drop, `dropped by transform`); columns that
  match a public schema (schemas.py) are mapped by it, else by `prompt_column` etc.
- An empty source, invalid JSON, columns of unequal length, images, rows of another kind than pairs: errors.
- Every column no rule reads is recorded (`rows.Reading`), for the data summary and its warnings. A source's
  columns are all its rows' columns, whatever its kind: Arrow knows them (parquet, `datasets`), a list or a file
  is surveyed in one pass (`_survey`); with a transform on Arrow rows, or a hub stream that does not declare its
  columns, the first 100 rows' columns.
"""

import glob
import hashlib
import importlib
import os
import warnings
from typing import Callable, Iterable, Iterator, Union

from datasets import Dataset, DatasetDict, IterableDataset, LargeList, List, Value, load_dataset

from dpo_lightning.data import files, rows as row_model, schemas
from dpo_lightning.data.rows import (FIELD_NAMES, FIELDS_OF, TEMPLATE_COLUMNS, Reading, RowKind,
                                     canonical_row, columns_to_rows, features, refuse)
from dpo_lightning.data.schemas import Schema, detect_schema
from dpo_lightning.utils.locate import local, located_data

# A dataset given as: a hub name, a local file, folder, glob or list of files, an in-memory dict of
# columns or list of rows, or a `datasets` object.
DatasetSource = Union[str, dict, list, Dataset, DatasetDict]
STAGE_NAMES = {"train": "train", "val": "eval"}  # a split's name in messages, as the user names its argument
_SAMPLE = 100  # rows that decide a column's kind
# The code that reads rows, part of the cache name of rows read from files: `datasets` names a generator's cache
# by the generator's own code, not by the code it calls, so a new row model would reuse rows read by the old one.
READING_CODE = hashlib.sha256(b"".join(open(path, "rb").read() for path in (
    __file__, files.__file__, row_model.__file__, schemas.__file__))).hexdigest()


def load_rows(source: DatasetSource, split: str = "train", name: str | None = None, data_dir: str | None = None,
              streaming: bool = False, columns: dict[str, str] | None = None, stage: str = "train",
              transform: Callable[[dict], dict | None] | None = None, chat: bool = True,
              kind: RowKind = "pairs", label_column: str | None = None) -> tuple[Dataset | IterableDataset,
                                                                                          Reading]:
    """One split of preference rows from any supported source, in the row model (rows.py), and what reading found.

    Paths are found as `utils.locate` says (here, else shipped with the package; one not found stops here).
    Local data files (.json, .jsonl, .parquet, .csv, optionally .gz; one path, a glob, or a list of paths)
    are read as a single split; any other string goes to `datasets.load_dataset(source, name,
    data_dir=..., split=...)`, which reads a hub dataset or a local folder of split files alike. Each raw
    row goes through `transform` (None: dropped and counted), then a public schema's mapping when the
    columns match one (schemas.py), else the column mapping.

    Args:
        columns: field -> the source's column holding it (default: the field's own name).
        stage: "train" or "val", named in error messages.
        transform: a function of one raw row (a dict) returning the row to use, or None to drop it.
        chat: whether the tokenizer has a chat template (a schema may build messages for it).
        kind: what the rows hold: "pairs", or "prompts" (online training: other columns unread, no schema).
        label_column: the label a schema of two responses follows, where its set has two (schemas.py).

    Returns:
        The rows, and the `Reading`: the public schema their columns matched ("" if none), the columns unread.
    """
    columns = {field: (columns or {}).get(field, field) for field in FIELDS_OF[kind]}
    source = located_data(source, "--data.eval_dataset" if stage == "val" else "--data.dataset")  # or not found
    plan = dict(columns=columns, label=STAGE_NAMES.get(stage, stage), transform=transform, chat=chat, kind=kind,
                label_column=label_column)
    if isinstance(source, dict) and not isinstance(source, DatasetDict):
        source = columns_to_rows(source, f"the {plan['label']} dataset")
    if isinstance(source, list) and not _are_paths(source):
        return _from_python(source, plan)
    if isinstance(source, str) and os.path.isdir(source):  # a folder save_to_disk wrote, or one of split files
        saved = files.saved_dataset(source)
        if saved is None:
            _require_split(files.folder_splits(source, name, data_dir), split, stage)
        else:
            source = saved
    if isinstance(source, DatasetDict):
        _require_split(list(source), split, stage)
        source = source[split]
    if isinstance(source, Dataset):
        return _from_arrow(source, plan)
    paths = files.data_files(source)
    if paths is None:
        return _from_arrow(load_dataset(source, name, data_dir=data_dir, split=split, streaming=streaming), plan)
    if files.file_builder(paths[0]) in ("json", "csv"):
        return _from_files(paths, plan, streaming)
    return _from_arrow(files.load_parquet(paths, plan["label"], streaming), plan)


def _require_split(splits: list[str], split: str, stage: str) -> None:
    if split not in splits:
        raise ValueError(f"split {split!r} not in the {STAGE_NAMES.get(stage, stage)} dataset; it has "
                         f"{sorted(splits)}: set --data.{'eval_split' if stage == 'val' else 'split'}")


def single_split(source: DatasetSource) -> bool:
    """Whether `source` holds one split only (rows, a `Dataset` or one saved to disk, local data files): it has no
    `eval_split`."""
    if isinstance(source, (dict, list, Dataset)) and not isinstance(source, DatasetDict):
        return True
    return isinstance(source, str) and (glob.has_magic(source) or os.path.isfile(local(source))
                                        or os.path.isfile(os.path.join(local(source), "state.json")))


def resolve_transform(transform: str | Callable | None) -> Callable | None:
    """`--data.transform`: a callable, or the import path `package.module.function` of one."""
    if transform is None or callable(transform):
        return transform
    module, _, function = transform.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), function) if module else None
    except (ImportError, AttributeError) as error:
        found, reason = None, f" ({error})"
    else:
        reason = ""
    if not callable(found):
        raise ValueError(f"--data.transform {transform!r}: no function at that import path{reason}; give "
                         "`package.module.function` of a function importable from here (on PYTHONPATH), which "
                         "maps one raw row (a dict) to a row or None")
    return found


def _are_paths(items: list) -> bool:
    """Whether a list names data files (all strings that are files, or look like data file names)."""
    return bool(items) and all(isinstance(item, str) and (os.path.isfile(item) or files.file_builder(item))
                               for item in items)


def _survey(rows: Iterable, plan: dict) -> tuple[set[str], list]:
    """All `rows`' columns (each row through the transform) and the sample that decides their kinds: the first 100
    rows, and the first row giving a value to each column they leave without one. A pass over every row, so the
    columns read from a list or a file are all its rows' columns, as Arrow's are (parquet, `Dataset`)."""
    names, valued, sample, transform = set(), set(), [], plan["transform"]
    for row in rows:
        raw = transform(row) if transform is not None and isinstance(row, dict) else row
        if not isinstance(raw, dict):
            sample += [row] if len(sample) < _SAMPLE else []
            continue
        names.update(raw)
        given = {name for name, value in raw.items() if value is not None}
        if len(sample) < _SAMPLE or given - valued:
            sample.append(row)
            valued |= given
    if not sample:
        raise ValueError(f"the {plan['label']} dataset is empty: no rows")
    return names, sample


def _from_files(paths: list[str], plan: dict, streaming: bool) -> tuple[Dataset | IterableDataset, Reading]:
    """.json/.jsonl/.csv files, read in Python (files.py), streamed or not: a stream reads them as it goes."""
    names, sample = _survey(files.file_rows(paths, plan["label"]), plan)
    args, reading = _planned(sample, names, plan)
    generate = dict(paths=paths, label=plan["label"], args=args)
    if streaming:
        return IterableDataset.from_generator(_generate, features=args["features"], gen_kwargs=generate), reading
    # Cached by `datasets` under a name made of its arguments, the files' content digest among them:
    # another process (a DDP rank after `prepare_data`) reads the cache instead of the files.
    return Dataset.from_generator(_generate, features=args["features"], gen_kwargs=dict(
        generate, digest=files.digest(paths), code=READING_CODE)), reading


def _generate(paths: list[str], label: str, args: dict, digest: str = "", code: str = "") -> Iterator[dict]:
    for row in files.file_rows(paths, label):
        yield canonical_row(row, **args)


def _from_python(rows: list, plan: dict) -> tuple[Dataset, Reading]:
    names, sample = _survey(rows, plan)
    args, reading = _planned(sample, names, plan)
    return Dataset.from_list([canonical_row(row, **args) for row in rows], features=args["features"]), reading


def _from_arrow(rows: Dataset | IterableDataset, plan: dict) -> tuple[Dataset | IterableDataset, Reading]:
    """Typed rows: text columns renamed and type-checked in Arrow; messages, template arguments, a transform or
    a schema mapped row by row into the row model."""
    names = rows.column_names or list(next(iter(rows)))  # a stream may not know its columns yet
    if isinstance(rows, Dataset) and not len(rows):
        raise ValueError(f"the {plan['label']} dataset is empty: no rows")
    sample = list(rows.take(_SAMPLE))
    # With a transform, or a stream that does not know its columns (a hub's JSON), the columns are those of the
    # first 100 rows (a pass over every row would be a second read).
    known = plan["transform"] is None and rows.column_names
    args, reading = _planned(sample, set(names) if known else _survey(sample, plan)[0], plan)
    if plan["transform"] is None and args["schema"] is None and _text_only(rows, plan["columns"], plan["label"]):
        return _canonical(rows, plan["columns"]), reading
    mapped = rows.map(canonical_row, fn_kwargs=args, remove_columns=names, features=args["features"],
                      **({} if isinstance(rows, IterableDataset) else {"desc": f"reading {reading.schema or 'rows'}"}))
    return mapped, reading


def _schema(names: set[str], plan: dict) -> Schema | None:
    if plan["kind"] == "prompts":  # a preference set's own prompt column serves as it is
        return None
    return detect_schema(names, plan["columns"], plan["label"], plan["label_column"])


def _planned(sample: list, names: set[str], plan: dict) -> tuple[dict, Reading]:
    """`canonical_row`'s arguments from a sample of raw rows (the schema their columns match, the row model's
    features) and the `Reading`: the schema's name, the columns nothing reads.

    Raises for a missing column and for data that cannot train; warns when text columns stand beside a missing
    prompt. `names`: the source's columns (after the transform).
    """
    transform = plan["transform"]
    raw = [transform(row) if transform is not None and isinstance(row, dict) else row for row in sample]
    schema = _schema(names, plan) if names else None
    refuse(names, raw, plan["label"], pairs=schema is not None or plan["kind"] == "prompts" or
           {plan["columns"]["chosen"], plan["columns"]["rejected"]} <= names)
    if schema is None and names:
        require(names, plan["columns"], plan["label"], plan["kind"])
        _warn_unused_text(raw, names, plan)
    mapped = [schema.map(row, plan["chat"]) if schema and isinstance(row, dict) else row for row in raw]
    columns = {field: (FIELD_NAMES if schema else plan["columns"])[field] for field in plan["columns"]}
    needed = FIELDS_OF["prompts"] if plan["kind"] == "prompts" else ("chosen", "rejected")
    args = dict(columns=plan["columns"], transform=transform, chat=plan["chat"], schema=schema,
                features=features(mapped, columns, needed))
    templates = TEMPLATE_COLUMNS if plan["kind"] == "pairs" else ()  # online prompts render without them
    reads = schema.reads(names) if schema else {*plan["columns"].values(), *templates}
    by_choice = schema.label_columns(names)[1] if schema and plan["label_column"] else set()
    mapped = any(column != field for field, column in plan["columns"].items())
    return args, Reading(schema.describe() if schema else "", tuple(sorted(names - reads - {"source_issue"})),
                         tuple(sorted(by_choice)), mapped)


def _warn_unused_text(rows: list, names: set[str], plan: dict) -> None:
    """Text columns beside a missing prompt: the prompt will come from chosen/rejected, perhaps wrongly."""
    columns = plan["columns"]
    if plan["kind"] == "prompts":
        return
    unused = sorted(name for name in names - set(columns.values()) - {"source_issue"}
                    if any(isinstance(row, dict) and isinstance(row.get(name), str) for row in rows))
    texts = any(isinstance(row, dict) and isinstance(row.get(columns["chosen"]), str) for row in rows)
    if columns["prompt"] not in names and unused and texts:  # (whole conversations need no prompt column)
        warnings.warn(f"{plan['label']} data has no {columns['prompt']!r} column but text columns {unused}: the "
                      "prompt will be taken from chosen/rejected themselves (hh or implicit format). If one of "
                      "them is the prompt, set --data.prompt_column; to build rows yourself, --data.transform",
                      stacklevel=2)


def require(names, columns: dict[str, str], label: str, kind: RowKind = "pairs") -> None:
    """Raise unless the source has the columns the fields map to: chosen and rejected, and a mapped prompt
    (for prompts alone: the prompt)."""
    if kind == "prompts":
        if columns["prompt"] not in names:
            raise ValueError(f"{label} data has columns {sorted(names)}; online training reads prompts from a "
                             f"{columns['prompt']!r} column: map yours with --data.prompt_column")
        return
    for field in ("chosen", "rejected", "prompt"):
        column = columns[field]
        if column != field and column not in names:
            raise ValueError(f"{label} data has no column {column!r} (--data.{field}_column); its columns are "
                             f"{sorted(names)}: set --data.{field}_column to one of them")
    if {columns["chosen"], columns["rejected"]} - set(names):
        labels = sorted(set(names) & set(schemas.LABELS))
        raise ValueError(f"{label} data has columns {sorted(names)}; expected 'chosen' and 'rejected' (and 'prompt'): "
                         + (f"its columns {labels} look like a preference label saying row by row which response "
                            "is preferred, which a fixed column mapping would not follow: build each pair from it "
                            "with --data.transform" if labels else
                            "map yours with --data.prompt_column / chosen_column / rejected_column, or turn each row "
                            "into one with --data.transform"))


def _text_only(rows: Dataset | IterableDataset, columns: dict[str, str], label: str) -> bool:
    """Whether the mapped columns are all text and no template arguments stand beside them, so that renaming them
    in Arrow gives the row model; raises for a field column that holds neither text nor messages."""
    if rows.features is None:  # a stream that does not know its types: mapped row by row
        return False
    kinds = {}
    for field, column in columns.items():
        feature = rows.features.get(column)
        if feature is None:
            continue
        kinds[field] = "text" if isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null") \
            else "messages" if isinstance(feature, (List, LargeList)) else None
        if kinds[field] is None:
            raise ValueError(f"every {label} row: field {field!r} (column {column!r}) holds {_what(feature, column)}")
    return set(kinds.values()) <= {"text"} and not set(TEMPLATE_COLUMNS) & set(rows.features)


def _what(feature, column: str) -> str:
    """What a field column of neither text nor messages holds, and the fix: a cast for a value; a transform for
    objects (a cast to text cannot work on a struct), ShareGPT's messages named as such."""
    if not isinstance(feature, dict):
        return f"{feature}, not text: cast it, e.g. dataset.cast_column({column!r}, Value('string')), or fix the source"
    if {"from", "value"} <= set(feature):
        return ("ShareGPT-style messages {'from', 'value'}, not text or messages: map each to {'role', 'content'} "
                "(human: user, gpt: assistant) with --data.transform")
    return f"objects {feature}, not text or messages: turn them into one or the other with --data.transform"


def _canonical(rows: Dataset | IterableDataset, columns: dict[str, str]) -> Dataset | IterableDataset:
    """Only the field columns, under their canonical names."""
    names = rows.column_names or list(next(iter(rows)))
    keep = {column: field for field, column in columns.items() if column in names}
    if "source_issue" in names:
        keep["source_issue"] = "source_issue"
    return rows.select_columns(list(keep)).rename_columns({c: f for c, f in keep.items() if c != f})
