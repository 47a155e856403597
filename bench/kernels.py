"""`memserve bench kernels`: each of the engine's CPU kernels next to the torch code it
replaces (and, with `--against`, next to another build of cpu_ops.c), on a model's shapes,
in one process with the contenders alternating call by call, so machine noise hits all
alike. Figures are the best of `--rounds` timings per contender.

    memserve bench kernels                           # small's shapes, ~1 min on 2 cores
    memserve bench kernels --against old_cpu_ops.c   # e.g. `git show REV:services/worker/kernels/cpu_ops.c`

Ops: the matmul at decode-batch and prefill row counts over the model's four weight shapes
(weights cold: several copies cycled through, more bytes than a last-level cache), decode
attention over `--seqs` sequences of `--ctx` keys on every layer of a block-interleaved
cache, a prefill chunk's causal attention, the fused residual-add RMSNorm, SiLU-and-mul,
rotary. No figure is judged: the table and the JSON are the output.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from bench.report import write_json

COLD_BYTES = 256 << 20  # weight copies cycled per matmul timing: past any L3 here


def add_parser(sub: Any) -> None:
    p = sub.add_parser("kernels", help="the engine's CPU kernels next to torch's code")
    p.add_argument("--model", default="small", help="preset or model folder (its shapes)")
    p.add_argument("--rows", default="1,8,32,64,2048", help="matmul row counts")
    p.add_argument("--seqs", type=int, default=64, help="decode attention: sequences")
    p.add_argument("--ctx", type=int, default=128, help="decode attention: keys each")
    p.add_argument("--chunk", type=int, default=512, help="prefill attention: chunk tokens")
    p.add_argument("--rounds", type=int, default=7, help="timings per contender (best kept)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    p.add_argument("--against", default=None, help="another cpu_ops.c to time as well")
    p.add_argument("--out", default="results/bench_kernels.json")
    p.set_defaults(func=run)


def load_source(source: Path) -> Any:
    """`source` built like build.py builds cpu_ops.c (same flags) into a temporary library
    and wrapped as CpuKernelOps; a build error or another ABI raises RuntimeError."""
    from services.worker.kernels import build
    from services.worker.kernels.ops import CpuKernelOps

    so = Path(tempfile.mkdtemp(prefix="memserve-kernels-")) / "cpu_ops.so"
    cmd = [build._compiler(), *build.FLAGS, str(source), "-o", str(so), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"--against {source}: build failed:\n{done.stderr[-2000:]}")
    lib = ctypes.CDLL(str(so))
    if lib.memserve_abi_version() != build.ABI_VERSION:
        raise RuntimeError(
            f"--against {source}: ABI {lib.memserve_abi_version()}, this code calls "
            f"ABI {build.ABI_VERSION}"
        )
    return CpuKernelOps(lib)


def _best(contenders: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Seconds per call, best of `rounds`, the contenders alternating (order reversed every
    other round); one untimed call each first."""
    names = list(contenders)
    for n in names:
        contenders[n]()
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            contenders[n]()
            best[n] = min(best[n], time.perf_counter() - t)
    return best


