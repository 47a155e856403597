"""`memserve bench serve` run as a subprocess, for the tests that run it as a user does,
or in this process (`bench_in_process`) for input that must fail before any cluster
starts: the same command code, without an interpreter start per case on CI's 2 cores."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from services.cli import build_parser


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


def bench_in_process(
    *args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """Exit code and stderr of `memserve bench serve ARGS` run from `cwd` in this process
    (what `services.cli.main` would pass to sys.exit and print)."""
    monkeypatch.chdir(cwd)
    parsed = build_parser().parse_args(["bench", "serve", *args])
    code = parsed.func(parsed)
    return code, capsys.readouterr().err
