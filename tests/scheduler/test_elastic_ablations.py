"""The controller's ablation keys over real sockets, with scripted workers: with
`elastic_exchange = false` its drop commits with `exchange=False` (the running requests
are recomputed in the group: `kunserve-recompute`); with `elastic_restore = false` a group
whose load fell is never restored by the controller (`kunserve-norestore`), while a
commanded restore still works."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.protocol import scheduler as sp
from common.protocol.elastic import Commit, Restore
from services.scheduler.config import SchedulerConfig
from tests.scheduler.elastic_workers import FakeWorker, Script
from tests.scheduler.harness import TOKEN, FakeClock, Harness, running, until
from tests.scheduler.helpers import heartbeat

pytestmark = pytest.mark.integration

FACTS = {"model": "tiny", "num_layers": 4, "param_bytes": 4000, "budget_bytes": 100_000}


async def beat(h: Harness, w: FakeWorker, used: int, waiting: int, capacity: int = 100) -> None:
    ld = sp.InstanceLoad(
        waiting_requests=int(waiting > 0),
        used_blocks=used,
        waiting_blocks=waiting,
        capacity_blocks=capacity,
    )
    hb = heartbeat(w.instance_id, control=w.control, block_bytes=256, load=ld)
    hb = sp.Heartbeat(**{**{f: getattr(hb, f) for f in hb.__struct_fields__}, **FACTS})
    await h.beat(hb)
    await until(lambda: h.svc.core.registry.get(w.instance_id) is not None, w.instance_id)
    await until(lambda: h.svc.core.registry.get(w.instance_id).load == ld, "the load")  # type: ignore[union-attr]


async def status(h: Harness) -> Any:
    reply = await h.call_admin("elastic", "status")
    assert reply.ok, reply.error
    return reply.result


def test_both_keys_default_on() -> None:
    cfg = SchedulerConfig()
    assert cfg.elastic_exchange is True and cfg.elastic_restore is True


async def test_no_exchange_and_no_restore_by_the_controller() -> None:
    clock = FakeClock()
    cfg = SchedulerConfig(
        admin_token=TOKEN,
        heartbeat_timeout_s=30.0,
        elastic_auto=True,
        elastic_poll_s=0.02,
        elastic_window=3,
        elastic_cooldown_s=5.0,
        elastic_min_group_s=1.0,
        elastic_exchange=False,
        elastic_restore=False,
    ).validate()
    script = Script()
    async with running(cfg, clock) as h:
        w0, w1 = FakeWorker("w0", script), FakeWorker("w1", script)
        try:
            for w in (w0, w1):
                await beat(h, w, 96, 6)
            await until(lambda: len(w0.received(Commit)) == 1, "the controller's drop")
            assert [c.exchange for w in (w0, w1) for c in w.received(Commit)] == [False, False]
            ctl = (await status(h))["controller"]
            assert ctl["exchange"] is False and ctl["restore"] is False

            # The group's load falls far below what its members held: a restore would be
            # wanted at once past the cooldown; the controller never asks for one.
            await until(lambda: len(h.svc.core.elastic.groups) == 1, "the group")
            await beat(h, w0, 10, 0, capacity=400)
            for _ in range(3):
                h.clock.now += 10
                await asyncio.sleep(0.1)
            names = [e["event"] for e in (await status(h))["events"]]
            assert "restore-wanted" not in names and not w0.received(Restore), names

            reply = await h.call_admin("elastic", "restore", "g1")  # commanded: still works
            assert reply.ok, reply.error
            assert len(w0.received(Restore)) == 1
        finally:
            for w in (w0, w1):
                await w.close()
