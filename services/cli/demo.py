"""`memserve demo`: the main job on the embedded model, end to end.

Starts a local prefill/decode cluster (PD-Caching-3) with the launcher of `memserve up`,
streams one completion through the gateway, runs a short multi-turn chat workload (bench/workloads, ShareGPT-like),
then does the same workload on a cluster without caching (PD-Basic) and prints cache hit
rate and TTFT side by side. Every cluster is stopped before the command returns.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from common.cli_errors import fail
from common.ready import StartupError

PROMPT = "MemServe keeps the KV cache of every turn, so the next turn"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="start a P/D cluster, stream, compare caching on and off")
    p.add_argument("--model", default="tiny")
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--scale", type=float, default=0.2, help="ShareGPT-like lengths x this")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(args))
    except StartupError as exc:
        return fail(str(exc))


async def _demo(args: argparse.Namespace) -> int:
    from bench.experiment import Shape, warm_up
    from bench.loadgen import LoadClient
    from bench.results import summarize
    from bench.workloads import build
    from common.client import GatewayClient
    from common.sampling import SamplingParams
    from services.launcher.config import load
    from services.launcher.supervisor import Cluster

    # Short ShareGPT-like conversations, all starting at once; the same ones in both modes.
    workload = build("chat", sessions=args.sessions, rate=0, scale=args.scale, seed=0)
    n = workload.num_requests()
    figures: dict[str, dict[str, Any]] = {}
    for mode in ("pd-caching-3", "pd-basic"):
        settings = load(None, Shape(mode).overrides(args.model, 64, f".memserve/demo/{mode}"))
        print(f"== starting a local {mode} cluster (1 prefill + 1 decode worker) ...", flush=True)
        async with Cluster(settings) as cluster:
            print(f"   gateway {cluster.gateway}, logs in {cluster.run_dir}/", flush=True)
            if mode == "pd-caching-3":
                client = GatewayClient(cluster.gateway, timeout_s=60)
                try:
                    sys.stdout.write(f"== streaming a completion\n{PROMPT}")
                    params = SamplingParams(max_tokens=48)
                    async for text in client.generate(PROMPT, params):
                        sys.stdout.write(text)
                        sys.stdout.flush()
                    sys.stdout.write("\n")
                finally:
                    client.close()
            await warm_up(cluster, 2)
            print(f"== {len(workload.sessions)} conversations, {n} requests", flush=True)
            result = await LoadClient(cluster.gateway, timeout_s=120).run(workload)
            r = summarize(result.records, result.wall_s)
            if r["errors"] or result.unsent:
                return fail(f"{r['errors']} requests failed in {mode}")
            figures[mode] = r
    on, off = figures["pd-caching-3"], figures["pd-basic"]
    print()
    print(f"{'':28}{'caching on (pd-caching-3)':>28}{'caching off (pd-basic)':>26}")
    print(f"{'cache hit rate':28}{100 * on['hit_rate']:>27.1f}%{100 * off['hit_rate']:>25.1f}%")
    for key, label in (("ttft", "TTFT"), ("jct", "JCT")):
        for stat in ("mean_ms", "p99_ms"):
            name = f"{label} {stat.replace('_ms', '')} (ms)"
            print(f"{name:28}{on[key][stat]:>28.1f}{off[key][stat]:>26.1f}")
    return 0
