"""`memserve bench mempool`: the MemPool index and data plane, next to the machine's limits.

Index: a prompt tree holding `--cached` prompts (default 10,000: 200 shared 256-token
documents, each prompt = a document + 256 tokens of its own, so the tree has real
branching), then for prompts of 1K, 4K, 16K and 32K tokens:
- `match` of a prompt whose every block is cached (the longest walk) and of one that
  shares only a document prefix;
- `insert` of a new prompt (fresh blocks; removed again untimed, so the tree stays put).
Each is timed in-process (the pure core, tokens handed over as an int32 array the way the
daemon receives them) and through a daemon's socket (a real `memserve mempool` process;
the figure includes the ZeroMQ round trip).

Transfer: one transfer of all blocks of 16 MiB and 512 MiB per transport between two
processes, next to a single-thread memcpy (the ceiling for shm) and a raw loopback TCP
stream (the ceiling for tcp), all measured in the same run.

Side by side: the four index figures of the issue (match 4K, insert 4K and 16K, evict 4,096
tokens) for ours and SGLang's own `RadixCache` (page size 1), interleaved in this run
(`bench/index_compare.py`), next to our goals. SGLang's file comes from `--sglang-radix`,
`$MEMSERVE_SGLANG_RADIX` or an installed sglang (`make bench-baselines`); without it the
column stays empty and a line says so. Match and insert are also timed back to back (each
system's calls in a row), beside the interleaved figures the goals are stated for.

Our insert leaves the block hashes of its KV events to `drain_events` (the daemon drains after
every request), so every insert figure has a 'drain after insert' figure beside it.

Paper targets: `insert` of 4K tokens under 0.7 ms; our target for in-process `match` of a
4K prompt: 50 us p50. Transfer targets: shm >= 50% of memcpy, tcp >= 80% of the raw socket.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import fmt, format_table, percentile, write_json

BLOCK_SIZE = 16
LENGTHS = (1024, 4096, 16384, 32768)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("mempool", help="MemPool index latency and transfer throughput")
    p.add_argument(
        "--cached", type=int, default=10_000, help="prompts in the tree (default 10,000)"
    )
    p.add_argument(
        "--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths in tokens"
    )
    p.add_argument("--repeats", type=int, default=200, help="timed calls per figure")
    p.add_argument("--sizes-mib", default="16,512", help="transfer sizes in MiB")
    p.add_argument("--transports", default="", help="default: every available transport")
    p.add_argument("--skip-socket", action="store_true", help="skip the daemon-socket figures")
    p.add_argument("--skip-transfer", action="store_true", help="skip the transfer figures")
    p.add_argument(
        "--sglang-radix",
        default=None,
        help="SGLang's radix_cache.py for the side-by-side (default: $MEMSERVE_SGLANG_RADIX, "
        "then an installed sglang)",
    )
    p.add_argument("--out", default="results/bench_mempool.json")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------- workload
def cached_prompts(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    docs = [rng.integers(3, 50_000, size=256, dtype=np.int32) for _ in range(max(1, n // 50))]
    return [
        np.concatenate([docs[i % len(docs)], rng.integers(3, 50_000, size=256, dtype=np.int32)])
        for i in range(n)
    ]


def probe_prompts(
    length: int, docs_from: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(fully cached prompt: inserted before timing, partially cached prompt: doc + new)."""
    doc = docs_from[0][:256]
    full = np.concatenate([doc, rng.integers(50_000, 90_000, size=length - 256, dtype=np.int32)])
    partial = np.concatenate(
        [doc, rng.integers(90_000, 130_000, size=length - 256, dtype=np.int32)]
    )
    return full, partial


def summarize(seconds: list[float]) -> dict[str, float]:
    us = [s * 1e6 for s in seconds]
    return {
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "mean_us": sum(us) / len(us),
    }


