"""Every service's control socket checks the admin token one way (common/auth.py): a wrong,
empty or truncated token is refused and the right one answers; a service whose token is
unset refuses every token, the empty one included. Real processes: a MemPool daemon, a
worker on it, the scheduler and a gateway."""

from __future__ import annotations

import pytest

from common.admin_client import admin_call
from common.protocol.admin import AdminReply
from tests.daemons import Launcher, SpawnDaemon, SpawnWorker

pytestmark = pytest.mark.integration

TOKEN = "test-token"
REFUSED = AdminReply(False, error="bad admin token")


async def test_every_control_socket_refuses_wrong_and_empty_tokens(
    launcher: Launcher, spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker
) -> None:
    daemon = await spawn_daemon("m0", admin_token=TOKEN)
    worker = await spawn_worker("w0", daemon.address, admin_token=TOKEN, engine__num_threads=1)
    scheduler = await launcher.start("scheduler", "scheduler", {"admin_token": TOKEN})
    gateway = await launcher.start(
        "gateway", "gateway", {"admin_token": TOKEN, "scheduler": scheduler.endpoints["rpc"]}
    )
    controls = {
        "mempool": daemon.address,
        "worker": worker.endpoints["control"],
        "scheduler": scheduler.endpoints["admin"],
        "gateway": gateway.endpoints["control"],
    }
    for service, address in controls.items():
        for token in ("wrong", "", TOKEN[:-1], TOKEN + "x"):
            assert await admin_call(address, token, "status") == REFUSED, (service, token)
        status = await admin_call(address, TOKEN, "status")
        assert status.ok and status.result["service"] == service, status

    # Admin off: no token set, so even the empty token (equal to the unset one) is refused.
    closed = await spawn_daemon("m1")
    for token in ("", TOKEN):
        assert await admin_call(closed.address, token, "status") == REFUSED
