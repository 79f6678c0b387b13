"""Atomic writes, in one place: an artefact is written under a temporary name of its writer's own, in the folder it
goes to, and renamed into place only once whole. A process killed mid-write (SIGKILL, out of memory) leaves the
previous artefact or nothing, never a part of the new one (its `*.partial` stays beside it, read by nothing); two
writers of the same file both succeed, the last rename wins. Checkpoints (`training.checkpoints.NamedCheckpointIO`),
the reference cache (`training.refcache`), the Hugging Face export folder (`callbacks.export`) and the plots
(`tools.plots`) write through `atomic_path`.
"""

import contextlib
import os
import shutil
import uuid
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` to write the whole artefact to (a file, or a folder the block creates);
    renamed onto `path` when the block ends without an error, and removed when it raises. The folder `path` goes
    in is created.

    A folder replaces an earlier one whole, never file by file (new weights beside an old tokenizer): the old one
    is renamed aside, the new one in, the old one removed. A process killed between those two renames leaves no
    folder at `path` (the old one whole, as `*.old`), never a mix.
    """
    path = os.fspath(path)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial = f"{path}.{tag}.partial"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        yield partial
        if os.path.isdir(partial) and os.path.isdir(path):  # rename cannot replace a folder that holds files
            old = f"{path}.{tag}.old"
            os.replace(path, old)
            os.replace(partial, path)
            shutil.rmtree(old)
        else:
            os.replace(partial, path)
    finally:
        _remove(partial)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
