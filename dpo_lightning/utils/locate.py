"""Where a model, tokenizer or data file named in a config is: a folder, a shipped asset, or a hub id.

One rule, used by every loader (`training.models.load_causal_lm`, `utils.tokenizers.load_tokenizer`) and by the
CLI for data files (`resolve_data_paths`, for `fit`, `validate` and `inspect-data` alike), so that `dpo-lightning fit --config /anywhere/configs/quickstart.yaml` runs from any directory:

1. A path that exists (relative to the working directory, or absolute) is used as it is.
2. A relative path under `dpo_lightning/` (the quickstart's `dpo_lightning/assets/sort-tiny`) that does
   not exist here is looked up in the installed package, wherever pip put it.
3. Anything else must be a Hugging Face hub id (`name` or `org/name`); a name that is neither gets our
   message (the path tried, the working directory, what to pass instead) instead of the hub client's
   `Repo id must be in the form ...`.
"""

import os
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
# A hub repo id ("gpt2", "org/name"); the hub rejects anything else as a model, dataset or card metadata.
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_hub_id(name: str) -> bool:
    """A name the hub could resolve, and not a local path."""
    return not os.path.exists(name) and bool(HUB_ID.match(name)) and not name.startswith((".", "~"))


def shipped(path: str) -> str:
    """`path` itself, or the installed package's copy of a `dpo_lightning/...` path missing from here (rule 2)."""
    parts = Path(path).parts
    if os.path.exists(path) or Path(path).is_absolute() or parts[:1] != (PACKAGE.name,):
        return path
    candidate = PACKAGE.joinpath(*parts[1:])
    return str(candidate) if candidate.exists() else path


def model_source(name_or_path: str, what: str = "model") -> str:
    """The folder or hub id to load `name_or_path` from (rules 1-3); raises our error for neither.

    Args:
        name_or_path: as given in a config or call.
        what: what is loaded, for the message ("model", "tokenizer").
    """
    path = shipped(name_or_path)
    if os.path.exists(path) or is_hub_id(path):
        return path
    tried = Path(path).expanduser().absolute()
    raise FileNotFoundError(
        f"{what} {name_or_path!r}: no such folder ({tried}, from the working directory {os.getcwd()}) and not a "
        "Hugging Face hub id ('name' or 'org/name'). Pass an existing folder (absolute, or relative to the "
        "working directory), a hub id such as 'gpt2', or 'dpo_lightning/assets/sort-tiny' for the quickstart's "
        "shipped model")


# The data module's arguments that may name files shipped under dpo_lightning/ (the quickstart's data).
DATA_PATHS = ("dataset", "eval_dataset")


def resolve_data_paths(data: dict) -> None:
    """`shipped` for each file a config's data section names (`DATA_PATHS`: a path, or a list of paths), in place."""
    for key in DATA_PATHS:
        value = data.get(key)
        if isinstance(value, str):
            data[key] = shipped(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            data[key] = [shipped(v) for v in value]
