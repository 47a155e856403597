"""`memserve bench handoff` on the tiny model: a P/D cluster per mode, the second turn's
timings saved; bad modes or counts are one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import build_parser

pytestmark = pytest.mark.integration


def bench(*argv: str) -> int:
    args = build_parser().parse_args(["bench", "handoff", *argv])
    return int(args.func(args))


def test_measures_each_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "handoff.json"
    code = bench("--model", "tiny", "--sessions", "1", "--modes", "pd-caching-3", "--out", str(out))
    assert code == 0
    figures = json.loads(out.read_text())["modes"]["pd-caching-3"]
    assert figures["ttft_ms"] > 0 and figures["gap_ms"] > 0 and figures["tpot_ms"] > 0
    assert "pd-caching-3" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--modes", "colocated"], ["--sessions", "0"]])
def test_bad_input_is_one_error(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench(*argv, "--out", str(tmp_path / "x.json")) == 1
    assert "modes must be among" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