def measure(
    model: str,
    rows: list[int],
    seqs: int,
    ctx: int,
    chunk: int,
    rounds: int,
    ops: dict[str, Any],
) -> list[dict[str, Any]]:
    """One record per op and shape: seconds per call for every entry of `ops` (name ->
    TorchOps or CpuKernelOps)."""
    import torch

    from common.model.config import ModelConfig
    from common.model.presets import resolve_model
    from services.worker.attention import AttentionMetadata

    cfg = ModelConfig.from_folder(resolve_model(model))
    h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    inter, layers = cfg.intermediate_size, cfg.num_layers
    g = torch.Generator().manual_seed(0)
    records: list[dict[str, Any]] = []

    def record(op: str, shape: str, call: Callable[[Any], object]) -> None:
        """Times `call(o)` for every contender o."""
        calls = {n: partial(call, o) for n, o in ops.items()}
        records.append({"op": op, "shape": shape, "seconds": _best(calls, rounds)})

    shapes = [(hq * d + 2 * hkv * d, h), (h, hq * d), (2 * inter, h), (h, inter)]
    per_set = sum(n * k * 4 for n, k in shapes)
    copies = max(1, min(32, COLD_BYTES // per_set))
    weights = [[torch.randn(n, k, generator=g) for n, k in shapes] for _ in range(copies)]
    for m in rows:
        xs = [torch.randn(m, k, generator=g) for _, k in shapes]

        def matmuls(o: Any, xs: list[torch.Tensor] = xs) -> None:
            for ws in weights:
                for x, w in zip(xs, ws, strict=True):
                    o.linear(x, w)

        record("linear", f"{m} rows x {len(shapes)} weights, {copies} copies", matmuls)

    bs = 16
    per_seq = -(-ctx // bs)
    cache = torch.randn(seqs * per_seq + 8, layers, 2, bs, hkv, d, generator=g)
    tables = torch.randperm(cache.shape[0], generator=g)[: seqs * per_seq].view(seqs, per_seq)
    meta = AttentionMetadata(
        slot_blocks=torch.zeros(seqs, dtype=torch.long),
        slot_offsets=torch.zeros(seqs, dtype=torch.long),
        positions=torch.full((seqs,), ctx - 1),
        num_decodes=seqs,
        decode_block_tables=tables,
        decode_ctx_lens=torch.full((seqs,), ctx),
    )
    q = torch.randn(seqs, hq, d, generator=g)

    def decode(o: Any) -> None:
        for layer in range(layers):
            o.decode_attention(q, cache[:, layer, 0], cache[:, layer, 1], meta, d**-0.5, None)

    record(
        "decode_attention",
        f"{seqs} seqs x {ctx} keys x {layers} layers",
        decode,
    )

    qkv = torch.randn(chunk, (hq + 2 * hkv) * d, generator=g)
    pq = qkv[:, : hq * d].view(chunk, hq, d)
    pk = qkv[:, hq * d : (hq + hkv) * d].view(chunk, hkv, d)
    pv = qkv[:, (hq + hkv) * d :].view(chunk, hkv, d)
    record(
        "prefill_attention",
        f"{chunk} tokens, causal",
        lambda o: o.prefill_attention(pq, pk, pv, d**-0.5, None),
    )

    x, res, w = torch.randn(chunk, h), torch.randn(chunk, h), torch.randn(h)
    record(
        "add_rms_norm",
        f"{chunk} x {h}",
        lambda o: o.add_rms_norm(x, res.clone(), w, 1e-5),
    )
    gu = torch.randn(chunk, 2 * inter)
    record(
        "silu_and_mul",
        f"{chunk} x {inter}",
        lambda o: o.silu_and_mul(gu),
    )
    cos, sin = torch.randn(4096, d), torch.randn(4096, d)
    positions = torch.arange(chunk)

    def rotary(o: Any) -> None:
        buf = qkv.clone()
        rq = buf[:, : hq * d].view(chunk, hq, d)
        rk = buf[:, hq * d : (hq + hkv) * d].view(chunk, hkv, d)
        o.rotary(rq, rk, buf, o.rope_for_step(cos, sin, positions))

    record("rotary", f"{chunk} tokens", rotary)
    return records


def render(records: list[dict[str, Any]], names: list[str]) -> str:
    """The table: ms per call for each contender and its time over torch's."""
    head = ["op", "shape", *(f"{n} ms" for n in names), *(f"{n}/torch" for n in names[1:])]
    rows = []
    for r in records:
        s = r["seconds"]
        rows.append(
            [
                r["op"],
                r["shape"],
                *(f"{s[n] * 1e3:.3f}" for n in names),
                *(f"{s[n] / s['torch']:.2f}x" for n in names[1:]),
            ]
        )
    widths = [max(len(c[i]) for c in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(line)) for line in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    import torch

    from services.worker.kernels.ops import TorchOps, select_ops

    torch.set_num_threads(args.threads)
    ours = select_ops(torch.device("cpu"), torch.float32)
    if ours.name == "torch":
        sys.exit("the kernels could not be built or loaded here (see the log): nothing to compare")
    ops: dict[str, Any] = {"torch": TorchOps(), "kernels": ours}
    if args.against:
        try:
            ops["against"] = load_source(Path(args.against))
        except RuntimeError as exc:
            sys.exit(str(exc))
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    if not rows or min(rows) < 1:
        sys.exit(f"--rows {args.rows!r}: positive row counts, comma-separated")
    records = measure(args.model, rows, args.seqs, args.ctx, args.chunk, args.rounds, ops)
    print(render(records, list(ops)))
    path = write_json(
        args.out,
        {
            "model": args.model,
            "threads": args.threads,
            "rounds": args.rounds,
            "against": args.against,
            "records": records,
        },
    )
    print(f"\nresults written to {path}")
