"""The elastic controller in the scheduler service over real sockets, with scripted workers
(elastic_workers.py) whose heartbeats carry made-up KV loads, and a fake clock for the
cooldown and a group's age: off, votes are counted and shown and nothing happens; `elastic
on`, hot instances drop by themselves into the planner's pair (Prepare / Commit as a
commanded drop); a group whose load fell restores by itself; a demand no plan can free
falls back (the timeline says so); `elastic off` stops it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common.protocol import scheduler as sp
from common.protocol.elastic import Commit, Prepare, Restore
from services.scheduler.config import SchedulerConfig
from tests.scheduler.elastic_workers import FakeWorker, Script
from tests.scheduler.harness import TOKEN, FakeClock, Harness, running, until
from tests.scheduler.helpers import cli, heartbeat

pytestmark = pytest.mark.integration

FACTS = {"model": "tiny", "num_layers": 4, "param_bytes": 4000, "budget_bytes": 100_000}


@pytest.fixture
async def auto() -> AsyncIterator[Harness]:
    clock = FakeClock()
    cfg = SchedulerConfig(
        admin_token=TOKEN,
        heartbeat_timeout_s=30.0,  # the fake clock moves by whole cooldowns
        elastic_poll_s=0.02,
        elastic_window=3,
        elastic_cooldown_s=5.0,
        elastic_min_group_s=1.0,
    ).validate()
    async with running(cfg, clock) as h:
        yield h


def load(used: int, waiting: int, capacity: int = 100, requests: int = 0) -> sp.InstanceLoad:
    return sp.InstanceLoad(
        waiting_requests=requests,
        used_blocks=used,
        waiting_blocks=waiting,
        capacity_blocks=capacity,
    )


async def beat(h: Harness, w: FakeWorker, ld: sp.InstanceLoad) -> None:
    hb = heartbeat(w.instance_id, control=w.control, block_bytes=256, load=ld)
    hb = sp.Heartbeat(**{**{f: getattr(hb, f) for f in hb.__struct_fields__}, **FACTS})
    await h.beat(hb)
    await until(lambda: h.svc.core.registry.get(w.instance_id) is not None, w.instance_id)
    await until(lambda: h.svc.core.registry.get(w.instance_id).load == ld, "the load")  # type: ignore[union-attr]


async def elastic(h: Harness, *args: str) -> Any:
    reply = await h.call_admin("elastic", *args)
    assert reply.ok, reply.error
    return reply.result


async def until_event(h: Harness, name: str, after: int = 0) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        events = (await elastic(h, "status"))["events"][after:]
        if any(e["event"] == name for e in events):
            return events
        assert loop.time() < deadline, f"no {name!r} event in {[e['event'] for e in events]}"
        await asyncio.sleep(0.02)


async def test_the_controller_drops_restores_and_falls_back_by_itself(auto: Harness) -> None:
    h = auto
    script = Script()
    w0, w1, w2 = (FakeWorker(i, script) for i in ("w0", "w1", "w2"))
    try:
        # w0 and w1 are full with 6 blocks queued beyond 4 free (2 short each: 1024 bytes
        # of demand, which one pair's 4000 freed bytes covers); w2 is half empty.
        for w in (w0, w1):
            await beat(h, w, load(96, 6, requests=1))
        await beat(h, w2, load(50, 0))

        # Off (the default): the votes are counted and shown, nothing is sent.
        await until(
            lambda: (
                h.svc.core.controller.monitor.status(h.clock())["last_poll"].get("streak", 0) >= 3
            ),
            "votes held while off",
        )
        status = await elastic(h, "status")
        ctl = status["controller"]
        assert ctl["on"] is False and ctl["last_poll"]["voters"] == ["w0", "w1"]
        assert ctl["last_poll"]["votes"]["w2"] == {
            "vote": False,
            "usage": 0.5,
            "waiting_blocks": 0,
            "free_blocks": 50,
        }
        assert status["groups"] == [] and script.log == []
        code, out, err = await cli(
            ["admin", "--address", h.svc.admin_address, "--token", TOKEN, "elastic", "status"]
        )
        assert code == 0, err
        assert "controller off: 2 of 2 votes needed" in out and "KV_USAGE" in out

        # On: a drop of the planner's pair, through the commanded drop's two phases.
        assert await elastic(h, "on") == {"controller": "on", "was": "off"}
        events = await until_event(h, "serving")
        names = [e["event"] for e in events]
        assert names[:4] == ["controller-on", "votes", "plan", "prepare"], names
        plan = next(e for e in events if e["event"] == "plan")["detail"]
        assert plan["groups"] == [["w0", "w1"]] and plan["demand_bytes"] == 2 * 2 * 256
        assert plan["freed_bytes"] == 4000 and plan["candidates"] == ["w0", "w1", "w2"]
        assert [type(m).__name__ for _, m in script.log] == ["Prepare"] * 2 + ["Commit"] * 2
        assert not w2.received(Prepare) and not w2.received(Commit)
        (group,) = (await elastic(h, "status"))["groups"]
        assert group["members"][0]["instance_id"] == "w0" and group["state"] == "SERVING"

        # The group's load falls far below half of what w0 and w1 held (200 blocks): no
        # restore within the cooldown, then one by itself.
        monitor = h.svc.core.controller.monitor
        await beat(h, w0, load(10, 0, capacity=400))
        await until(lambda: "g1" in monitor.status(h.clock())["groups"], "the monitor sees g1")
        await asyncio.sleep(0.2)  # many polls, all within the cooldown (the clock stands)
        assert not w0.received(Restore)
        h.clock.now += 10
        events = await until_event(h, "dissolved")
        names = [e["event"] for e in events]
        assert names[-3:] == ["restore-wanted", "restoring", "dissolved"], names
        wanted = next(e for e in events if e["event"] == "restore-wanted")["detail"]
        assert wanted == {"group": "g1", "used_blocks": 10, "held_blocks": 200}
        assert len(w0.received(Restore)) == 1

        # Every instance full with more queued than any plan frees: the KV-centric fallback
        # (once the monitor saw the group go, which starts a cooldown of its own).
        await until(lambda: not monitor.status(h.clock())["groups"], "the monitor sees g1 go")
        h.clock.now += 10
        before = len((await elastic(h, "status"))["events"])
        for w in (w0, w1, w2):
            await beat(h, w, load(100, 80, requests=3))
        events = await until_event(h, "fallback", before)
        fallback = next(e for e in events if e["event"] == "fallback")["detail"]
        assert "KV-centric preemption" in fallback["reason"]
        assert fallback["demand_bytes"] == 3 * 80 * 256
        assert len(w0.received(Prepare)) == 1  # nothing sent

        # Off: nothing more, whatever the votes.
        assert await elastic(h, "off") == {"controller": "off", "was": "on"}
        h.clock.now += 10
        await asyncio.sleep(0.2)
        names = [e["event"] for e in (await elastic(h, "status"))["events"]]
        assert names[-1] == "controller-off" and names.count("fallback") == 1
        bad = await h.call_admin("elastic", "sideways")
        assert not bad.ok and "elastic on|off" in bad.error
    finally:
        for w in (w0, w1, w2):
            await w.close()
