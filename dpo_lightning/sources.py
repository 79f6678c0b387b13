"""Reading preference rows from the sources users bring, into `prompt`/`chosen`/`rejected` columns.

Every source comes out as a `datasets.Dataset` (or `IterableDataset` when streaming) with only the
fields it has, under their canonical names (`prompt_column` etc. renamed), each holding text or, for
conversations, lists of `{"role", "content"}` messages. What cannot be read that way is refused here,
by our own code, naming the dataset (train/eval), the row, the field and the fix, before `datasets`,
pyarrow or pandas can fail on it deep inside:

- A list of rows, a dict of columns and .json/.jsonl files are read in Python, so a value of the wrong
  kind (a number, an object) in a text field is kept as a row to drop, `source_issue = "not text chosen"`,
  instead of making pyarrow fail on the whole column or `datasets` turn the column into JSON (which
  reads the string "1.5" back as the float 1.5). A text column's kind is its values' majority kind.
- .csv files are read with every column as text (a response "42" or "NA" stays the text it is).
- .parquet files and `datasets` objects keep their types; a field column that holds neither text nor
  messages is an error naming the column.
- An empty source, rows that are not dicts, invalid JSON, columns of unequal length: errors.
"""

import csv
import glob
import gzip
import json
import os
from collections import Counter
from typing import Any, Iterator, Union

import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, Features, IterableDataset, LargeList, List, Value, load_dataset

FIELDS = ("prompt", "chosen", "rejected")
PROMPT_ONLY = ("prompt",)  # online training's data: the policy writes the responses (online.py)
# A dataset given as: a hub name, a local file, folder, glob or list of files, an in-memory dict of
# columns or list of rows, or a `datasets` object.
DatasetSource = Union[str, dict, list, Dataset, DatasetDict]
STAGE_NAMES = {"train": "train", "val": "eval"}  # a split's name in messages, as the user names its argument
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_MESSAGES = List({"role": Value("string"), "content": Value("string")})
_SAMPLE = 100  # rows that decide a column's kind


def load_rows(source: DatasetSource, split: str = "train", name: str | None = None, data_dir: str | None = None,
              streaming: bool = False, columns: dict[str, str] | None = None,
              stage: str = "train", fields: tuple[str, ...] = FIELDS) -> Dataset | IterableDataset:
    """One split of preference rows from any supported source, with canonical field names.

    Local data files (.json, .jsonl, .parquet, .csv, optionally .gz; one path, a glob, or a list of paths)
    are read as a single split; any other string goes to `datasets.load_dataset(source, name,
    data_dir=..., split=...)`, which reads a hub dataset or a local folder of split files alike.

    Args:
        columns: field -> the source's column holding it (default: the field's own name).
        stage: "train" or "val", named in error messages.
        fields: the fields to read: `FIELDS`, or `PROMPT_ONLY` (other columns, chosen and rejected too, unread).
    """
    columns = {field: (columns or {}).get(field, field) for field in fields}
    label = STAGE_NAMES.get(stage, stage)
    if isinstance(source, dict) and not isinstance(source, DatasetDict):
        source = _columns_to_rows(source, label)
    if isinstance(source, list) and not _are_paths(source):
        return _from_python(source, columns, label)
    if isinstance(source, DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not in the {label} dataset; it has {sorted(source)}: "
                             f"set --data.{'eval_split' if stage == 'val' else 'split'}")
        source = source[split]
    if isinstance(source, Dataset):
        return _canonical(source, columns, label)
    files = _data_files(source)
    if files is None:
        rows = load_dataset(source, name, data_dir=data_dir, split=split, streaming=streaming)
    else:
        rows = _read_files(files, columns, label, streaming)
    return _canonical(rows, columns, label)


def _are_paths(items: list) -> bool:
    """Whether a list names data files (all strings that are files, or look like data file names)."""
    return bool(items) and all(isinstance(item, str) and (os.path.isfile(item) or _file_builder(item))
                               for item in items)


