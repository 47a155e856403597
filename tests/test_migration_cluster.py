"""Live migration across real processes: `memserve up --mode colocated --colocated 2`, a
running request moved with its KV by `memserve admin migrate` through the scheduler.

- Greedy and seeded requests migrated mid-stream get exactly the single-process reference
  tokens, and the gateway's final lists both instances.
- Bad commands (unknown request or instance, the instance it already runs on, wrong
  arguments) get a clear error.
- A destination that does not answer (SIGSTOPped): the migration fails within its
  timeouts, never hangs; the request runs on at the source to its reference tokens; the
  destination frees what it reserved once it runs again.
- Afterwards both daemons pass check_integrity when idle and no worker holds reserved blocks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from common.client import GatewayClient
from common.mempool_client import MempoolClient
from common.sampling import SamplingParams
from services.launcher.supervisor import Cluster
from tests.cluster_requests import (
    MEMBERS,
    Stream,
    admin,
    colocated_pair,
    prompt,
    reference,
    until,
    worker_status,
)
from tests.daemons import assert_idle_and_intact

pytestmark = pytest.mark.integration

CALL_TIMEOUT_S = 2.0


def settings(tmp_path: Path) -> Any:
    return colocated_pair(
        tmp_path, scheduler={"heartbeat_timeout_s": 4.0, "elastic_timeout_s": CALL_TIMEOUT_S}
    )


def workload() -> dict[str, tuple[list[int], SamplingParams]]:
    return {
        # Long enough to still be running when each is moved (after 40 tokens) on an
        # engine that decodes tiny's tokens in well under a millisecond.
        "g": (prompt(40, 1), SamplingParams(max_tokens=1200, ignore_eos=True)),
        "s": (
            prompt(33, 2),
            SamplingParams(max_tokens=1200, ignore_eos=True, temperature=0.8, top_k=50, seed=11),
        ),
        "f": (
            prompt(27, 3),
            SamplingParams(max_tokens=200, ignore_eos=True, temperature=1.0, seed=12),
        ),
    }


async def placed(c: Cluster, known: set[str]) -> str:
    """The scheduler's id of the one placed request not in `known`."""
    deadline = time.monotonic() + 15
    while True:
        listing = await admin(c, "migrate")
        assert listing.ok, listing.error
        new = set(listing.result["requests"]) - known
        if new:
            (rid,) = new
            return rid
        assert time.monotonic() < deadline, "the request was never placed"
        await asyncio.sleep(0.05)


async def where(c: Cluster, rid: str) -> str:
    listing = await admin(c, "migrate")
    return str(listing.result["requests"][rid])


def other(iid: str) -> str:
    return MEMBERS[1 - MEMBERS.index(iid)]


async def test_migrate_mid_stream_gives_reference_tokens_and_failures_are_clean(
    tmp_path: Path,
) -> None:
    work = workload()
    ref = reference(work)
    async with Cluster(settings(tmp_path)) as c:
        client = GatewayClient(c.gateway, timeout_s=60)
        try:
            bad = await admin(c, "migrate", "nope", MEMBERS[1])
            assert not bad.ok and "nope" in bad.error, bad.error
            bad = await admin(c, "migrate", "a", "b", "c")
            assert not bad.ok and "REQUEST_ID INSTANCE_ID" in bad.error, bad.error

            # Greedy and seeded, each moved to the other instance mid-stream.
            streams: dict[str, Stream] = {}
            rids: dict[str, str] = {}
            for name in "gs":
                streams[name] = Stream(client, *work[name])
                rids[name] = await placed(c, set(rids.values()))
            await until(lambda: all(len(s.tokens) >= 40 for s in streams.values()), what="tokens")
            results = {}
            for name, rid in rids.items():
                src = await where(c, rid)
                before = len(streams[name].tokens)
                moved = await admin(c, "migrate", rid, other(src))
                assert moved.ok, moved.error
                r = moved.result
                assert (r["src"], r["dst"]) == (src, other(src))
                assert r["stages"] >= 1 and r["blocks"] > 0 and r["bytes"] > 0
                assert r["output_tokens"] >= before
                assert await where(c, rid) == other(src)  # the charge moved
                assert not streams[name].task.done()  # mid-stream
                results[name] = r
                if name == "g":  # bad moves of a running request: refused, nothing moves
                    same = await admin(c, "migrate", rid, other(src))
                    assert not same.ok and "already runs" in same.error, same.error
                    unknown = await admin(c, "migrate", rid, "colocated-9")
                    assert not unknown.ok and "colocated-9" in unknown.error
                    assert await where(c, rid) == other(src)
            print("migrations:", results)
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams.values())), 60)
            for name, s in streams.items():
                assert s.final is not None and s.final.finish_reason == "length", s.final
                assert s.tokens == ref[name], name
                assert sorted(s.final.instances) == sorted(MEMBERS), s.final.instances

            # A destination that does not answer: the request stays where it runs.
            f = Stream(client, *work["f"])
            rid = await placed(c, set(rids.values()))
            await until(lambda: len(f.tokens) >= 20, what="tokens of f")
            src = await where(c, rid)
            dst = other(src)
            pid = c.children[dst].proc.pid
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                failed = await admin(c, "migrate", rid, dst)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert not failed.ok and dst in failed.error, failed.error
            assert time.monotonic() - t0 < 20 * CALL_TIMEOUT_S
            await asyncio.wait_for(f.task, 60)
            assert f.final is not None and f.final.finish_reason == "length", f.final
            assert f.tokens == ref["f"]
            assert f.final.instances == [src]

            for iid in MEMBERS:  # the destination freed what it reserved once running again
                await until_freed(c, iid)
            await asyncio.sleep(0.5)
            for iid in MEMBERS:
                mempool = MempoolClient(c.endpoints(f"{iid}-mempool")["rpc"])
                try:
                    await assert_idle_and_intact(mempool, iid)
                finally:
                    mempool.close()
        finally:
            client.close()


async def until_freed(c: Cluster, iid: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        st = (await worker_status(c, iid))["migration"]
        if st["held_blocks"] == 0 and st["held_requests"] == 0:
            return
        assert time.monotonic() < deadline, f"{iid} still holds reserved blocks: {st}"
        await asyncio.sleep(0.1)
