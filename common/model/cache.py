"""The model cache: folders written once under `$MEMSERVE_CACHE_DIR/models` and then reused.

A folder is written into a temporary sibling and renamed into place when complete, so a
concurrent process either sees no folder or a whole one; the name carries a digest of what
it was made from, so a changed source never reuses a stale folder. Two processes that race
both write; the first rename wins and the loser's copy is dropped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
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
