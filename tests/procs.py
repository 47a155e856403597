"""Processes seen from /proc (Linux; no psutil): who a process started, whether one is gone."""

from __future__ import annotations

import re
from pathlib import Path


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue  # exited meanwhile
        m = re.search(r"^PPid:\s+(\d+)$", text, re.M)
        if m and int(m.group(1)) == pid:
            out.append(int(status.parent.name))
    return out


def gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "State:\tZ" in state
