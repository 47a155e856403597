"""The `memserve` CLI: streams text, reports bad input as one line and a non-zero exit."""

from __future__ import annotations

import pytest

from common.model.presets import materialize
from services.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_generate_streams_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        capsys, "generate", "--model", "tiny", "--max-tokens", "12", "--ignore-eos", "Hello"
    )
    assert code == 0, err
    assert len(out.rstrip("\n")) > 0


def test_generate_same_seed_same_text(capsys: pytest.CaptureFixture[str]) -> None:
    args = (
        "generate",
        "--model",
        "tiny",
        "--max-tokens",
        "12",
        "--temperature",
        "0.9",
        "--seed",
        "5",
        "hi",
    )
    first = run_cli(capsys, *args)
    second = run_cli(capsys, *args)
    assert first[0] == 0 and first[1] == second[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--top-p", "0", "x"], "top_p must be in (0, 1]"),
        (["--temperature", "-1", "x"], "temperature must be >= 0"),
        (["--max-tokens", "0", "x"], "max_tokens must be >= 1"),
        (["--model", "/definitely/not/here", "x"], "does not exist"),
        (["x" * 5000], "does not fit the context"),
    ],
)
def test_generate_bad_input_is_one_error_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", *argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memserve: error:") and message in lines[0]


def test_model_info(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "model", "info", str(materialize("tiny")))
    assert code == 0
    info = dict(line.split("  ", 1) for line in out.splitlines())
    assert info["architecture"].strip() == "LlamaForCausalLM"
    # 4 layers x K+V x 16 tokens x 2 kv heads x 32 dims x 4 bytes
    assert info["KV bytes per block (16 tokens)"].strip() == f"{4 * 2 * 16 * 2 * 32 * 4:,}"


def test_model_info_unsupported(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    code, _, err = run_cli(capsys, "model", "info", str(tmp_path))
    assert code == 1 and "no config.json" in err


# `memserve model info --budget-bytes`: the KV that fits beside the parameters.
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
