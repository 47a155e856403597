"""The model cache: folders written once under `$MEMSERVE_CACHE_DIR/models` and then reused.

A folder is written into a temporary sibling and renamed into place when complete, so a
concurrent process either sees no folder or a whole one; the name carries a digest of what
it was made from, so a changed source never reuses a stale folder. Processes that start
together (a cluster's workers, gateway and daemons) take a lock file per folder, so one
writes (a GGUF conversion takes seconds and ~1 GB) and the others wait and reuse it; where
locks are unavailable they all write and the first rename wins.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# The file whose presence marks a finished folder (written last by every writer).
DONE_FILE = "model.safetensors"


def cache_dir() -> Path:
    root = os.environ.get("MEMSERVE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "memserve"


def models_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models"


def publish_folder(folder: Path, write: Callable[[Path], None]) -> Path:
    """Return `folder`, first calling `write(tmp)` to fill a temporary folder that is then
    renamed to it, unless a finished `folder` already exists."""
    if (folder / DONE_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.parent / f".{folder.name}.lock"):
        if (folder / DONE_FILE).is_file():  # written by the process we waited for
            return folder
        return _write(folder, write)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no POSIX locks: rely on the rename alone
        yield
        return
    with lock_path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write(folder: Path, write: Callable[[Path], None]) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / DONE_FILE).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
