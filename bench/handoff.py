"""`memserve bench handoff`: what the prefill -> decode hand-off costs, one request at a time.

Per P/D mode, on a fresh cluster: `sessions` conversations of two turns (a `first`-token
first turn, a `second`-token second turn), sent one after another so nothing queues. For
each second turn, timed at the client from the raw chunks: TTFT, the gap between the
first token (streamed by the prefill worker) and the second (streamed by the decode worker
once the KV has moved), and the time per token after that. Medians over the sessions, the
first two sessions left out as warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from bench.report import format_table, machine_info, write_json
from common.modes import PD_MODES

MODES = list(PD_MODES)
WARMUP = 2


def add_parser(sub: Any) -> None:
    p = sub.add_parser("handoff", help="the P/D hand-off gap per mode, one request at a time")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--model", default="small")
    p.add_argument("--sessions", type=int, default=12)
    p.add_argument("--first", type=int, default=400, help="first turn's prompt tokens")
    p.add_argument("--second", type=int, default=40, help="second turn's new tokens")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", default="results/bench_handoff.json")
    p.set_defaults(func=run)


async def measure(mode: str, args: argparse.Namespace) -> dict[str, float]:
    from bench.experiment import Shape
    from common.client import GatewayClient
    from common.protocol import client as cp
    from common.sampling import SamplingParams
    from services.launcher.config import load
    from services.launcher.supervisor import Cluster

    settings = load(None, Shape(mode).overrides(args.model, 256, f".memserve/handoff/{mode}"))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    ttft, gap, tpot = [], [], []
    async with Cluster(settings) as cluster:
        client = GatewayClient(cluster.gateway, timeout_s=60)
        try:
            for i in range(args.sessions + WARMUP):
                sid = await client.open_session()
                for turn, n in enumerate((args.first, args.second)):
                    prompt = [1] * (turn == 0) + [rng.randrange(35, 130) for _ in range(n)]
                    t0 = time.perf_counter()
                    at: list[float] = []  # arrival time of each token
                    async for item in client.stream(prompt, params, sid):
                        if isinstance(item, cp.Chunk):
                            at += [time.perf_counter() - t0] * len(item.token_ids)
                    if i >= WARMUP and turn == 1 and len(at) > 2:
                        ttft.append(at[0])
                        gap.append(at[1] - at[0])
                        tpot.append((at[-1] - at[1]) / (len(at) - 2))
                await client.close_session(sid)
        finally:
            client.close()
    return {
        "ttft_ms": 1e3 * statistics.median(ttft),
        "gap_ms": 1e3 * statistics.median(gap),
        "tpot_ms": 1e3 * statistics.median(tpot),
    }


def run(args: argparse.Namespace) -> int:
    from common.cli_errors import fail

    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.sessions < 1 or args.max_tokens < 3:
        return fail(
            f"modes must be among {', '.join(MODES)} (got {', '.join(unknown) or 'ok'}); "
            "--sessions >= 1; --max-tokens >= 3"
        )
    results = {m: asyncio.run(measure(m, args)) for m in modes}
    rows = [
        [m, f"{r['ttft_ms']:.1f}", f"{r['gap_ms']:.1f}", f"{r['tpot_ms']:.1f}"]
        for m, r in results.items()
    ]
    print(format_table(["mode", "turn-2 TTFT ms", "1st->2nd token ms", "TPOT ms"], rows))
    params = {k: v for k, v in vars(args).items() if k != "func"}
    path = write_json(args.out, {"modes": results, "params": params, "machine": machine_info()})
    print(f"saved {path}")
    return 0
