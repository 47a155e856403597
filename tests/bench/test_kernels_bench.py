"""`memserve bench kernels` runs end to end on a small budget: every op timed for every
contender (torch, the kernels, another build of cpu_ops.c), the table and the JSON
written; bad input fails with a clear message (no timing is judged here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.kernels import load_source, measure, render
from services.cli import main
from services.worker.kernels.build import SOURCE
from services.worker.kernels.ops import CpuKernelOps, TorchOps, select_ops

OPS = {
    "linear",
    "decode_attention",
    "prefill_attention",
    "add_rms_norm",
    "silu_and_mul",
    "rotary",
}


def test_every_op_is_timed_for_every_contender() -> None:
    kernels = select_ops(torch.device("cpu"), torch.float32)
    assert isinstance(kernels, CpuKernelOps)
    ops = {"torch": TorchOps(), "kernels": kernels, "against": load_source(SOURCE)}
    records = measure("tiny", [1, 9], seqs=3, ctx=20, chunk=17, rounds=1, ops=ops)
    assert {r["op"] for r in records} == OPS
    assert len([r for r in records if r["op"] == "linear"]) == 2
    for r in records:
        assert set(r["seconds"]) == set(ops) and min(r["seconds"].values()) > 0
    table = render(records, list(ops))
    assert all(op in table for op in OPS) and "against/torch" in table


def test_the_command_writes_its_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.json"
    with pytest.raises(SystemExit) as done:
        main(["bench", "kernels", "--model", "tiny", "--rows", "2", "--seqs", "2", "--ctx", "9",
              "--chunk", "5", "--rounds", "1", "--out", str(out)])  # fmt: skip
    assert done.value.code in (None, 0)
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and {r["op"] for r in data["records"]} == OPS
    assert "results written to" in capsys.readouterr().out


def test_bad_input_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    with pytest.raises(RuntimeError, match="build failed"):
        load_source(broken)
    old_abi = tmp_path / "old.c"
    old_abi.write_text("int memserve_abi_version(void) { return 1; }\n")
    with pytest.raises(RuntimeError, match="ABI 1"):
        load_source(old_abi)
    with pytest.raises(SystemExit, match="--rows"):
        main(["bench", "kernels", "--model", "tiny", "--rows", "0", "--out", str(tmp_path / "x")])
