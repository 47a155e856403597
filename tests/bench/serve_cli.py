"""`memserve bench serve` run as a subprocess, for the tests that run it as a user does,
or in this process (`assert_one_clear_error`) for input that must fail before any cluster
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


def assert_one_clear_error(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`memserve bench serve ARGS --out-dir tmp_path/r`, run from tmp_path in this process,
    fails as services.cli.main would report it: exit code 1, `message` on stderr, no
    traceback, and nothing written."""
    monkeypatch.chdir(tmp_path)
    parsed = build_parser().parse_args(["bench", "serve", *args, "--out-dir", str(tmp_path / "r")])
    code = parsed.func(parsed)
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
