"""Local data files: which files a source names, how they are opened, read (JSON lines, .json, CSV) and cached.

Files are read as UTF-8 with an optional byte-order mark; every cache of rows read from files is keyed by the
files' content (`digest`), never by path and modification time. .parquet files go through `datasets`' own
reader (their Arrow types kept); .json/.jsonl/.csv rows are read here, in Python (`file_rows`), streamed or not, so
a value keeps the type it is written with.
"""

import csv
import glob
import gzip
import hashlib
import json
import os
from typing import Any, Iterator

import datasets
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_dataset_builder

from dpo_lightning.data.rows import NotJSON, columns_to_rows, message_problem

# A file's type by its extension, in any case (".JSONL"), optionally gzipped; .ndjson is JSON lines by another name.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv"}


def file_builder(path: str) -> str | None:
    stem = path.lower().removesuffix(".gz")
    return FILE_BUILDERS.get(os.path.splitext(stem)[1])


def data_files(source: str | list[str]) -> list[str] | None:
    """The local data files `source` names, or None for a hub name or folder."""
    if isinstance(source, list):
        files = source
    elif glob.has_magic(source):
        files = sorted(glob.glob(source))  # one at least: `sources.load_rows` found it (`located_data`)
    elif os.path.isfile(source):
        files = [source]
    else:
        return None
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"no data file at {missing[0]!r}")
    builders = {file_builder(f) for f in files}
    if None in builders or len(builders) > 1:
        raise ValueError(f"{source}: files must share one type of {sorted(FILE_BUILDERS)} (optionally .gz)")
    return files


def saved_dataset(path: str) -> Dataset | DatasetDict | None:
    """A folder `save_to_disk` wrote (a `DatasetDict`'s, with its own split names, or a `Dataset`'s), read with
    `load_from_disk`; None for any other folder (`load_dataset` would read its Arrow files as split files)."""
    marks = ("dataset_dict.json", "state.json")
    return datasets.load_from_disk(path) if any(os.path.isfile(os.path.join(path, m)) for m in marks) else None


def folder_splits(path: str, name: str | None, data_dir: str | None) -> list[str]:
    """The splits a local folder of data files holds, as `load_dataset` names them from its file names (e.g.
    data/train_prefs-00000-of-00001.parquet: "train_prefs"), without reading the files."""
    builder = load_dataset_builder(path, name, data_dir=data_dir)
    return sorted(builder.config.data_files or builder.info.splits or [])


def open_text(path: str):
    # utf-8-sig: a UTF-8 byte-order mark (Excel's "CSV UTF-8", some Windows tools) is not part of the text.
    return gzip.open(path, "rt", encoding="utf-8-sig", newline="") if path.lower().endswith(".gz") else \
        open(path, encoding="utf-8-sig", newline="")


def digest(files: list[str]) -> str:
    """sha256 of the files' bytes: every cache of rows read from them is keyed by what they hold, not by
    path and modification time (`cp -p` or `rsync -t` puts an old time back on new rows)."""
    sha = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
    return sha.hexdigest()


def load_parquet(files: list[str], label: str, streaming: bool) -> Dataset | IterableDataset:
    """.parquet files through `datasets`' own reader, keeping their Arrow types; cached by content."""
    if not sum(pq.ParquetFile(f).metadata.num_rows for f in files):
        raise ValueError(f"the {label} dataset is empty: no rows in {files}")
    if streaming:
        return load_dataset("parquet", data_files=files, split="train", streaming=True)
    cache_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "dpo_lightning_files", digest(files)[:32])
    return load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)


def file_rows(files: list[str], label: str) -> Iterator[Any]:
    """Each row of the files, in order: CSV rows (every cell text, an empty cell None), or JSON (`json_rows`)."""
    for path in files:
        with open_text(path) as f:
            if file_builder(path) == "csv":
                yield from ({k: v or None for k, v in row.items() if k is not None} for row in csv.DictReader(f))
                continue
            text = f.read()
        yield from json_rows(text, path, label)


def json_rows(text: str, path: str, label: str) -> Iterator[Any]:
    """A .json file's rows: a list of rows, a dict of columns (every value a list, none holding a message: a single
    row of messages is a row), or JSON lines, as many .json files on the hub are (SHP's); a .jsonl file's lines.
    Python's own parser reads every value as written: an integer of any size stays an integer, a float every digit."""
    whole = None
    if path.lower().removesuffix(".gz").endswith(".json") and text.lstrip()[:1] in ("[", "{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as error:
            if text.lstrip().startswith("["):
                raise ValueError(f"{label} data {path}: not valid JSON ({error}): fix the file") from None
    if isinstance(whole, list):
        yield from whole
    elif isinstance(whole, dict) and all(isinstance(value, list) and all(map(message_problem, value))
                                         for value in whole.values()):
        yield from columns_to_rows(whole, f"the {label} dataset {path}")
    else:
        for line in text.splitlines():
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield NotJSON()
