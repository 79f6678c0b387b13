"""Atomic writes, in one place: an artefact is written under a temporary name of its writer's own, in the folder it
goes to, and renamed into place only once whole. A process killed mid-write (SIGKILL, out of memory) leaves the
previous artefact or nothing, never a part of the new one; two writers of the same artefact both succeed, the last
rename wins. Checkpoints (`training.checkpoints.NamedCheckpointIO`) and the reference cache (`training.refcache`)
write through `atomic_path`.
"""

import contextlib
import os
import uuid
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` to write the whole artefact to; renamed onto `path` when the block ends
    without an error, and removed when it raises."""
    path = os.fspath(path)
    partial = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        yield partial
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
