"""Whole clusters on loopback, started by `memserve up`'s launcher: real processes for the
scheduler, MemPool daemons, workers and the gateway, driven through the Python client.

- P/D with PD-Caching-3: greedy tokens equal the single-process reference; a session's
  next turn hits the cache (whole blocks of the history); admin works and refuses a wrong
  token; cancelling frees every block; a decode worker killed with SIGKILL mid-stream gives
  the client an error within the timeout, the scheduler drops it, the next request is
  served; every daemon passes check_integrity when idle.
- Colocated with the locality policy: a request with a cached prefix goes to the instance
  that holds it, and under imbalance it does not. A client that disconnects mid-stream
  frees every block; a MemPool daemon killed with SIGKILL under a running request gives
  the client an error within the timeout, its worker turns unhealthy, the scheduler stops
  placing there and forgets its prefixes, and the next request is served elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from common.admin_client import admin_call
from common.client import GatewayClient, GatewayError
from common.protocol.admin import AdminReply
from common.sampling import SamplingParams
from services.launcher.config import load
from services.launcher.supervisor import Cluster
from tests.cluster_requests import all_idle_and_intact
from tests.gateway.harness import reference

pytestmark = pytest.mark.integration

BS = 16
TOKEN = "test-token"


def settings(
    tmp_path: Path, cluster: dict[str, Any], scheduler: dict[str, Any] | None = None
) -> Any:
    return load(
        None,
        {
            "cluster": {"run_dir": str(tmp_path / "run"), "admin_token": TOKEN, **cluster},
            "scheduler": {"heartbeat_timeout_s": 1.5, **(scheduler or {})},
            "gateway": {"request_timeout_s": 20},
            "worker": {"heartbeat_interval_s": 0.25, "engine": {"num_threads": 1}},
            "mempool": {"device_blocks": 256, "tensor_memory_bytes": 1 << 20},
        },
    )


async def admin(cluster: Cluster, command: str, *args: str, token: str = TOKEN) -> AdminReply:
    return await admin_call(cluster.admin_address, token, command, args)


async def running_on(cluster: Cluster) -> str:
    """The colocated worker that is running a request now (asked over its control socket)."""
    for iid in ("colocated-0", "colocated-1"):
        status = await admin_call(cluster.endpoints(iid)["control"], TOKEN, "status")
        if status.ok and status.result["running"]:
            return iid
    raise AssertionError("no worker is running a request")


async def until_uncharged(cluster: Cluster, timeout_s: float = 15.0) -> None:
    """Until no instance carries a placement's charge (every request released)."""
    deadline = time.monotonic() + timeout_s
    while any(r["charged_tokens"] for r in (await admin(cluster, "instances")).result):
        assert time.monotonic() < deadline, "charges never released"
        await asyncio.sleep(0.1)


def tiny_prompt(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 259) for _ in range(n - 1)]


async def test_pd_cluster(tmp_path: Path) -> None:
    shape = settings(tmp_path, {"mode": "pd-caching-3", "prefill": 1, "decode": 2})
    async with Cluster(shape) as c:
        await check_pd_cluster(c)


async def check_pd_cluster(c: Cluster) -> None:
    client = GatewayClient(c.gateway, timeout_s=30)
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    try:
        # Tokens of the single-process reference, through gateway, scheduler, P and D.
        p1 = tiny_prompt(45, 1)
        done = await client.complete(p1, greedy)
        assert done.token_ids == reference(p1, 12)
        assert done.final.finish_reason == "length" and done.final.instances[0] == "prefill-0"

        # A session: turn 2's prompt is the history plus the new text; PD-Caching-3 left
        # the whole of turn 1 (prompt and decode phase) cached on the prefill side.
        sid = await client.open_session()
        t1 = await client.complete(
            "The first turn of our conversation, long enough.", greedy, session_id=sid
        )
        t2 = await client.complete(" And a second one.", greedy, session_id=sid)
        history = t1.final.num_prompt_tokens + t1.final.num_output_tokens
        assert t2.final.num_cached_tokens == (history - 1) // BS * BS > 0
        assert t2.final.num_prompt_tokens == history + len(" And a second one.")
        with pytest.raises(GatewayError, match="unknown session"):
            await client.complete("x", greedy, session_id="no-such-session")
        with pytest.raises(GatewayError, match="prompt too long"):
            await client.complete([5] * 5000, greedy)
        with pytest.raises(GatewayError, match="top_p"):
            await client.complete("x", SamplingParams(top_p=0.0))

        # Admin: a wrong token is refused; the right one sees the instances.
        refused = await admin(c, "status", token="wrong")
        assert not refused.ok and "token" in refused.error
        status = await admin(c, "status")
        assert status.ok and status.result["mode"] == "pd-caching-3"
        listed = {i["instance_id"] for i in (await admin(c, "instances")).result}
        assert listed == {"prefill-0", "decode-0", "decode-1"}

        # Cancel mid-stream (leaving the iterator sends Cancel): every block comes back.
        long = SamplingParams(max_tokens=400, ignore_eos=True)
        async for _ in client.generate(tiny_prompt(40, 2), long):
            break
        await asyncio.sleep(0.5)
        await all_idle_and_intact(c)

        # SIGKILL the decode worker mid-stream: an error within the timeout, not a hang.
        assert (await admin(c, "drain", "decode-1")).ok  # so the stream goes to decode-0
        chunks = 0
        t0 = time.monotonic()
        with pytest.raises(GatewayError, match="decode-0"):
            async for _ in client.generate(
                tiny_prompt(40, 3), SamplingParams(max_tokens=4000, ignore_eos=True)
            ):
                chunks += 1
                if chunks == 3:
                    os.kill(c.children["decode-0"].proc.pid, signal.SIGKILL)
                    t0 = time.monotonic()
        assert time.monotonic() - t0 < 15
        assert (await admin(c, "undrain", "decode-1")).ok
        for _ in range(50):
            listed = {i["instance_id"] for i in (await admin(c, "instances")).result}
            if "decode-0" not in listed:
                break
            await asyncio.sleep(0.1)
        assert "decode-0" not in listed
        again = await client.complete(p1, greedy)
        assert again.token_ids == done.token_ids
        assert again.final.instances == ["prefill-0", "decode-1"]
        await asyncio.sleep(0.5)
        await all_idle_and_intact(c)
    finally:
        client.close()


