"""`memserve model info --budget-bytes`: the KV that fits beside the parameters."""

from __future__ import annotations

import pytest

from tests.test_cli import run_cli

TINY_PARAMS, TINY_BLOCK = 3_218_944, 32 * 1024  # float32, 16-token blocks


def fields(out: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split("  ", 1) for line in out.splitlines())}


def test_model_info_prints_the_budget_split(capsys: pytest.CaptureFixture[str]) -> None:
    budget = TINY_PARAMS + 10 * TINY_BLOCK + 5
    code, out, err = run_cli(capsys, "model", "info", "tiny", "--budget-bytes", str(budget))
    assert code == 0, err
    info = fields(out)
    assert info["parameter bytes (float32)"] == f"{TINY_PARAMS:,}"
    assert info["KV blocks in budget"] == "10" and info["KV tokens in budget"] == "160"


def test_model_info_budget_below_params_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "model", "info", "tiny", "--budget-bytes", "1000")
    assert code == 1 and "holds no KV block" in err
