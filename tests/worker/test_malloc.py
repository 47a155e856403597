"""The engine's malloc tuning (services/worker/malloc.py), in fresh processes (the
allocator's state is process-wide): a step-sized buffer freed and allocated again faults
its pages in anew under glibc's defaults, and not once tuned."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A step's pattern: four 24 MiB buffers live at once, then freed; three steps; print
# whether it was tuned and the page faults of the last step.
PROBE = """
import ctypes, resource, sys
from services.worker.malloc import keep_step_buffers
tuned = keep_step_buffers() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 24 << 20
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = [libc.malloc(size) for _ in range(4)]
    for p in live:
        ctypes.memset(p, 1, size)
    for p in live:
        libc.free(p)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(int(tuned), faults)
"""


def _probe(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "1", int(out[1])


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="glibc's mallopt; other C libraries are left alone"
)
def test_a_freed_step_buffer_is_reused_without_page_faults() -> None:
    pages = 4 * (24 << 20) // 4096
    tuned, faults = _probe("tune")
    assert tuned
    assert faults < pages // 10, faults
    untuned, default_faults = _probe("default")
    assert not untuned and default_faults > pages // 2, default_faults


def test_a_preloaded_allocator_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.worker.malloc import keep_step_buffers

    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert keep_step_buffers() is False
