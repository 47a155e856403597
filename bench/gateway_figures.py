"""What the gateway and the scheduler add and sustain, on a running cluster:

- one-token requests through the gateway vs straight to a worker (same prompt, same
  worker kind): the difference at p50 and p99 is the latency the gateway, the scheduler's
  placement and the extra hops add;
- closed-loop clients of one-token requests: requests per second the cluster sustains;
- Place + Release round trips against the scheduler alone, 16 in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.report import latency_summary_ms, percentile


async def gateway_figures(
    cluster: Any, latency_requests: int = 200, rate_seconds: float = 5.0, rate_clients: int = 8
) -> dict[str, Any]:
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
        for i in range(latency_requests):
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
        stop_at = time.perf_counter() + rate_seconds

        async def loop() -> None:
            nonlocal count
            while time.perf_counter() < stop_at:
                await client.complete("hi", one)
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(rate_clients)))
        out["cluster_rps"] = count / (time.perf_counter() - t0)

        # Scheduler alone: Place + Release round trips, 16 in flight.
        sched = RpcClient(
            cluster.endpoints("scheduler")["rpc"], sp.SchedulerRequest, sp.SchedulerReply
        )
        placed = 0
        stop_at = time.perf_counter() + rate_seconds

        async def place(k: int) -> None:
            nonlocal placed
            i = 0
            while time.perf_counter() < stop_at:
                rid = f"b{k}-{i}"
                i += 1
                await sched.call(sp.Place(request_id=rid, token_ids=prompt_ids * 8, max_tokens=16))
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
