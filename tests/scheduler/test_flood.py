"""Locked doors: a flood of heartbeats from 1,100 made-up instances leaves a real
`memserve scheduler` process up and serving, holding at most `max_instances` and one
KV-event socket; a scheduler whose loop fails exits non-zero with the reason logged."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from common.protocol import scheduler as sp
from common.protocol.admin import AdminReply, AdminRequest
from common.sockets import PushSocket, RpcClient
from tests.daemons import Launcher
from tests.scheduler.helpers import heartbeat, prompt

pytestmark = pytest.mark.integration

TOKEN = "test-token"
MAX_INSTANCES = 100
FAKES = 1100
REPO = Path(__file__).resolve().parents[2]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_heartbeat_flood_leaves_the_scheduler_up_and_bounded(launcher: Launcher) -> None:
    proc = await launcher.start(
        "scheduler",
        "scheduler",
        {"admin_token": TOKEN, "max_instances": MAX_INSTANCES, "heartbeat_timeout_s": 600},
    )
    ep, pid = proc.endpoints, proc.proc.pid
    beats = PushSocket(ep["heartbeats"], sp.Heartbeat, bind=False)
    admin = RpcClient(ep["admin"], AdminRequest, AdminReply)
    rpc: RpcClient[Any, Any] = RpcClient(ep["rpc"], sp.SchedulerRequest, sp.SchedulerReply)

    async def status() -> dict[str, Any]:
        reply = await admin.call(AdminRequest(TOKEN, "status", []), timeout_s=10)
        assert reply.ok, reply.error
        return reply.result

    try:
        await beats.send(heartbeat("w0"))  # the one real instance, registered first
        for _ in range(500):
            if (await status())["instances"]:
                break
            await asyncio.sleep(0.01)
        fds_before = open_fds(pid)

        # Each made-up instance names its own (dead) KV-event address.
        for i in range(FAKES):
            await beats.send(
                heartbeat(f"fake{i:04d}", "prefill", events=f"tcp://127.0.0.1:{20000 + i}")
            )
        refused = FAKES - (MAX_INSTANCES - 1)
        for _ in range(1000):
            st = await status()
            if st["counters"].get("refused_registrations", 0) >= refused:
                break
            await asyncio.sleep(0.02)

        assert proc.proc.poll() is None  # still up
        assert st["counters"]["refused_registrations"] == refused
        assert st["instances"] == {
            "colocated": {"up": 1, "drained": 0, "unhealthy": 0},
            "prefill": {"up": MAX_INSTANCES - 1, "drained": 0, "unhealthy": 0},
        }
        # One SUB socket for all: one connection per followed daemon (those to dead
        # addresses hold no file between retries); a socket per instance would add at
        # least its mailbox's file each.
        assert st["kv_connections"] == MAX_INSTANCES - 1
        grown = open_fds(pid) - fds_before
        print(f"open files: {fds_before} before, +{grown} after the flood")
        assert grown <= MAX_INSTANCES // 4
        placed = await rpc.call(sp.Place("r1", prompt(40), 4), timeout_s=10)
        assert isinstance(placed, sp.Placement) and placed.instance_id == "w0"
        # Refusals are logged, not once each.
        warnings = proc.log.read_text().count("heartbeats refused: registry full")
        assert 1 <= warnings < refused

        await admin.call(AdminRequest(TOKEN, "shutdown", []), timeout_s=10)
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    finally:
        for sock in (beats, admin, rpc):
            sock.close()


FAILING_SCHEDULER = textwrap.dedent(
    """
    from services.scheduler.config import SchedulerConfig
    from services.scheduler.service import SchedulerService
    from common.service_main import run_main, run_service
    from common.security import install, read_key_file
    import os

    install(read_key_file(os.environ["MEMSERVE_CLUSTER__KEY_FILE"]))

    class Failing(SchedulerService):
        def loops(self):
            return [*super().loops(), self._fail()]

        async def _fail(self):
            raise RuntimeError("the ticker broke")

    cfg = SchedulerConfig(admin_address="").validate()

    async def start():
        svc = Failing(cfg)
        return svc, svc.endpoints()

    run_main("scheduler", "info", run_service("scheduler", "scheduler", start))
    """
)


def test_a_failed_loop_exits_non_zero_with_its_reason_logged() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FAILING_SCHEDULER],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode != 0
    failed = [line for line in done.stderr.splitlines() if '"scheduler failed"' in line]
    assert failed and "the ticker broke" in failed[0]