def _columns_to_rows(data: dict, label: str) -> list[dict]:
    lengths = {key: len(value) if isinstance(value, (list, tuple)) else None for key, value in data.items()}
    if None in lengths.values() or len(set(lengths.values())) > 1:
        raise ValueError(f"the {label} dataset, a dict of columns, needs one list per column, all of one length; "
                         f"got {lengths} (None: not a list)")
    return [dict(zip(data, values)) for values in zip(*data.values())]


def _file_builder(path: str) -> str | None:
    stem = path[:-3] if path.endswith(".gz") else path
    return _FILE_BUILDERS.get(os.path.splitext(stem)[1])


def _data_files(source: str | list[str]) -> list[str] | None:
    """The local data files `source` names, or None for a hub name or folder."""
    if isinstance(source, list):
        files = source
    elif glob.has_magic(source):
        files = sorted(glob.glob(source))
        if not files:
            raise FileNotFoundError(f"no data files match {source!r}: check the pattern")
    elif os.path.isfile(source):
        files = [source]
    else:
        return None
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"no data file at {missing[0]!r}")
    builders = {_file_builder(f) for f in files}
    if None in builders or len(builders) > 1:
        raise ValueError(f"{source}: files must share one type of {sorted(_FILE_BUILDERS)} (optionally .gz)")
    return files


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _read_files(files: list[str], columns: dict[str, str], label: str,
                streaming: bool) -> Dataset | IterableDataset:
    builder = _file_builder(files[0])
    if builder == "json" and not streaming:
        for path in files[1:]:  # a whole .json file that does not parse: raised here, not inside `datasets`
            next(_json_rows([path], label), None)
        sample = [row for _, row in zip(range(_SAMPLE), _json_rows(files, label))]
        if not sample:
            raise ValueError(f"the {label} dataset is empty: no rows in {files}")
        features = _features(sample, columns, label)
        # Cached by `datasets` under a name made of the files' paths, sizes and times: another process
        # (a DDP rank after `prepare_data`) reads the cache instead of the files.
        stamps = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]
        return Dataset.from_generator(_normalized, features=features, gen_kwargs=dict(
            files=files, stamps=stamps, columns=columns, features=features, label=label))
    if builder == "csv":
        with _open(files[0]) as f:
            header = f.readline()
            if not f.readline().strip():
                raise ValueError(f"the {label} dataset is empty: no rows in {files[0]}")
        names = next(csv.reader([header]))
        kwargs = dict(features=Features({c: Value("string") for c in names}), keep_default_na=False, na_values=[""])
    else:
        kwargs = {}
        if builder == "parquet" and not sum(pq.ParquetFile(f).metadata.num_rows for f in files):
            raise ValueError(f"the {label} dataset is empty: no rows in {files}")
    return load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)


class _NotJSON:
    """A JSON-lines line that does not parse: a row to drop as `not valid JSON`."""


def _json_rows(files: list[str], label: str) -> Iterator[Any]:
    """Each row of JSON-lines files (or .json files holding a list of rows), in order."""
    for path in files:
        with _open(path) as f:
            text = f.read()
        if path.removesuffix(".gz").endswith(".json") and text.lstrip().startswith("["):
            try:
                yield from json.loads(text)
                continue
            except json.JSONDecodeError as error:
                raise ValueError(f"{label} data {path}: not valid JSON ({error}): fix the file") from None
        for line in text.splitlines():
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield _NotJSON()


def _normalized(files, stamps, columns, features, label) -> Iterator[dict]:
    yield from _normalize(_json_rows(files, label), columns, features, label)


def _from_python(rows: list, columns: dict[str, str], label: str) -> Dataset:
    if not rows:
        raise ValueError(f"the {label} dataset is empty: no rows")
    features = _features(rows[:_SAMPLE], columns, label)
    return Dataset.from_list(list(_normalize(rows, columns, features, label)), features=features)


