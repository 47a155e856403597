"""Helpers shared by the benchmarks: latency summaries, aligned text tables, JSON files
and a description of the machine the figures come from."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linearly interpolated (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Mean, p50, p99 and max of durations given in seconds, in milliseconds."""
    if not seconds:
        return {"mean_ms": math.nan, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    return {
        "mean_ms": 1e3 * sum(seconds) / len(seconds),
        "p50_ms": 1e3 * percentile(seconds, 50),
        "p99_ms": 1e3 * percentile(seconds, 99),
        "max_ms": 1e3 * max(seconds),
    }


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: floats with `digits` decimals (thousands separated), nan as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns (the first left-aligned) under a header and a rule."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    try:
        import transformers

        info["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a test/bench dependency
        info["transformers_version"] = None
    return info


def busy_seconds() -> float | None:
    """CPU seconds all CPUs spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = (
        sum(ticks[:8]) - idle
    )  # user..steal (steal: taken by the hypervisor); guest is inside user
    return busy / os.sysconf("SC_CLK_TCK")


class CpuMonitor:
    """How much CPU *other* processes used while the benchmark ran.

    Busy CPU time of the whole machine minus this process's own CPU time (and its reaped
    children's), over the wall time: ~0 on a quiet machine. Figures taken while others compete for the cores
    (multi-threaded torch stalls badly then) should not be trusted.
    """

    def __init__(self) -> None:
        self.t0 = 0.0
        self.busy0: float | None = None
        self.own0 = 0.0

    @staticmethod
    def _own() -> float:
        # Children count as ours once reaped: a cluster the benchmark started and stopped
        # within the window is not "another process".
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> CpuMonitor:
        self.t0 = time.perf_counter()
        self.busy0 = busy_seconds()
        self.own0 = self._own()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        busy1 = busy_seconds()
        own = self._own() - self.own0
        other = None
        if self.busy0 is not None and busy1 is not None and wall > 0:
            other = max(0.0, (busy1 - self.busy0 - own) / wall)
        return {
            "wall_s": wall,
            "own_cpu_s": own,
            "own_cores": own / wall if wall > 0 else math.nan,
            "other_cores": other,
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no nan/inf
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON (nan becomes null), creating the folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    tmp.replace(p)
    return p
