"""`memserve bench serve`: a multi-turn chat workload through the whole cluster, once per
caching mode, side by side; plus the gateway's added latency and the request rates the
gateway and the scheduler sustain.

Workload (ShareGPT-like, synthetic and seeded): `sessions` conversations run at once, each
`turns` turns long; a turn is a user message (text) sent in the session, so the gateway
prepends the history, and the next turn starts when the answer is complete. Each mode runs
on a fresh cluster started by `memserve up`'s launcher (cold caches), or once against a
running cluster with `--gateway`.

Figures per mode: mean / p99 TTFT and JCT (request receipt to last token, at the gateway),
and the cache hit rate (cached prompt tokens / prompt tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import string
import time
from typing import Any, cast

from bench.report import (
    CpuMonitor,
    fmt,
    format_table,
    latency_summary_ms,
    machine_info,
    percentile,
    write_json,
)

MODES = [
    "colocated-nocache",
    "colocated",
    "pd-basic",
    "pd-caching-1",
    "pd-caching-2",
    "pd-caching-3",
]
PAPER = {"ttft_mean": 0.58, "jct_mean": 0.17}  # MemServe, ShareGPT: caching on top of PD


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="chat workload through the cluster, per caching mode")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--gateway", default="", help="run once against this running cluster")
    p.add_argument("--model", default="small", help="small: prefill costs enough to matter")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--first-tokens", type=int, default=160, help="first turn's message length")
    p.add_argument("--turn-tokens", type=int, default=40, help="later turns' message length")
    p.add_argument("--max-tokens", type=int, default=24, help="answer length")
    p.add_argument("--latency-requests", type=int, default=200)
    p.add_argument("--rate-seconds", type=float, default=5.0)
    p.add_argument("--rate-clients", type=int, default=8)
    p.add_argument("--skip-gateway", action="store_true", help="skip latency and rate figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench_serve.json")
    p.set_defaults(func=run)


def cluster_overrides(mode: str, model: str) -> dict[str, Any]:
    cluster: dict[str, Any] = {"model": model, "run_dir": f".memserve/bench/{mode}"}
    if mode.startswith("colocated"):
        cluster |= {"mode": "colocated", "caching": mode == "colocated", "colocated": 2}
    else:
        cluster |= {"mode": mode, "prefill": 1, "decode": 1}
    return {
        "cluster": cluster,
        "worker": {"engine": {"num_threads": 1}},
        "mempool": {"device_memory_bytes": 64 * 1024 * 1024, "tensor_memory_bytes": 1 << 20},
    }


def messages(args: argparse.Namespace) -> list[list[str]]:
    """Per session, the user's message of each turn (printable text; 1 byte = 1 token)."""
    rng = random.Random(args.seed)
    alphabet = string.ascii_letters + string.digits + " .,"

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    return [
        [text(args.first_tokens if t == 0 else args.turn_tokens) for t in range(args.turns)]
        for _ in range(args.sessions)
    ]


async def chat_workload(address: str, convs: list[list[str]], max_tokens: int) -> dict[str, Any]:
    from common.client import GatewayClient
    from common.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    records: list[dict[str, Any]] = []
    client = GatewayClient(address, timeout_s=120)

    async def session(turns: list[str]) -> None:
        sid = await client.open_session()
        for i, text in enumerate(turns):
            done = await client.complete(text, params, session_id=sid)
            f = done.final
            records.append(
                {
                    "turn": i,
                    "ttft_s": f.ttft_s,
                    "jct_s": f.total_s,
                    "prompt": f.num_prompt_tokens,
                    "cached": f.num_cached_tokens,
                    "output": f.num_output_tokens,
                    "error": f.error,
                }
            )
        await client.close_session(sid)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(session(turns) for turns in convs))
    finally:
        client.close()
    wall = time.perf_counter() - t0
    ok = [r for r in records if not r["error"]]
    prompt = sum(r["prompt"] for r in ok)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "wall_s": wall,
        "ttft": latency_summary_ms([r["ttft_s"] for r in ok]),
        "jct": latency_summary_ms([r["jct_s"] for r in ok]),
        "hit_rate": sum(r["cached"] for r in ok) / prompt if prompt else 0.0,
        "prompt_tokens": prompt,
        "output_tokens": sum(r["output"] for r in ok),
        "records": records,
    }