def require(names, columns: dict[str, str], label: str) -> None:
    """Raise unless the source's columns `names` hold chosen and rejected (under their mapped names), or for
    `PROMPT_ONLY` fields the prompt."""
    if tuple(columns) == PROMPT_ONLY and columns["prompt"] not in names:
        raise ValueError(f"{label} data has columns {sorted(names)}; online training reads prompts from a "
                         "'prompt' column: map yours with --data.prompt_column")
    if tuple(columns) != PROMPT_ONLY and {columns["chosen"], columns["rejected"]} - set(names):
        raise ValueError(f"{label} data has columns {sorted(names)}; expected 'chosen' and 'rejected' (and 'prompt'): "
                         "map yours with --data.prompt_column / chosen_column / rejected_column")


def _features(sample: list, columns: dict[str, str], label: str) -> Features:
    """Each field present in `sample`: text, or messages where most of its values are lists."""
    rows = [row for row in sample if isinstance(row, dict)]
    if not rows:  # nothing but rows to drop ("not a dict"): the summary's error counts them
        text = PROMPT_ONLY if tuple(columns) == PROMPT_ONLY else ("chosen", "rejected")
        return Features({**{field: Value("string") for field in text}, "source_issue": Value("string")})
    require({name for row in rows for name in row}, columns, label)
    features = {}
    for field, column in columns.items():
        kinds = Counter(type(row[column]) is list for row in rows if row.get(column) is not None)
        if any(column in row for row in rows):
            features[field] = _MESSAGES if kinds[True] > kinds[False] else Value("string")
    return Features({**features, "source_issue": Value("string")})


def _normalize(rows, columns: dict[str, str], features: Features, label: str) -> Iterator[dict]:
    """Rows with only the fields, each value of its column's kind or None with `source_issue` saying why."""
    for row in rows:
        if not isinstance(row, dict):  # counted, not raised: `datasets` would wrap an error raised in here
            yield {**{field: None for field in features}, "source_issue": "not valid JSON" if isinstance(
                row, _NotJSON) else "not a dict"}
            continue
        out, issue = {}, ""
        for field in features:
            if field == "source_issue":
                continue
            value = row.get(columns[field])
            if features[field] == _MESSAGES:
                ok = isinstance(value, list) and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value)
                value, problem = ([{"role": m["role"], "content": m["content"]} for m in value], "") if ok else \
                    (None, "not messages")
            else:
                value, problem = (value, "") if isinstance(value, str) else (None, "not text")
            if row.get(columns[field]) is None:
                problem = ""  # a missing value is the row checks' "missing", not a reading problem
            issue = issue or (f"{problem} {field}" if problem else "")
            out[field] = value
        yield {**out, "source_issue": issue}


def _canonical(rows: Dataset | IterableDataset, columns: dict[str, str], label: str) -> Dataset | IterableDataset:
    """Only the field columns, under their canonical names; a column of another type is an error."""
    names = rows.column_names or list(next(iter(rows)))  # a stream may not know its columns yet
    if isinstance(rows, Dataset) and not len(rows):
        raise ValueError(f"the {label} dataset is empty: no rows")
    require(names, columns, label)
    keep = {column: field for field, column in columns.items() if column in names}
    if "source_issue" in names:
        keep["source_issue"] = "source_issue"
    rows = rows.select_columns(list(keep)).rename_columns({c: f for c, f in keep.items() if c != f})
    for field, feature in (rows.features or {}).items():
        text = isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null")
        if field != "source_issue" and not text and not isinstance(feature, (List, LargeList)):
            raise ValueError(f"every {label} row: field {field!r} (column {columns[field]!r}) holds {feature}, not "
                             f"text: cast it, e.g. dataset.cast_column({columns[field]!r}, Value('string')), or fix "
                             "the source")
    return rows
