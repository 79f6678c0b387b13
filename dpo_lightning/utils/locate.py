"""Where a model, tokenizer or data file named in a config is: a local path, a shipped asset, or a hub id.

One rule, used by every reader: models and reference models (`training.models.load_causal_lm`), tokenizers
(`utils.tokenizers.load_tokenizer`), reward models (`online.rewards.load_reward`) and data files, folders and
globs (`data.sources`, from Python, `fit`, `validate` and `inspect-data` alike), so that `dpo-lightning fit --config /anywhere/configs/quickstart.yaml`
runs from any directory and a typo fails at once:

1. A path that exists (relative to the working directory, or absolute; `~` is the home folder) is used as it is;
   a glob, when it matches a file.
2. A relative path or glob under `dpo_lightning/` (the quickstart's `dpo_lightning/assets/sort-tiny`) that does
   not exist here is looked up in the installed package, wherever pip put it.
3. A name that can only be a path (`looks_like_path`: a file extension, `./`, `../`, `/`, `~`, more than one
   `/`, or `dir/name` where `dir` is a folder here) and is neither fails here: "not found: X (working
   directory Y)", the closest name in its folder, and what to pass instead. No hub call: the hub client
   would retry for a minute, then say "Couldn't reach" or "Repo id must use alphanumeric chars".
4. Anything else is a Hugging Face hub id (`name` or `org/name`).

What can only be a local file (a checkpoint, a run's log, a config, from-trl's arguments) is `existing`: rule 3's
message whatever the name looks like. A `pathlib.Path` (from a notebook) is a path wherever a name or path is taken:
`as_path` makes it the string the rules read, at each class's front door.
"""

import difflib
import glob
import os
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
# A hub repo id ("gpt2", "org/name"); the hub rejects anything else as a model, dataset or card metadata.
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# Endings that make a name a file (a hub id may hold a dot, "EleutherAI/gpt-neo-1.3B", so not every suffix does).
FILE_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".bin",
                   ".safetensors", ".pt", ".pth", ".ckpt", ".yaml", ".yml", ".gguf")
# What to pass instead of a path that is not found, by what it names.
INSTEAD = {
    "model": "an existing folder (absolute, or relative to the working directory), a hub id such as 'gpt2', or "
             "'dpo_lightning/assets/sort-tiny' for the quickstart's shipped model",
    "data": "an existing .json/.jsonl/.parquet/.csv file (optionally .gz), a glob or a folder of them (absolute, or "
            "relative to the working directory), a hub dataset name such as 'org/name', or "
            "'dpo_lightning/assets/sort-tiny/train.jsonl' for the quickstart's shipped data",
    "reward": "a reward model's existing folder (absolute, or relative to the working directory), or the import path "
              "of a function, 'package.module.function'",
    "checkpoint": "an existing .ckpt file a run wrote (absolute, or relative to the working directory), e.g. "
                  "runs/NAME/version_N/checkpoints/last.ckpt; `ls runs/*/version_*/checkpoints` lists them",
    "log": "a run's existing log folder or its metrics.csv (absolute, or relative to the working directory), e.g. "
           "runs/NAME/version_N or runs/NAME (its newest run)",
    "config": "an existing YAML file (absolute, or relative to the working directory), e.g. the repository's "
              "configs/quickstart.yaml from its root",
    "trl": "an existing .json or .yaml file of TRL arguments (absolute, or relative to the working directory), e.g. "
           "the output of DPOConfig.to_json_string() or a `trl dpo` recipe",
}


