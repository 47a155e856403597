"""`memserve bench serve` run as a subprocess, for the tests that run it as a user does."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path


async def bench(*args: str, cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.cli", "bench", "serve", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


async def finished(proc: asyncio.subprocess.Process, timeout_s: float) -> tuple[str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    return out.decode(), err.decode()
