"""`memserve admin migrate` in the scheduler: where a request runs (its placement record),
the checks before a migration, the load charge moving with it, and the source worker's
answer (a real RPC socket standing in for the worker)."""

from __future__ import annotations

import asyncio
from typing import Any

from common.protocol import migrate as mg
from common.protocol.scheduler import Place, Release
from common.sockets import RpcServer
from services.cli.admin import render
from services.scheduler.config import SchedulerConfig
from services.scheduler.core import GlobalScheduler
from services.scheduler.migrate_control import MigrateControl
from tests.scheduler.helpers import heartbeat, prompt

TOKEN = "s3cret"


def scheduler() -> GlobalScheduler:
    return GlobalScheduler(SchedulerConfig(admin_token=TOKEN, mode="colocated").validate())


def load(s: GlobalScheduler, iid: str) -> int:
    inst = s.registry.get(iid)
    assert inst is not None
    return inst.charged_tokens


def test_the_charge_moves_with_the_request() -> None:
    s = scheduler()
    s.on_heartbeat(heartbeat("w0"), 0.0)
    s.place(Place("r1", prompt(40), 8), now=1.0)
    s.on_heartbeat(heartbeat("w1"), 1.0)
    assert s.serving() == {"r1": "w0"} and load(s, "w0") > 0
    charged = load(s, "w0")
    assert s.move_charge("r1", "w0", "w1") == 2  # prefill and decode legs
    assert s.serving() == {"r1": "w1"}
    assert (load(s, "w0"), load(s, "w1")) == (0, charged)
    assert s.move_charge("nope", "w0", "w1") == 0
    s.release(Release("r1", "all"))
    assert (load(s, "w0"), load(s, "w1")) == (0, 0) and s.serving() == {}


async def test_checks_then_the_source_answers() -> None:
    s = scheduler()
    seen: list[Any] = []

    async def source(req: Any) -> Any:
        seen.append(req)
        if req.request_id == "refused":
            return mg.MigrateRefused("destination full")
        return mg.Migrated(
            request_id=req.request_id,
            src="w0",
            dst=req.dst.instance_id,
            stages=2,
            live_stages=1,
            blocks=8,
            bytes=8192,
            pause_s=0.004,
            total_s=0.02,
            num_computed_tokens=120,
            output_tokens=80,
        )

    server: RpcServer[Any, Any] = RpcServer("tcp://127.0.0.1:0", mg.MigrateRequest, mg.MigrateReply)
    serving = asyncio.create_task(server.serve(source))
    try:
        s.on_heartbeat(heartbeat("w0", control=server.address), 0.0)
        s.place(Place("r1", prompt(40), 8), now=1.0)
        s.place(Place("refused", prompt(30), 8), now=1.0)
        s.on_heartbeat(heartbeat("w1", control="tcp://127.0.0.1:9/w1-control"), 1.0)
        s.on_heartbeat(heartbeat("p0", "prefill", control="tcp://127.0.0.1:9/p0"), 1.0)
        s.on_heartbeat(heartbeat("w2"), 1.0)  # no control socket
        ctl = MigrateControl(s, TOKEN, timeout_s=1.0)

        listing = await ctl.command([])
        assert listing.ok and listing.result == {"requests": {"r1": "w0", "refused": "w0"}}
        assert "r1" in render("migrate", listing.result, [])
        for args, why in [
            (["nope", "w1"], "nope"),
            (["r1", "w0"], "already runs"),
            (["r1", "w9"], "unknown instance"),
            (["r1", "p0"], "role"),
            (["r1", "w2"], "control"),
            (["r1"], "REQUEST_ID INSTANCE_ID"),
        ]:
            bad = await ctl.command(args)
            assert not bad.ok and why in bad.error, (args, bad.error)
        assert not seen  # refused before any worker heard of it

        refused = await ctl.command(["refused", "w1"])
        assert not refused.ok and "destination full" in refused.error
        assert s.serving()["refused"] == "w0"  # nothing moved

        done = await ctl.command(["r1", "w1"])
        assert done.ok, done.error
        assert done.result["stages"] == 2 and done.result["pause_ms"] == 4.0
        assert "2 stages (1 live)" in render("migrate", done.result, ["r1", "w1"])
        assert s.serving()["r1"] == "w1"
        assert [m.request_id for m in seen] == ["refused", "r1"]
        msg = seen[-1]
        assert isinstance(msg, mg.Migrate) and msg.token == TOKEN
        assert msg.dst == mg.Destination(
            "w1", "tcp://127.0.0.1:9/w1-control", "tcp://127.0.0.1:9/w1", "tcp://127.0.0.1:8/w1"
        )
    finally:
        server.close()
        await asyncio.gather(serving, return_exceptions=True)