def is_hub_id(name: str) -> bool:
    """A name the hub could resolve, and not a local path."""
    return not os.path.exists(name) and bool(HUB_ID.match(name)) and not looks_like_path(name)


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a file or folder (rule 3), never a hub id."""
    first = name.split("/")[0]
    return (name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", "..") or name.count("/") > 1
            or name.lower().endswith(FILE_EXTENSIONS) or "\\" in name
            or (name.count("/") == 1 and os.path.isdir(first)))


def shipped(path: str) -> str:
    """`path` itself, or the installed package's copy of a `dpo_lightning/...` path or glob missing from here
    (rule 2)."""
    parts = Path(path).parts
    if _exists(path) or Path(path).is_absolute() or parts[:1] != (PACKAGE.name,):
        return path
    candidate = str(PACKAGE.joinpath(*parts[1:]))
    return candidate if _exists(candidate) else path


def located(name: str, what: str, kind: str = "model") -> str:
    """The local path (rules 1-2) or hub id (rule 4) to read `name` from; rule 3's error for a path not found.

    Args:
        name: as given in a config or call.
        what: the setting or thing that named it, for the message ("--data.dataset", "the tokenizer").
        kind: "model" (models and tokenizers), "data" or "reward": what the message says to pass instead.
    """
    path = local(name)
    if _exists(path) or (is_hub_id(path) and not glob.has_magic(path)):
        return path
    raise not_found(name, what, kind)


def existing(name: str | os.PathLike, what: str, kind: str) -> str:
    """`name` (`~` expanded; a glob: its one match) where it is a local file or folder; rule 3's error where not,
    whatever it looks like: a checkpoint, a log or a config is never a hub id.

    Args:
        name: as given on the command line or in a call.
        what: the flag or argument that named it ("--ckpt_path").
        kind: a key of `INSTEAD`, what to pass instead.
    """
    path = os.path.expanduser(os.fspath(name))
    if not glob.has_magic(path):
        if os.path.exists(path):
            return path
        raise not_found(str(name), what, kind)
    matches = sorted(glob.glob(path))
    if len(matches) > 1:
        raise ValueError(f"{what} {name} matches {len(matches)} files ({', '.join(matches[:4])}"
                         f"{', ...' if len(matches) > 4 else ''}): name one")
    if not matches:
        raise not_found(str(name), what, kind)
    return matches[0]


def not_found(name: str, what: str, kind: str) -> "NotFoundError":
    """Rule 3's error: "not found: X (working directory Y)", the closest name in its folder, what to pass instead."""
    return NotFoundError(f"not found: {name} (working directory {os.getcwd()}).{_closest(local(name))} For {what}, "
                         f"pass {INSTEAD[kind]}")


def as_path(value):
    """A `pathlib.Path` (any `os.PathLike`), or a list of them, as the string(s) a config would hold; any other value
    (a name, a model, rows) as given."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list) and value and all(isinstance(item, os.PathLike) for item in value):
        return [os.fspath(item) for item in value]
    return value


def located_data(source, what: str):
    """A data source with its paths `located`: a path, glob or hub name, or a list of paths; any other as given.

    A list is one of paths when every item is a string that looks like one (a list of rows holds dicts).
    """
    if isinstance(source, str):
        return located(source, what, "data")
    if isinstance(source, list) and source and all(isinstance(item, str) and looks_like_path(item) for item in source):
        return [located(item, what, "data") for item in source]
    return source


def local(name: str) -> str:
    """`name` with `~` expanded, or its shipped copy (rules 1-2): where a local path would be read from."""
    return shipped(os.path.expanduser(name))


class NotFoundError(FileNotFoundError):
    """A path named in a config that is not there (rule 3); the command line prints its message alone."""


def model_source(name_or_path: str | os.PathLike, what: str = "the model") -> str:
    """The folder or hub id to load a model or tokenizer from: `located`; `what` names the setting for the message."""
    return located(os.fspath(name_or_path), what)


def _exists(path: str) -> bool:
    return bool(glob.glob(path)) if glob.has_magic(path) else os.path.exists(path)


def _closest(path: str) -> str:
    """" Did you mean X?" for the name in the path's folder closest to its own, when there is one."""
    folder, name = os.path.split(path)
    if glob.has_magic(path) or not os.path.isdir(folder or "."):
        return ""
    match = difflib.get_close_matches(name, os.listdir(folder or "."), n=1)
    return f" Did you mean {os.path.join(folder, match[0])}?" if match else ""
