"""`memserve bench security`: what the locks cost, next to the same sockets unlocked, in one
run with the two interleaved (batch by batch), so machine noise hits both alike.

    memserve bench security                      # ~30 s on 2 cores
    memserve bench security --calls 2000 --rounds 10

- RPC round trip (ROUTER/DEALER, the placement and daemon RPC pattern) with a Place-sized
  request (~0.3 KB) and a 64 KiB one: plain vs CURVE with the cluster key, p50 / p99 µs;
- connection set-up: a new client's first call (connect, CURVE handshake with the ZAP
  check, one round trip): plain vs CURVE;
- one-way messages per second on PUSH/PULL (heartbeats, token chunks): plain vs CURVE.

The data plane's cost (the HMAC handshake, once per connection) is measured by `memserve
bench mempool` (transfer throughput) and reported in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.report import percentile, write_json

ANY = "tcp://127.0.0.1:0"


class Req(msgspec.Struct, frozen=True):
    body: bytes


class Rep(msgspec.Struct, frozen=True):
    n: int


def add_parser(sub: Any) -> None:
    p = sub.add_parser("security", help="CURVE's cost on control sockets, next to plain ones")
    p.add_argument("--calls", type=int, default=1000, help="round trips per batch")
    p.add_argument("--rounds", type=int, default=6, help="batches per lock (interleaved)")
    p.add_argument("--connects", type=int, default=100, help="new clients per lock")
    p.add_argument("--messages", type=int, default=20000, help="PUSH/PULL messages per lock")
    p.add_argument("--out", default="results/bench_security.json")
    p.set_defaults(func=run)


def _locks() -> dict[str, Any]:
    from common import security

    if security.installed_key() is None:
        security.install(security.KeyPair.generate())
    return {"plain": security.PLAIN, "curve": security.CLUSTER}


async def _round_trips(lock: Any, size: int, calls: int, rounds: int) -> list[float]:
    from common.sockets import RpcClient, RpcServer

    async def answer(req: Req) -> Rep:
        return Rep(len(req.body))

    samples: list[float] = []
    with RpcServer(ANY, Req, Rep, security=lock) as server:
        serving = asyncio.create_task(server.serve(answer))
        client = RpcClient(server.address, Req, Rep, security=lock)
        req = Req(b"x" * size)
        try:
            for _ in range(50):  # connect, warm up
                await client.call(req)
            for _ in range(calls * rounds):
                t = time.perf_counter()
                await client.call(req)
                samples.append(time.perf_counter() - t)
        finally:
            client.close()
            serving.cancel()
    return samples


async def _connects(lock: Any, n: int) -> list[float]:
    from common.sockets import RpcClient, RpcServer

    async def answer(req: Req) -> Rep:
        return Rep(0)

    samples: list[float] = []
    with RpcServer(ANY, Req, Rep, security=lock) as server:
        serving = asyncio.create_task(server.serve(answer))
        try:
            for _ in range(n):
                t = time.perf_counter()
                client = RpcClient(server.address, Req, Rep, security=lock)
                await client.call(Req(b""))
                samples.append(time.perf_counter() - t)
                client.close()
        finally:
            serving.cancel()
    return samples


async def _one_way(lock: Any, n: int) -> float:
    from common.sockets import PullSocket, PushSocket

    with (
        PullSocket(ANY, Req, bind=True, security=lock) as pull,
        PushSocket(pull.address, Req, bind=False, security=lock) as push,
    ):
        msg = Req(b"h" * 200)
        await push.send(msg)
        await pull.recv()

        async def send() -> None:
            for _ in range(n):
                await push.send(msg)

        t = time.perf_counter()
        sending = asyncio.create_task(send())
        for _ in range(n):
            await pull.recv()
        await sending
        return n / (time.perf_counter() - t)


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_us": round(1e6 * percentile(samples, 50), 1),
        "p99_us": round(1e6 * percentile(samples, 99), 1),
        "n": len(samples),
    }


async def measure(calls: int, rounds: int, connects: int, messages: int) -> dict[str, Any]:
    locks = _locks()
    out: dict[str, Any] = {}
    for name, size in (("rpc_small", 300), ("rpc_64k", 64 << 10)):
        samples: dict[str, list[float]] = {k: [] for k in locks}
        for _ in range(rounds):  # interleaved: one batch of each lock per round
            for k, lock in locks.items():
                samples[k] += await _round_trips(lock, size, calls, 1)
        out[name] = {k: _summary(v) for k, v in samples.items()}
        out[name]["added_p50_us"] = round(
            out[name]["curve"]["p50_us"] - out[name]["plain"]["p50_us"], 1
        )
    conn: dict[str, list[float]] = {k: [] for k in locks}
    for _ in range(2):
        for k, lock in locks.items():
            conn[k] += await _connects(lock, connects // 2)
    out["connect"] = {k: _summary(v) for k, v in conn.items()}
    rate: dict[str, list[float]] = {k: [] for k in locks}
    for _ in range(3):
        for k, lock in locks.items():
            rate[k].append(await _one_way(lock, messages // 3))
    out["push_msgs_per_s"] = {k: round(sorted(v)[1]) for k, v in rate.items()}
    return out


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(measure(args.calls, args.rounds, args.connects, args.messages))
    for name in ("rpc_small", "rpc_64k", "connect"):
        r = result[name]
        extra = f"   added p50 {r['added_p50_us']} µs" if "added_p50_us" in r else ""
        print(
            f"{name:10} plain p50 {r['plain']['p50_us']:8.1f} p99 {r['plain']['p99_us']:8.1f} µs"
            f" | curve p50 {r['curve']['p50_us']:8.1f} p99 {r['curve']['p99_us']:8.1f} µs{extra}"
        )
    rates = result["push_msgs_per_s"]
    print(f"push/pull  plain {rates['plain']:,} msg/s | curve {rates['curve']:,} msg/s")
    write_json(Path(args.out), result)
    print(f"saved {args.out}")
    return 0
