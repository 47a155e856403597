"""`memserve up`'s supervision on a real colocated cluster: each kind of process (worker,
MemPool daemon, gateway, scheduler) killed with SIGKILL under a streaming request gives the
client a clear outcome, is started again on the endpoints it had, and the cluster serves
the same greedy tokens through the same gateway address afterwards (a killed daemon's
worker re-attaches without a restart of its own); every daemon passes its integrity check.
Outcome and kill-to-serving times are printed, not asserted. An admin `shutdown` still
ends the whole cluster, and nothing is restarted after it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from common.admin_client import admin_call
from common.client import GatewayClient, GatewayGone
from common.mempool_client import MempoolClient
from common.protocol import client as cp
from common.sampling import SamplingParams
from services.launcher import scrape
from services.launcher.config import load
from services.launcher.plan import stable_endpoints
from services.launcher.supervisor import Cluster

pytestmark = pytest.mark.integration

TOKEN = "heal-token"
PROMPT = [1, *range(40, 80)]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def settings(tmp_path: Path) -> Any:
    return load(
        None,
        {
            "cluster": {
                "mode": "colocated",
                "run_dir": str(tmp_path / "run"),
                "admin_token": TOKEN,
                "restart_backoff_s": 0.2,
            },
            "scheduler": {"heartbeat_timeout_s": 1.5},
            "gateway": {"request_timeout_s": 10},
            "worker": {"heartbeat_interval_s": 0.2, "engine": {"num_threads": 1}},
            "mempool": {"device_blocks": 64, "tensor_memory_bytes": 1 << 20},
        },
    )


async def serve_again(client: GatewayClient, deadline_s: float = 30.0) -> list[int]:
    """The prompt's tokens once the cluster serves again (requests fail meanwhile)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return (await asyncio.wait_for(client.complete(PROMPT, GREEDY), 3.0)).token_ids
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def check_daemons(cluster: Cluster) -> None:
    for iid, child in cluster.children.items():
        if child.spec.kind != "mempool":
            continue
        client = MempoolClient(child.endpoints["rpc"])
        try:
            check = await client.check_integrity()
            assert check.ok, f"{iid}: {check.message}"
        finally:
            client.close()


async def test_admin_shutdown_still_ends_the_cluster(tmp_path: Path) -> None:
    stop = asyncio.Event()
    async with Cluster(settings(tmp_path)) as cluster:
        watching = asyncio.create_task(cluster.wait(stop))
        reply = await admin_call(cluster.admin_address, TOKEN, "shutdown")
        assert reply.ok, reply.error
        why = await asyncio.wait_for(watching, 30)
        assert "exited with code 0" in why, why
        assert cluster.restarts == 0 and not cluster.restarting()


async def test_stop_while_a_restart_is_pending(tmp_path: Path) -> None:
    shape = settings(tmp_path)
    shape.cluster.restart_backoff_s = 30.0  # the restart waits while the cluster stops
    shape.cluster.restart_backoff_max_s = 30.0
    stop = asyncio.Event()
    cluster = Cluster(shape)
    async with cluster:
        watching = asyncio.create_task(cluster.wait(stop))
        os.kill(cluster.children["colocated-0"].proc.pid, signal.SIGKILL)
        while cluster.restarting() != ["colocated-0"]:
            await asyncio.sleep(0.05)
        stop.set()
        assert await watching == "stop requested"
        t0 = time.monotonic()
    print(f"\nstopped with a restart pending in {time.monotonic() - t0:.2f} s")
    assert cluster.restarts == 0 and not cluster.restarting()
    assert not any(c.alive for c in cluster.children.values())


# What a client streaming through the cluster sees when each kind dies under it: the worker
# or its daemon (the request's KV is gone) ends the stream with an error naming the
# instance; the gateway, with GatewayGone from the client's own liveness check; the
# scheduler is not on a running request's path, so the stream completes.
OUTCOME = {
    "colocated-0": "error naming the instance",
    "colocated-0-mempool": "error naming the instance",
    "gateway": "gateway gone",
    "scheduler": "completed",
}
LONG = SamplingParams(max_tokens=900, ignore_eos=True)  # within 64 blocks of KV


async def stream_until_killed(client: GatewayClient, kill: Any) -> tuple[str, float, str]:
    """Stream a long request, kill after its first token; (outcome, seconds from the kill
    to the outcome, what the client was told)."""
    killed = 0.0
    try:
        async for item in client.stream(PROMPT, LONG):
            if not killed and isinstance(item, cp.Chunk) and item.token_ids:
                kill()
                killed = time.monotonic()
            if isinstance(item, cp.Final):
                took = time.monotonic() - killed
                if item.finish_reason == "error":
                    return "error", took, item.error
                return "completed", took, item.finish_reason
    except GatewayGone as exc:
        return "gateway gone", time.monotonic() - killed, str(exc)
    raise AssertionError("the stream ended without a Final")


@pytest.mark.parametrize("victim", list(OUTCOME))
async def test_a_kill_mid_stream_gives_a_clear_outcome_and_the_cluster_heals(
    tmp_path: Path, victim: str
) -> None:
    """SIGKILL of `victim` under a streaming request: the client's outcome is the one
    OUTCOME names; the victim is restarted once, on the endpoints it had; the cluster
    serves the same greedy tokens as before; a killed daemon's worker re-attached rather
    than restarted; every daemon passes its integrity check."""
    stop = asyncio.Event()
    async with Cluster(settings(tmp_path)) as cluster:
        watching = asyncio.create_task(cluster.wait(stop))
        kind = cluster.children[victim].spec.kind
        endpoints = stable_endpoints(kind, cluster.endpoints(victim))
        worker_pid = cluster.children["colocated-0"].proc.pid
        # The client's own timeout is far above what any outcome may take: an outcome is
        # the cluster's doing, never the client giving up.
        client = GatewayClient(cluster.gateway, timeout_s=600)
        try:
            before = await serve_again(client)
            pid = cluster.children[victim].proc.pid
            outcome, took, told = await stream_until_killed(
                client, lambda: os.kill(pid, signal.SIGKILL)
            )
            expected = OUTCOME[victim]
            if expected == "error naming the instance":
                assert outcome == "error" and "colocated-0" in told, (outcome, told)
            else:
                assert outcome == expected, (outcome, told)
            killed = time.monotonic() - took
            assert await serve_again(client, deadline_s=60) == before
            back = time.monotonic() - killed
            # Restarted once, on the endpoints it had; the cluster still watched.
            deadline = time.monotonic() + 10
            while cluster.restarts < 1 or cluster.restarting():
                assert time.monotonic() < deadline, cluster.restarting()
                await asyncio.sleep(0.05)
            assert cluster.restarts == 1 and cluster.children[victim].alive
            assert stable_endpoints(kind, cluster.endpoints(victim)) == endpoints
            # Its /metrics is back on the port it had, and the scrape config names it.
            assert "metrics" in endpoints
            assert cluster.endpoints(victim)["metrics"].split("/")[2] in str(
                cluster.metrics_targets()
            )
            assert cluster.scrape_config.read_text() == scrape.render(cluster.metrics_targets())
            assert not watching.done()
            if victim == "colocated-0-mempool":  # its worker re-attached, not restarted
                assert cluster.children["colocated-0"].proc.pid == worker_pid
            await check_daemons(cluster)
            print(
                f"\n{victim}: client outcome '{outcome}' {took:.2f} s after SIGKILL "
                f"({told[:80]}); serving again after {back:.2f} s"
            )
        finally:
            client.close()
            stop.set()
            assert await watching == "stop requested"