async def test_locality_follows_the_prefix_unless_imbalanced(tmp_path: Path) -> None:
    shape = settings(
        tmp_path,
        # No restarts: the killed daemon below must stay dead for its worker to stay unhealthy.
        {"mode": "colocated", "colocated": 2, "policy": "locality", "restart": False},
        {"balance_abs_threshold_tokens": 64, "fetch": False},
    )
    async with Cluster(shape) as c:
        await check_locality(c)


async def check_locality(c: Cluster) -> None:
    client = GatewayClient(c.gateway, timeout_s=30)
    short = SamplingParams(max_tokens=4, ignore_eos=True)
    try:
        doc = tiny_prompt(130, 7)
        first = await client.complete(doc, short)
        holder = first.final.instances[0]
        other = ({"colocated-0", "colocated-1"} - {holder}).pop()
        for _ in range(100):  # the holder's KV events reach the scheduler's tree
            rows = {i["instance_id"]: i for i in (await admin(c, "instances")).result}
            if rows[holder]["cached_blocks"] >= 8:
                break
            await asyncio.sleep(0.05)
        # Balanced: every request sharing the document goes where it is cached.
        for k in range(3):
            r = await client.complete(doc + tiny_prompt(10, 20 + k)[1:], short)
            assert r.final.instances == [holder]
            assert r.final.num_cached_tokens == 128
        # Imbalanced: a long request charges the holder; the next one goes elsewhere.
        stream = client.generate([*doc, 9, 9, 9], SamplingParams(max_tokens=3000, ignore_eos=True))
        await stream.__anext__()
        side = GatewayClient(c.gateway, timeout_s=30)
        try:
            r = await side.complete([*doc, 7, 7], short)
        finally:
            side.close()
        assert r.final.instances == [other]
        await stream.aclose()  # cancels the long request
        await asyncio.sleep(0.5)
        await all_idle_and_intact(c)

        # A client that goes away mid-stream sends no Cancel (its socket just closes): the
        # gateway's next send to it fails, it aborts the request, every block comes back.
        gone = GatewayClient(c.gateway, timeout_s=30)
        async for _ in gone.generate(doc, SamplingParams(max_tokens=3000, ignore_eos=True)):
            gone.close()
            break
        await asyncio.sleep(0.5)
        await all_idle_and_intact(c)

        # SIGKILL the holder's MemPool daemon under a running request: its worker fails the
        # request (an error within the timeout, not a hang) and reports itself unhealthy,
        # the scheduler stops placing there and forgets its cached prefixes, and the next
        # request is served by the other instance with the reference tokens.
        # Charges of the cancelled and abandoned requests above are released by now or
        # soon; until then the holder may look loaded and the request go elsewhere. Which
        # worker runs it is read from the workers themselves, and that one's daemon dies.
        await until_uncharged(c)
        t0 = time.monotonic()
        killed = False
        with pytest.raises(GatewayError) as failed:
            async for _ in client.generate(
                [*doc, 5], SamplingParams(max_tokens=4000, ignore_eos=True)
            ):
                if not killed:
                    killed = True
                    holder = await running_on(c)
                    other = ({"colocated-0", "colocated-1"} - {holder}).pop()
                    os.kill(c.children[f"{holder}-mempool"].proc.pid, signal.SIGKILL)
                    t0 = time.monotonic()
        assert holder in str(failed.value)
        assert time.monotonic() - t0 < 15
        rows = {i["instance_id"]: i for i in (await admin(c, "instances")).result}
        assert rows[holder]["state"] == "unhealthy" and rows[holder]["cached_blocks"] == 0
        tail = [*doc, 3, 4]
        r = await client.complete(tail, short)
        assert r.final.instances == [other] and r.token_ids == reference(tail, 4)
        await all_idle_and_intact(c)
    finally:
        client.close()
