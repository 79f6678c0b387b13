"""Local data files: which files a source names, how they are opened, read (JSON lines, .json, CSV) and cached.

Files are read as UTF-8 with an optional byte-order mark; every cache of rows read from files is keyed by the
files' content (`digest`), never by path and modification time. .parquet files (and streams) go through
`datasets`' own readers; .json/.jsonl/.csv rows are read here, in Python (`file_rows`), so a value keeps the type
it is written with.
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
from datasets import Dataset, Features, IterableDataset, Value, load_dataset

from dpo_lightning.data.rows import NotJSON

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def file_builder(path: str) -> str | None:
    stem = path[:-3] if path.endswith(".gz") else path
    return FILE_BUILDERS.get(os.path.splitext(stem)[1])


def data_files(source: str | list[str]) -> list[str] | None:
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
    builders = {file_builder(f) for f in files}
    if None in builders or len(builders) > 1:
        raise ValueError(f"{source}: files must share one type of {sorted(FILE_BUILDERS)} (optionally .gz)")
    return files


def open_text(path: str):
    # utf-8-sig: a UTF-8 byte-order mark (Excel's "CSV UTF-8", some Windows tools) is not part of the text.
    return gzip.open(path, "rt", encoding="utf-8-sig", newline="") if path.endswith(".gz") else \
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


def load_files(files: list[str], label: str, streaming: bool) -> Dataset | IterableDataset:
    """.parquet files (or any files, streamed) through `datasets`' own readers; parquet cached by content."""
    builder = file_builder(files[0])
    if builder == "parquet" and not sum(pq.ParquetFile(f).metadata.num_rows for f in files):
        raise ValueError(f"the {label} dataset is empty: no rows in {files}")
    if streaming:
        kwargs = {}
        if builder == "csv":  # every cell text, as when read in Python
            with open_text(files[0]) as f:
                names = next(csv.reader([f.readline()]))
            kwargs = dict(features=Features({c: Value("string") for c in names}), keep_default_na=False,
                          na_values=[""], encoding="utf-8-sig")
        return load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    cache_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "dpo_lightning_files", digest(files)[:32])
    return load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)


def file_rows(files: list[str], label: str) -> Iterator[Any]:
    """Each row of the files, in order: JSON lines, .json files holding a list of rows, or CSV rows (every
    cell text, an empty cell None)."""
    for path in files:
        with open_text(path) as f:
            if file_builder(path) == "csv":
                yield from ({k: v or None for k, v in row.items() if k is not None} for row in csv.DictReader(f))
                continue
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
                    yield NotJSON()
