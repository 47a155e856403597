"""The local cluster's state file: how `memserve admin`, `chat` and `generate` find the
cluster that `memserve up` started, without flags.

`memserve up` writes `<run_dir>/cluster.json` once every process is ready and removes it
when it stops. The file holds the admin token, so it is created 0600 (owner only) and
replaced atomically (a reader never sees half of it); the token is never printed or
logged. Readers look in `--cluster DIR`, else $MEMSERVE_RUN_DIR, else the default run
directory (`.memserve/run`, relative like `memserve up`'s default). A file whose
launcher is no longer running is stale: it is ignored, with a hint, not trusted.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import msgspec

from services.launcher.config import DEFAULT_RUN_DIR

STATE_FILE = "cluster.json"


class LocalCluster(msgspec.Struct, omit_defaults=True):
    """What a client of the local cluster needs; addresses as clients connect to them."""

    pid: int  # the `memserve up` process
    gateway: str
    admin_address: str
    admin_token: str
    model: str
    mode: str
    http: str = ""  # the OpenAI-compatible API's base URL, when the cluster runs one
    metrics: list[str] = msgspec.field(default_factory=list)  # scrape targets


class StateError(Exception):
    """No usable state file; the message says where it looked and what to do."""


def run_dir(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("MEMSERVE_RUN_DIR") or DEFAULT_RUN_DIR)


def write(folder: Path, state: LocalCluster) -> Path:
    """Write `folder/cluster.json` (0600) atomically; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE_FILE
    fd, tmp = tempfile.mkstemp(prefix=".cluster-", dir=folder)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(state)))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (folder / STATE_FILE).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def read(explicit: str | None = None) -> LocalCluster:
    """The running local cluster's state; raises StateError when there is none."""
    path = run_dir(explicit) / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StateError(
            f"no local cluster: {path} does not exist (start one with `memserve up`, or "
            "pass the addresses)"
        ) from None
    except OSError as exc:
        raise StateError(f"{path}: {exc.strerror}") from None
    try:
        state = msgspec.json.decode(raw, type=LocalCluster)
    except msgspec.DecodeError as exc:
        raise StateError(f"{path}: malformed state file: {exc}") from None
    if not _alive(state.pid):
        raise StateError(f"{path} is stale: `memserve up` (pid {state.pid}) is not running")
    return state


def gateway_address(
    flag: str | None, cluster: str | None = None
) -> tuple[str, LocalCluster | None]:
    """The gateway a client command talks to: `--gateway`, else $MEMSERVE_GATEWAY_ADDRESS,
    else the local cluster's (with its state). Raises StateError when none is known."""
    address = flag or os.environ.get("MEMSERVE_GATEWAY_ADDRESS")
    if address:
        return address, None
    state = read(cluster)
    return state.gateway, state