# ---------------------------------------------------------------------- in-process
def bench_index_inprocess(
    cached: list[np.ndarray], lengths: list[int], repeats: int
) -> dict[str, Any]:
    from services.mempool.pool import MemPool

    total_blocks = sum(len(p) // BLOCK_SIZE for p in cached) + 4 * sum(lengths) // BLOCK_SIZE + 64
    pool = MemPool(BLOCK_SIZE, total_blocks)
    t = time.perf_counter()
    for p in cached:
        pool.insert(p, pool.alloc_mem(len(p) // BLOCK_SIZE))
    fill_s = time.perf_counter() - t
    pool.drain_events()
    rng = np.random.default_rng(7)
    results: dict[str, Any] = {"fill_s": fill_s, "tree_blocks": pool.stats().index["device"]}
    for length in lengths:
        full, partial = probe_prompts(length, cached, rng)
        pool.insert(full, pool.alloc_mem(length // BLOCK_SIZE))
        full_b, partial_b = full.tobytes(), partial.tobytes()
        match_full, match_partial, inserts, drains = [], [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m = pool.match(full_b)
            match_full.append(time.perf_counter() - t0)
            pool.release(m.handle)
            t0 = time.perf_counter()
            m = pool.match(partial_b)
            match_partial.append(time.perf_counter() - t0)
            pool.release(m.handle)
            ids = pool.alloc_mem(length // BLOCK_SIZE)
            t0 = time.perf_counter()
            pool.insert(partial_b, ids)
            inserts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pool.drain_events()  # the insert's deferred block hashes
            drains.append(time.perf_counter() - t0)
            pool.delete(partial_b)  # untimed: the tree stays as it was
            pool.drain_events()
        results[str(length)] = {
            "match_full": summarize(match_full),
            "match_partial": summarize(match_partial),
            "insert": summarize(inserts),
            "drain_after_insert": summarize(drains),
        }
    pool.check_integrity(deep=False)
    return results


# --------------------------------------------------------------------- via socket
def bench_index_socket(
    cached: list[np.ndarray], lengths: list[int], repeats: int
) -> dict[str, Any]:
    from common.mempool_client import MempoolClient
    from common.ready import ReadyWaiter

    total_blocks = sum(len(p) // BLOCK_SIZE for p in cached) + 4 * sum(lengths) // BLOCK_SIZE + 64

    async def main() -> dict[str, Any]:
        waiter = ReadyWaiter()
        env = dict(os.environ)
        # One fp16 layer keeps the (lazily committed) region small: the index does not care.
        env.update(
            {
                "MEMSERVE_MEMPOOL__INSTANCE_ID": "bench",
                "MEMSERVE_MEMPOOL__NUM_LAYERS": "1",
                "MEMSERVE_MEMPOOL__DTYPE": "float16",
                "MEMSERVE_MEMPOOL__DEVICE_BLOCKS": str(total_blocks),
                "MEMSERVE_MEMPOOL__TRANSPORTS": '["tcp"]',
                "MEMSERVE_MEMPOOL__LOG_LEVEL": "warning",
            }
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "mempool", "--ready", waiter.address],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        try:
            ready = await waiter.wait(
                ["bench"], timeout_s=60, alive=lambda: {"bench": proc.poll() is None}
            )
            client = MempoolClient(ready["bench"].endpoints["rpc"], timeout_s=60)
            for p in cached:
                await client.insert(p, await client.alloc_mem(len(p) // BLOCK_SIZE))
            rng = np.random.default_rng(7)
            out: dict[str, Any] = {}
            for length in lengths:
                full, partial = probe_prompts(length, cached, rng)
                await client.insert(full, await client.alloc_mem(length // BLOCK_SIZE))
                fb, pb = full.tobytes(), partial.tobytes()
                mf, mp_, ins = [], [], []
                for _ in range(repeats):
                    t = time.perf_counter()
                    m = await client.match(fb)
                    mf.append(time.perf_counter() - t)
                    await client.release(m.handle)
                    t = time.perf_counter()
                    m = await client.match(pb)
                    mp_.append(time.perf_counter() - t)
                    await client.release(m.handle)
                    ids = await client.alloc_mem(length // BLOCK_SIZE)
                    t = time.perf_counter()
                    await client.insert(pb, ids)
                    ins.append(time.perf_counter() - t)
                    await client.delete(pb)
                out[str(length)] = {
                    "match_full": summarize(mf),
                    "match_partial": summarize(mp_),
                    "insert": summarize(ins),
                }
            check = await client.check_integrity()
            out["integrity_ok"] = check.ok
            client.close()
            return out
        finally:
            proc.terminate()
            proc.wait(10)
            waiter.close()

    return asyncio.run(main())


# ----------------------------------------------------------------------- transfer
def bench_transfer(sizes_mib: list[int], transports: list[str]) -> dict[str, Any]:
    import bench.transport as tb

    out: dict[str, Any] = {}
    for mib in sizes_mib:
        nbytes = mib * 1024 * 1024
        row: dict[str, Any] = {
            "memcpy_gib_s": tb.measure_memcpy(nbytes),
            "raw_socket_gib_s": tb.measure_raw_socket(nbytes),
        }
        for name in transports:
            row[f"{name}_gib_s"] = tb.measure_throughput(name, nbytes)
        out[str(mib)] = row
    return out


# ---------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from bench import index_compare
    from services.mempool.transport import available_transports

    lengths = [int(x) for x in args.lengths.split(",") if x]
    rng = np.random.default_rng(0)
    cached = cached_prompts(args.cached, rng)
    result: dict[str, Any] = {"params": vars(args) | {"func": None}, "cached_prompts": len(cached)}
    print(
        f"index: {len(cached):,} cached prompts of 512 tokens ({len(cached) // 50} shared documents)"
    )
    side = index_compare.run(cached, args.repeats, args.sglang_radix)
    result["index_vs_sglang"] = side
    if side["sglang_source"] is None:
        print(index_compare.absent_line())
    else:
        version = side["sglang_version"] or "unknown version"
        print(f"SGLang {version} RadixCache from {side['sglang_source']} (page size 1)")
        if side["sglang_version"] != index_compare.sglang_radix.SGLANG_VERSION:
            print(f"  (the baseline is pinned at {index_compare.sglang_radix.SGLANG_VERSION})")
    print(format_table(index_compare.HEADERS, index_compare.rows(side)))
    result["index_inprocess"] = bench_index_inprocess(cached, lengths, args.repeats)
    if not args.skip_socket:
        result["index_socket"] = bench_index_socket(cached, lengths, max(20, args.repeats // 4))
    rows = []
    for length in lengths:
        for op in ("match_full", "match_partial", "insert", "drain_after_insert"):
            ip = result["index_inprocess"][str(length)][op]
            sk = result.get("index_socket", {}).get(str(length), {}).get(op, {})
            rows.append(
                [
                    f"{op} {length}",
                    fmt(ip["p50_us"]),
                    fmt(ip["p99_us"]),
                    fmt(sk.get("p50_us")),
                    fmt(sk.get("p99_us")),
                ]
            )
    print(
        format_table(
            ["op tokens", "in-proc p50 us", "in-proc p99 us", "socket p50 us", "socket p99 us"],
            rows,
        )
    )
    m4 = result["index_inprocess"].get("4096")
    if m4:
        print(
            f"targets: match 4K p50 {m4['match_full']['p50_us']:.1f} us (<= 50 us), "
            f"insert 4K p50 {m4['insert']['p50_us']:.1f} us (< 700 us)"
        )
    if not args.skip_transfer:
        transports = [t for t in args.transports.split(",") if t] or available_transports()
        sizes = [int(x) for x in args.sizes_mib.split(",") if x]
        result["transfer"] = bench_transfer(sizes, transports)
        rows = []
        for mib, row in result["transfer"].items():
            for name in transports:
                limit = row["memcpy_gib_s"] if name == "shm" else row["raw_socket_gib_s"]
                rows.append(
                    [
                        f"{name} {mib} MiB",
                        fmt(row[f"{name}_gib_s"], 2),
                        "memcpy" if name == "shm" else "raw socket",
                        fmt(limit, 2),
                        fmt(100 * row[f"{name}_gib_s"] / limit, 0) + "%",
                    ]
                )
        print(format_table(["transfer", "GiB/s", "limit", "limit GiB/s", "share"], rows))
    write_json(Path(args.out), result)
    print(f"saved {args.out}")
    return 0
