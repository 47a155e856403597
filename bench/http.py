"""`memserve bench http`: what the OpenAI HTTP API adds on top of the gateway's ZeroMQ
client protocol, on `tiny` (so the model's own time is small and the front door shows).

    memserve bench http                                    # a local colocated cluster
    memserve bench http --requests 400 --clients 16 --duration-s 10

- added latency: p50 / p99 of a one-token completion through HTTP (httpx, keep-alive,
  POST /v1/completions) and through `GatewayClient`, interleaved request by request (the
  order alternating) so that machine noise hits both alike; the difference is the HTTP
  path's cost (uvicorn, JSON, the API process's own hop to the gateway);
- sustained requests/s: `--clients` concurrent HTTP clients, each sending one-token
  requests back to back for `--duration-s`; the same through ZeroMQ clients for scale.

One cluster for the whole run, started by `memserve up`'s launcher (scheduler, MemPool
daemon, worker, gateway, api). Prints a table and saves JSON to --out-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import latency_summary_ms, machine_info, write_json

PROMPT = "The front door of a serving system, measured."


def add_parser(sub: Any) -> None:
    p = sub.add_parser("http", help="the HTTP API's added latency and request rate (tiny)")
    p.add_argument("--requests", type=int, default=200, help="one-token requests per path")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (rate test)")
    p.add_argument("--duration-s", type=float, default=5.0, help="length of each rate test")
    p.add_argument("--out-dir", default="results", help="bench_http.json goes here")
    p.set_defaults(func=run)


async def _http_one(http: Any) -> float:
    t = time.perf_counter()
    r = await http.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0},
    )
    elapsed = time.perf_counter() - t
    r.raise_for_status()
    return elapsed


async def _zmq_one(client: Any) -> float:
    from common.sampling import SamplingParams

    t = time.perf_counter()
    await client.complete(PROMPT, SamplingParams(max_tokens=1))
    return time.perf_counter() - t


async def _rate(one: Any, clients: list[Any], duration_s: float) -> dict[str, float]:
    done = 0
    deadline = time.perf_counter() + duration_s

    async def loop(c: Any) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one(c)
            done += 1

    t = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in clients))
    elapsed = time.perf_counter() - t
    return {"requests": done, "seconds": round(elapsed, 3), "requests_per_s": done / elapsed}


async def measure(
    http_url: str, gateway: str, requests: int, clients: int, duration_s: float
) -> dict[str, Any]:
    import httpx

    from common.client import GatewayClient

    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=http_url, timeout=60, limits=limits) as http:
        zmq = GatewayClient(gateway, timeout_s=60)
        try:
            for _ in range(5):  # connect, warm up both paths
                await _http_one(http)
                await _zmq_one(zmq)
            http_s: list[float] = []
            zmq_s: list[float] = []
            for i in range(requests):
                if i % 2:
                    http_s.append(await _http_one(http))
                    zmq_s.append(await _zmq_one(zmq))
                else:
                    zmq_s.append(await _zmq_one(zmq))
                    http_s.append(await _http_one(http))
            zmq_clients = [GatewayClient(gateway, timeout_s=60) for _ in range(clients)]
            try:
                http_rate = await _rate(_http_one, [http] * clients, duration_s)
                zmq_rate = await _rate(_zmq_one, zmq_clients, duration_s)
            finally:
                for c in zmq_clients:
                    c.close()
        finally:
            zmq.close()
    lat_http, lat_zmq = latency_summary_ms(http_s), latency_summary_ms(zmq_s)
    return {
        "latency_one_token": {
            "http": lat_http,
            "zmq": lat_zmq,
            "added_p50_ms": lat_http["p50_ms"] - lat_zmq["p50_ms"],
            "added_p99_ms": lat_http["p99_ms"] - lat_zmq["p99_ms"],
            "requests": requests,
        },
        "rate": {"clients": clients, "http": http_rate, "zmq": zmq_rate},
    }


async def bench_local(
    requests: int, clients: int, duration_s: float, run_dir: Path
) -> dict[str, Any]:
    """`measure` on a fresh local colocated cluster of `tiny`."""
    from services.launcher.config import load
    from services.launcher.supervisor import Cluster

    settings = load(
        None,
        {
            "cluster": {"mode": "colocated", "model": "tiny", "run_dir": str(run_dir)},
            "worker": {"engine": {"num_threads": 1}},
            "mempool": {"device_blocks": 256, "tensor_memory_bytes": 1 << 20},
        },
    )
    async with Cluster(settings) as cluster:
        assert cluster.http is not None
        return await measure(cluster.http, cluster.gateway, requests, clients, duration_s)


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    with tempfile.TemporaryDirectory(prefix="memserve-bench-http-") as tmp:
        result = asyncio.run(
            bench_local(args.requests, args.clients, args.duration_s, Path(tmp) / "run")
        )
    result["machine"] = machine_info()
    lat, rate = result["latency_one_token"], result["rate"]
    print(f"one-token request, {lat['requests']} each, interleaved (ms):")
    for path in ("http", "zmq"):
        s = lat[path]
        print(
            f"  {path:5} p50 {s['p50_ms']:7.2f}  p99 {s['p99_ms']:7.2f}  mean {s['mean_ms']:7.2f}"
        )
    print(f"  added by HTTP: p50 {lat['added_p50_ms']:.2f} ms, p99 {lat['added_p99_ms']:.2f} ms")
    print(f"sustained, {rate['clients']} concurrent clients:")
    for path in ("http", "zmq"):
        r = rate[path]
        print(
            f"  {path:5} {r['requests_per_s']:8.1f} requests/s ({r['requests']} in {r['seconds']} s)"
        )
    saved = write_json(out_dir / "bench_http.json", result)
    print(f"saved {saved}")
    return 0
