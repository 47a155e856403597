"""`memserve bench engine --quick`: runs end to end, saves positive figures, passes the
greedy-equality check against transformers. No timing thresholds: figures vary by machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import engine as bench_engine
from bench.report import format_table, latency_summary_ms, percentile
from services.cli import build_parser


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.integration
def test_quick_run_writes_positive_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "nested" / "bench_engine.json"
    args = build_parser().parse_args(
        ["bench", "engine", "--quick", "--repeats", "1", "--out", str(out)]
    )
    code = args.func(args)
    printed = capsys.readouterr().out

    assert code == 0
    assert "correctness [tiny]: PASS" in printed
    assert out.is_file()
    data = json.loads(out.read_text())
    assert data["correct"] is True
    assert data["params"]["models"] == ["tiny"]
    assert data["params"]["concurrency"] == [1, 8]
    assert data["machine"]["torch_threads"] >= 1
    tiny = data["models"]["tiny"]
    assert tiny["correctness"]["passed"] is True
    assert tiny["correctness"]["ours"] == tiny["correctness"]["transformers"]
    assert len(tiny["correctness"]["ours"]) == 16
    assert _positive(tiny["hf_single"]["decode_tok_s"])
    assert [r["concurrency"] for r in tiny["decode"]] == [1, 8]
    for row in tiny["decode"]:
        n = row["concurrency"]
        ours = row["ours"]
        assert ours["decode_tokens"] == n * 15  # every token after the first
        for value in (
            ours["decode_tok_s"],
            ours["e2e_tok_s"],
            ours["step"]["p50_ms"],
            ours["step"]["p99_ms"],
        ):
            assert _positive(value)
        assert _positive(row["hf_batched"]["decode_tok_s"])
        assert _positive(row["ratio_vs_hf_single"]) and _positive(row["ratio_vs_hf_batched"])
    assert _positive(tiny["prefill"]["ours"]["tok_s"])
    assert _positive(tiny["prefill"]["hf"]["tok_s"])
    assert tiny["prefill"]["prompt_tokens"] == 8 * 64


def test_prompts_are_seeded_and_stable_across_counts() -> None:
    a = bench_engine.make_prompts(0, 4, 32)
    b = bench_engine.make_prompts(0, 8, 32)
    assert a == b[:4]
    assert all(len(p) == 32 and all(3 <= t <= 258 for t in p) for p in b)
    assert bench_engine.make_prompts(1, 4, 32) != a


def test_pad_left_masks_padding() -> None:
    ids, mask = bench_engine.pad_left([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_report_helpers() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    summary = latency_summary_ms([0.001, 0.002, 0.003])
    assert summary["p50_ms"] == pytest.approx(2.0)
    assert summary["mean_ms"] == pytest.approx(2.0)
    table = format_table(["a", "bb"], [["x", "1"], ["yy", "22"]])
    assert table.splitlines()[0].startswith("a ")
    assert len(table.splitlines()) == 4


def test_bad_options_exit_with_usage_error(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["bench", "engine", "--gen-len", "1", "--out", str(tmp_path / "x.json")]
    )
    assert args.func(args) == 2
    assert not (tmp_path / "x.json").exists()