async def gateway_figures(cluster: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One-token requests: through the gateway vs straight to a worker (the difference is
    what the gateway and scheduler add); then request rates."""
    from common.client import GatewayClient
    from common.protocol import scheduler as sp
    from common.protocol import worker as wp
    from common.sampling import SamplingParams
    from common.sockets import PullSocket, PushSocket, RpcClient

    one = SamplingParams(max_tokens=1, ignore_eos=True)
    prompt_ids = [1] + [ord(c) + 3 for c in "hello there"]
    worker = next(i for i, c in cluster.children.items() if c.spec.kind == "worker")
    client = GatewayClient(cluster.gateway, timeout_s=60)
    replies = PullSocket("tcp://127.0.0.1:0", wp.TokenChunk, bind=True)
    direct = PushSocket(cluster.endpoints(worker)["requests"], wp.Generate, bind=False)
    out: dict[str, Any] = {}
    try:
        for _ in range(10):  # warm up both paths
            await client.complete("hello there", one)
        via, straight = [], []
        for i in range(args.latency_requests):
            t = time.perf_counter()
            await client.complete("hello there", one)
            via.append(time.perf_counter() - t)
            t = time.perf_counter()
            await direct.send(wp.Generate(f"d{i}", prompt_ids, one, replies.address, False))
            while not (await replies.recv()).finished:
                pass
            straight.append(time.perf_counter() - t)
        out["one_token_gateway"] = latency_summary_ms(via)
        out["one_token_direct"] = latency_summary_ms(straight)
        out["added_p50_ms"] = 1e3 * (percentile(via, 50) - percentile(straight, 50))
        out["added_p99_ms"] = 1e3 * (percentile(via, 99) - percentile(straight, 99))

        # Cluster request rate: closed-loop clients of one-token requests.
        count = 0
        stop_at = time.perf_counter() + args.rate_seconds

        async def loop() -> None:
            nonlocal count
            while time.perf_counter() < stop_at:
                await client.complete("hi", one)
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(args.rate_clients)))
        out["cluster_rps"] = count / (time.perf_counter() - t0)

        # Scheduler alone: Place + Release round trips, 16 in flight.
        sched: RpcClient[Any, Any] = RpcClient(
            cluster.endpoints("scheduler")["rpc"],
            cast(Any, sp.SchedulerRequest),
            cast(Any, sp.SchedulerReply),
        )
        placed = 0
        stop_at = time.perf_counter() + args.rate_seconds

        async def place(k: int) -> None:
            nonlocal placed
            i = 0
            while time.perf_counter() < stop_at:
                rid = f"b{k}-{i}"
                i += 1
                await sched.call(sp.Place(rid, prompt_ids * 8, 16))
                await sched.call(sp.Release(rid))
                placed += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(place(k) for k in range(16)))
        out["scheduler_place_per_s"] = placed / (time.perf_counter() - t0)
        sched.close()
    finally:
        client.close()
        replies.close()
        direct.close()
    return out


async def run_modes(args: argparse.Namespace) -> dict[str, Any]:
    from services.launcher.config import load
    from services.launcher.supervisor import Cluster

    convs = messages(args)
    results: dict[str, Any] = {}
    if args.gateway:
        results["running-cluster"] = await chat_workload(args.gateway, convs, args.max_tokens)
        return {"modes": results}
    extra: dict[str, Any] = {}
    for mode in [m for m in args.modes.split(",") if m]:
        settings = load(None, cluster_overrides(mode, args.model))
        print(f"[{mode}] starting a cluster ...", flush=True)
        async with Cluster(settings) as cluster:
            results[mode] = await chat_workload(cluster.gateway, convs, args.max_tokens)
            r = results[mode]
            print(
                f"[{mode}] {r['requests']} requests, {r['errors']} errors, "
                f"TTFT mean {r['ttft']['mean_ms']:.1f} ms, hit rate {100 * r['hit_rate']:.1f}%",
                flush=True,
            )
            if mode == "colocated" and not args.skip_gateway:
                extra = await gateway_figures(cluster, args)
    return {"modes": results, "gateway": extra}


def gain(base: dict[str, Any], new: dict[str, Any], key: str) -> float:
    b, n = base[key]["mean_ms"], new[key]["mean_ms"]
    return (b - n) / b if b else float("nan")


def run(args: argparse.Namespace) -> int:
    monitor = CpuMonitor().start()
    result = asyncio.run(run_modes(args))
    result["cpu"] = monitor.stop()
    result["machine"] = machine_info()
    result["params"] = {k: v for k, v in vars(args).items() if k != "func"}
    modes = result["modes"]
    rows = [
        [
            mode,
            str(r["requests"]),
            str(r["errors"]),
            fmt(r["ttft"]["mean_ms"]),
            fmt(r["ttft"]["p99_ms"]),
            fmt(r["jct"]["mean_ms"]),
            fmt(r["jct"]["p99_ms"]),
            fmt(100 * r["hit_rate"]),
        ]
        for mode, r in modes.items()
    ]
    print()
    print(
        format_table(
            ["mode", "reqs", "err", "TTFT mean ms", "TTFT p99", "JCT mean ms", "JCT p99", "hit %"],
            rows,
        )
    )
    pairs = [
        ("pd-basic", "pd-caching-3"),
        ("pd-basic", "pd-caching-2"),
        ("colocated-nocache", "colocated"),
    ]
    gains = {}
    for base, new in pairs:
        if base in modes and new in modes:
            g = {
                "ttft_mean": gain(modes[base], modes[new], "ttft"),
                "jct_mean": gain(modes[base], modes[new], "jct"),
            }
            gains[f"{new} vs {base}"] = g
            print(
                f"caching gain {new} vs {base}: mean TTFT {100 * g['ttft_mean']:.1f}% lower, "
                f"mean JCT {100 * g['jct_mean']:.1f}% lower "
                f"(paper, ShareGPT: {100 * PAPER['ttft_mean']:.0f}% / {100 * PAPER['jct_mean']:.0f}%)"
            )
    result["gains"] = gains
    gw = result.get("gateway") or {}
    if gw:
        print(
            f"gateway: one-token request p50 {gw['one_token_gateway']['p50_ms']:.2f} ms / "
            f"p99 {gw['one_token_gateway']['p99_ms']:.2f} ms through the cluster, "
            f"{gw['one_token_direct']['p50_ms']:.2f} / {gw['one_token_direct']['p99_ms']:.2f} ms "
            f"straight to a worker: added p50 {gw['added_p50_ms']:.2f} ms, p99 {gw['added_p99_ms']:.2f} ms"
        )
        print(
            f"rates: cluster {gw['cluster_rps']:.0f} one-token requests/s "
            f"({args.rate_clients} clients), scheduler {gw['scheduler_place_per_s']:.0f} place+release/s"
        )
    print(f"other processes used {fmt(result['cpu']['other_cores'], 2)} cores meanwhile")
    path = write_json(args.out, result)
    print(f"saved {path}")
    return 0 if all(r["errors"] == 0 for r in modes.values()) else 1
