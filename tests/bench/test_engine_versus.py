"""`memserve bench engine --peer ...`: our engine against a peer engine, each in its own
process (real processes, the real JSON-lines protocol). With `--peer memserve` the peer is
our engine again in another configuration, so the whole path runs on the tiny model in
seconds; the vLLM run needs `make peer-vllm`. No timing thresholds: figures vary."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from pathlib import Path

import pytest

from bench.engine import peers
from bench.engine.peer_vllm import parse_options
from bench.engine.peers import Peer, PeerError
from bench.engine.roofline import ModelShape, achieved
from services.cli import build_parser

SMALL_ARGS = [
    "--quick",
    "--concurrency",
    "1,3",
    "--gen-len",
    "6",
    "--prefill-len",
    "16",
    "--prefill-batch",
    "2",
    "--threads",
    "1",
]


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(["bench", "engine", *argv])
    code: int = args.func(args)
    return code


@pytest.mark.integration
def test_memserve_peer_runs_the_whole_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "vs.json"
    code = _run(
        [
            "--peer",
            "memserve",
            "--peer-engine-opt",
            "max_num_batched_tokens=1024",
            "--rounds",
            "2",
            "--no-tcmalloc",
            "--out",
            str(out),
            *SMALL_ARGS,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "tcmalloc not preloaded" in printed

    assert "ours tok/s per round" in printed and "memserve* tok/s per round" in printed
    assert "memserve* = our engine with max_num_batched_tokens=1024" in printed
    for figure in ("decode N=1", "decode N=3", "prefill 2x16"):
        assert figure in printed
    assert "correctness [tiny]: PASS" in printed and "and transformers'" in printed

    data = json.loads(out.read_text())
    assert data["correct"] is True and data["params"]["peer"] == "memserve"
    tiny = data["models"]["tiny"]
    assert tiny["env"] == {"OMP_NUM_THREADS": 1, "tcmalloc": None}
    procs = tiny["processes"]
    assert procs["ours"]["config"]["max_num_batched_tokens"] == 2048
    assert procs["peer"]["config"]["max_num_batched_tokens"] == 1024
    for side in ("ours", "peer"):
        assert procs[side]["engine"] == "memserve"
        assert procs[side]["torch_threads"] == 1
        assert _positive(procs[side]["ready_s"])
        assert procs[side]["peak_rss_bytes"] >= procs[side]["rss_after_load_bytes"] > 0
    assert [f["figure"] for f in tiny["figures"]] == ["decode N=1", "decode N=3", "prefill 2x16"]
    for f in tiny["figures"]:
        assert len(f["ours_tok_s"]) == len(f["peer_tok_s"]) == 2
        for key in ("ours_tok_s", "peer_tok_s"):
            assert all(_positive(v) for v in f[key])
        for key in (
            "median_ratio_peer_over_ours",
            "median_ratio_ours_over_peer",
            "roofline_gflops",
        ):
            assert _positive(f[key])
        assert _positive(f["ours_roofline_fraction"]) and _positive(f["peer_roofline_fraction"])
    for f in tiny["figures"][:2]:
        n = f["concurrency"]
        # every token after each request's first, in every round, on both sides
        assert [r["decode_tokens"] for r in f["ours_runs"]] == [n * 5, n * 5]
        assert [r["decode_tokens"] for r in f["peer_runs"]] == [n * 5, n * 5]
        assert f["sequences_equal"] == [n, n]  # same engine code: equal at every N
    rounds = tiny["correctness"]["rounds"]
    assert len(rounds) == 2
    assert all(
        r["ours_equals_peer"] and r["ours_equals_transformers"] and r["peer_equals_transformers"]
        for r in rounds
    )


@pytest.mark.integration
def test_a_peer_that_cannot_load_fails_fast_with_its_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a python without vllm: peer_vllm.py dies on its import, before ours is loaded
    code = _run(
        [
            "--peer",
            "vllm",
            "--peer-python",
            sys.executable,
            "--no-hf",
            "--rounds",
            "1",
            "--out",
            str(tmp_path / "vs.json"),
            *SMALL_ARGS,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "vllm: peer exited (code 1) waiting for ready" in err
    assert "stderr ---" in err and "No module named 'vllm'" in err
    assert "starting ours" not in err
    assert not (tmp_path / "vs.json").exists()


@pytest.mark.integration
def test_a_peer_dying_mid_command_fails_fast_with_its_stderr_tail() -> None:
    argv = peers.ours_argv(sys.executable, "tiny", 8, 4096, 1, [])
    with Peer("ours", argv, {**peers.peer_env(1)[0], **peers.ours_env()}) as peer:
        ready = peer.start(timeout_s=120)
        assert ready["engine"] == "memserve"
        assert peer.call({"cmd": "stats"}, timeout_s=30)["rss_bytes"] > 0
        with pytest.raises(PeerError, match="unknown command"):
            peer.call({"cmd": "nope"}, timeout_s=30)  # an error reply: the peer stays up
        # a decode long enough to be killed in the middle of
        killer = threading.Timer(0.5, lambda: peer.proc and peer.proc.send_signal(signal.SIGKILL))
        killer.start()
        try:
            with pytest.raises(PeerError) as info:
                peer.call(
                    {"cmd": "decode", "prompts": [[5] * 64] * 8, "gen_len": 4000}, timeout_s=600
                )
        finally:
            killer.cancel()
        msg = str(info.value)
        assert "ours: peer exited (code -9) waiting for 'decode'" in msg
        assert "peer_ours: tiny loaded" in msg  # the tail of its stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "2"], "--rounds needs --peer"),
        (["--peer-engine-opt", "a=1"], "--peer-engine-opt needs --peer"),
        (["--no-tcmalloc"], "--no-tcmalloc needs --peer"),
        (["--peer", "memserve", "--rounds", "0"], "--rounds must be >= 1"),
        (["--peer", "memserve", "--engine-opt", "compile"], "--engine-opt takes key=value"),
        (["--peer", "vllm", "--peer-python", "/no/such/python"], "not an executable file"),
    ],
)
def test_bad_flags_are_refused_clearly(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_peer_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["bench", "engine", "--peer", "sglang"])
    assert info.value.code == 2
    assert "invalid choice: 'sglang'" in capsys.readouterr().err


def test_options_parse_as_json_else_string() -> None:
    assert parse_options(["compile=false", "n=3", "mode=max-autotune", "x=null"]) == {
        "compile": False,
        "n": 3,
        "mode": "max-autotune",
        "x": None,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["=3"])


def test_flops_per_token_count_every_matmul_and_attention(tmp_path: Path) -> None:
    cfg = {
        "num_hidden_layers": 2,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 4,
        "vocab_size": 10,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = ModelShape.from_folder(tmp_path)
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8; lm_head 8x10
    per_layer = 64 + 32 + 32 + 64 + 128 + 128 + 128
    assert shape.matmul_flops_per_token() == 2 * (2 * per_layer + 80)
    assert shape.attention_flops_per_token(10) == 4 * 2 * 2 * 4 * 10
    a = achieved(shape, tok_s=1e9, context=0, roof_gflops=2 * shape.matmul_flops_per_token())
    assert a["gflops"] == shape.matmul_flops_per_token()
    assert a["roofline_fraction"] == 0.5


VLLM_PYTHON = peers.DEFAULT_VLLM_PYTHON


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason=f"no vLLM peer venv at {VLLM_PYTHON}: run `make peer-vllm`"
)
def test_vllm_peer_matches_ours_on_small(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vs.json"
    code = _run(
        [
            "--peer",
            "vllm",
            "--models",
            "small",
            "--rounds",
            "1",
            "--peer-engine-opt",
            "enforce_eager=true",
            "--out",
            str(out),
            *SMALL_ARGS,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "correctness [small]: PASS" in printed
    data = json.loads(out.read_text())
    small = data["models"]["small"]
    assert small["processes"]["peer"]["engine"] == "vllm"
    assert small["processes"]["peer"]["config"]["block_size"] == 32
    assert all(_positive(v) for f in small["figures"] for v in f["peer_tok_s"])
