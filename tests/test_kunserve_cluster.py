"""KunServe across real processes: `memserve up --mode colocated --colocated 2` (2 MemPool
daemons with a memory budget, 2 workers, scheduler, gateway), drop and restore commanded
through the scheduler's admin socket.

- Requests running before the drop, admitted during the group, and running across the
  restore (live: they go home in batches while the group serves the rest; paused; and a
  live restore without room, which pauses instead) get exactly the single-process
  reference tokens, greedy and seeded; the group
  holds more KV than the two instances did; afterwards both members hold their full
  parameters again and every daemon passes check_integrity when idle.
- A member that does not answer Prepare (SIGSTOPped): the drop is aborted, both serve as
  before. A follower killed while grouped: the group's requests fail fast (never hang), the
  group is broken, the leader restores from its checkpoint and serves alone with reference
  tokens, its daemon intact.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from common.admin_client import admin_call
from common.client import GatewayClient
from common.mempool_client import MempoolClient
from common.sampling import SamplingParams
from services.launcher.supervisor import Cluster
from tests.cluster_requests import (
    BLOCK_BYTES,
    MEMBERS,
    TINY_PARAM_BYTES,
    TOKEN,
    Stream,
    admin,
    colocated_pair,
    daemons_idle_and_intact,
    prompt,
    reference,
    until,
    worker_status,
)

pytestmark = pytest.mark.integration

KV_BLOCKS = 96  # per instance alone: 1,536 tokens


# Half a block more than KV_BLOCKS: a budget that is no whole number of blocks (as a
# user's is), so a split daemon's capacity can be an odd number of sub-blocks.
BUDGET = TINY_PARAM_BYTES + KV_BLOCKS * BLOCK_BYTES + BLOCK_BYTES // 2


def settings(tmp_path: Path, *, restart: bool = False) -> Any:
    return colocated_pair(
        tmp_path,
        kv_blocks=KV_BLOCKS,
        mempool={"budget_bytes": BUDGET, "tensor_memory_bytes": 1 << 20},
        cluster={"restart": restart},
        worker={"heartbeat_interval_s": 0.25, "stage_timeout_s": 3.0, "engine": {"num_threads": 1}},
    )


LONG = 700


def workload() -> dict[str, tuple[list[int], SamplingParams]]:
    greedy = SamplingParams(max_tokens=LONG, ignore_eos=True)
    return {
        "a": (prompt(40, 1), greedy),
        "b": (
            prompt(33, 2),
            SamplingParams(max_tokens=LONG, ignore_eos=True, temperature=0.8, top_k=50, seed=11),
        ),
        "c": (prompt(57, 3), greedy),
        "d": (
            prompt(21, 4),
            SamplingParams(max_tokens=LONG, ignore_eos=True, temperature=1.0, seed=12),
        ),
        "late": (
            prompt(30, 5),
            SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.7, seed=13),
        ),
        "after": (prompt(25, 6), SamplingParams(max_tokens=40, ignore_eos=True)),
    }


async def test_drop_and_restore_give_reference_tokens(tmp_path: Path) -> None:
    work = workload()
    ref = reference(work)
    async with Cluster(settings(tmp_path)) as c:
        client = GatewayClient(c.gateway, timeout_s=60)
        try:
            # Bad commands: a clear error, nothing changes.
            for args, why in [
                (("drop", "colocated-0,nope"), "nope"),
                (("drop", "colocated-0"), "2"),
                (("restore", "g404"), "g404"),
            ]:
                bad = await admin(c, "elastic", *args)
                assert not bad.ok and why in bad.error, (args, bad.error)
            streams = {rid: Stream(client, *work[rid]) for rid in "abcd"}
            await until(lambda: all(len(s.tokens) >= 30 for s in streams.values()), what="tokens")
            dropped = await admin(c, "elastic", "drop", ",".join(MEMBERS))
            assert dropped.ok, dropped.error
            gid = dropped.result["group_id"]
            again = await admin(c, "elastic", "drop", ",".join(MEMBERS))
            assert not again.ok and "group" in again.error, again.error
            status = await admin(c, "elastic", "status")
            (group,) = [g for g in status.result["groups"] if g["group_id"] == gid]
            assert group["state"] == "SERVING"
            assert [m["instance_id"] for m in group["members"]] == list(MEMBERS)
            # A group block is a sub-block on each member: the group holds more tokens than
            # the two instances together did, in the memory their parameters lent.
            assert group["num_blocks"] > 2 * KV_BLOCKS
            assert group["lent_bytes"] > 0
            assert all(not s.task.done() for s in streams.values())  # the drop landed mid-stream
            leader = await worker_status(c, MEMBERS[0])
            assert leader["elastic"]["state"] == "leader"
            # The four running requests keep their KV: live exchange, nothing recomputed.
            deadline = time.monotonic() + 30
            while (ex := (await worker_status(c, MEMBERS[0]))["elastic"]["exchange"])["pending"]:
                assert time.monotonic() < deadline, ex
                await asyncio.sleep(0.05)
            assert ex["exchanged"] == 4 and ex["recomputed"] == 0 and ex["bytes"] > 0, ex
            budget = BUDGET
            for iid in MEMBERS:  # `memserve admin status` of a daemon shows the split
                st = await admin_call(c.endpoints(f"{iid}-mempool")["rpc"], TOKEN, "status")
                assert st.ok and st.result["split"] == 2, st
                assert st.result["param_bytes"] < TINY_PARAM_BYTES
                assert st.result["kv_bytes"] > KV_BLOCKS * BLOCK_BYTES
                assert st.result["param_bytes"] + st.result["kv_bytes"] <= budget
            streams["late"] = Stream(client, *work["late"])  # admitted during the group
            before = {rid: len(s.tokens) for rid, s in streams.items()}
            await until(
                lambda: all(len(s.tokens) > before[r] + 20 for r, s in streams.items()),
                what="tokens in the group",
            )
            restored = await admin(c, "elastic", "restore", gid)
            assert restored.ok, restored.error
            (r,) = restored.result["restored"]
            assert r["moved"] + r["recomputed"] == len(streams), str(r)
            # Live: every request went home in batches while the group served the rest.
            assert r["live"] and r["fallback"] == "", r
            assert r["moved_live"] == len(streams) and r["batches"] >= 1, r
            # All went to one home; the largest then migrated back to the leader (live).
            assert r["rebalanced"] >= 1, r
            for iid in MEMBERS:
                assert (await worker_status(c, iid))["elastic"]["state"] == "solo"
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams.values())), 120)
            for rid, s in streams.items():
                assert s.final is not None and s.final.finish_reason == "length", (rid, s.final)
                assert s.tokens == ref[rid], rid
            after = await client.complete(*work["after"])
            assert after.token_ids == ref["after"]
            await asyncio.sleep(0.5)
            await daemons_idle_and_intact(c)
            for iid in MEMBERS:
                info = MempoolClient(c.endpoints(f"{iid}-mempool")["rpc"])
                try:
                    got = await info.info()
                finally:
                    info.close()
                assert got.split == 1 and got.param_bytes == TINY_PARAM_BYTES
            events = [e["event"] for e in (await admin(c, "elastic", "status")).result["events"]]
            assert "serving" in " ".join(events) and "dissolved" in " ".join(events)

            # `recompute`: a running request is recomputed in the group, same tokens.
            again = Stream(client, *work["late"])
            await until(lambda: len(again.tokens) >= 10, what="tokens")
            dropped = await admin(c, "elastic", "drop", ",".join(MEMBERS), "recompute")
            assert dropped.ok, dropped.error
            ex = (await worker_status(c, MEMBERS[0]))["elastic"]["exchange"]
            assert ex["exchanged"] == 0 and ex["pending"] == 0, ex
            paused = await admin(c, "elastic", "restore", "all", "pause")  # the pause restore
            assert paused.ok, paused.error
            (r,) = paused.result["restored"]
            assert not r["live"] and r["moved"] == 1, r
            await asyncio.wait_for(again.task, 60)
            assert again.tokens == ref["late"]

            # A live restore without room for the group's KV beside the next batch at the
            # home (all but full: 4 x ~22 of the home's 96 blocks) pauses for the rest:
            # same tokens.
            assert (await admin(c, "elastic", "drop", ",".join(MEMBERS))).ok
            full = {rid: Stream(client, *work[rid]) for rid in "abcd"}
            await until(lambda: all(len(s.tokens) >= 300 for s in full.values()), what="tokens")
            restored = await admin(c, "elastic", "restore", "all")
            assert restored.ok, restored.error
            (r,) = restored.result["restored"]
            assert r["live"] and "does not fit" in r["fallback"], r
            assert r["moved_live"] < 4 and r["moved"] + r["recomputed"] == 4, r
            await asyncio.wait_for(asyncio.gather(*(s.task for s in full.values())), 120)
            for rid, st in full.items():
                assert st.tokens == ref[rid], rid
            await asyncio.sleep(0.5)
            await daemons_idle_and_intact(c)
        finally:
            client.close()


async def test_faults_abort_a_drop_or_break_a_group_and_members_recover(tmp_path: Path) -> None:
    """A member that does not answer Prepare aborts the drop; a killed follower, then a
    killed leader, break their groups: requests fail fast, the survivor restores from its
    checkpoint and serves alone, the dead one is restarted on its daemon (which it merges
    back: that daemon was left split) and can join a group again."""
    work = {  # shorter: requests that survive a kill run to their end
        rid: (p, msgspec.structs.replace(params, max_tokens=min(params.max_tokens, 150)))
        for rid, (p, params) in workload().items()
    }
    ref = reference(work)
    stop = asyncio.Event()
    async with Cluster(settings(tmp_path, restart=True)) as c:
        watching = asyncio.create_task(c.wait(stop))  # supervision: restarts the dead
        client = GatewayClient(c.gateway, timeout_s=60)
        try:
            # A stopped member never answers Prepare: aborted, nothing changed.
            follower = c.children[MEMBERS[1]].proc.pid
            os.kill(follower, signal.SIGSTOP)
            try:
                refused = await admin(c, "elastic", "drop", ",".join(MEMBERS))
            finally:
                os.kill(follower, signal.SIGCONT)
            assert not refused.ok and "aborted" in refused.error
            for iid in MEMBERS:
                assert (await worker_status(c, iid))["elastic"]["state"] == "solo"
            done = await client.complete(*work["after"])
            assert done.token_ids == ref["after"]

            # The follower killed, then (in a new group) the leader, right after the drop:
            # the running requests' KV is being exchanged. Each request ends with an error
            # or with its reference tokens, never hangs.
            for victim, survivor in ((MEMBERS[1], MEMBERS[0]), (MEMBERS[0], MEMBERS[1])):
                await until_up(c, MEMBERS)
                streams = {rid: Stream(client, *work[rid]) for rid in "abcd"}
                await until(
                    lambda ss=streams: all(len(s.tokens) >= 5 for s in ss.values()),  # type: ignore[misc]
                    what="tokens",
                )
                dropped = await admin(c, "elastic", "drop", ",".join(MEMBERS))
                assert dropped.ok, dropped.error
                gid = dropped.result["group_id"]
                pid = c.children[victim].proc.pid
                os.kill(pid, signal.SIGKILL)
                t0 = time.monotonic()
                await asyncio.wait_for(asyncio.gather(*(s.task for s in streams.values())), 30)
                assert time.monotonic() - t0 < 15
                for rid, s in streams.items():
                    assert s.final is not None, rid
                    if s.final.finish_reason != "error":
                        assert s.tokens == ref[rid], rid
                await until_group_state(c, gid, "BROKEN")
                await until_solo(c, survivor)
                alone = await client.complete(*work["after"])
                assert alone.token_ids == ref["after"]
                await until_up(c, MEMBERS)  # the victim restarted, merged its daemon
                assert c.children[victim].proc.pid != pid
                await asyncio.sleep(0.5)
                await daemons_idle_and_intact(c)
            assert c.restarts == 2
        finally:
            client.close()
            stop.set()
            await asyncio.wait_for(watching, 30)


async def until_group_state(c: Cluster, gid: str, state: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        groups = (await admin(c, "elastic", "status")).result["groups"]
        if any(g["group_id"] == gid and g["state"] == state for g in groups):
            return
        assert time.monotonic() < deadline, f"group {gid} never became {state}"
        await asyncio.sleep(0.1)


async def until_up(c: Cluster, ids: tuple[str, ...], timeout_s: float = 30.0) -> None:
    """Every instance registered, up and serving alone (a restarted one too)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = {r["instance_id"]: r for r in (await admin(c, "instances")).result}
        if all(i in rows and rows[i]["state"] == "up" and not rows[i]["group"] for i in ids):
            return
        assert time.monotonic() < deadline, f"not all of {ids} came up: {rows}"
        await asyncio.sleep(0.1)


async def until_solo(c: Cluster, iid: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await worker_status(c, iid))["elastic"]["state"] != "solo":
        assert time.monotonic() < deadline, f"{iid} never served alone again"
        await asyncio.sleep(0.1)
