"""`memserve admin migrate`: live migration of one running request (common/protocol/migrate.py),
commanded through the scheduler, which knows where each placed request runs.

    migrate                      every placed request and the instance it runs on
    migrate RID INSTANCE         source = where RID runs (its placement's last leg)
                                 ──Migrate──▶ source worker (stages, hand-over: its work)
                                 ◀──Migrated: move RID's load charge to INSTANCE; answer
                                    stages, blocks and bytes copied, pause time

Refused with a clear error, and nothing changes: an unknown request or instance, the same
instance, another role, an unhealthy or grouped instance, or a source that refuses or
fails (the request then goes on where it ran). Every call has a timeout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.logging import get_logger
from common.protocol import migrate as mg
from common.protocol.admin import AdminReply
from common.sockets import RpcClient, RpcTimeout
from services.scheduler.core import GlobalScheduler

log = get_logger(__name__)

USAGE = "migrate | migrate REQUEST_ID INSTANCE_ID"

_Reply = mg.MigrateReply | AdminReply


class MigrateControl:
    def __init__(self, core: GlobalScheduler, token: str, timeout_s: float) -> None:
        self.core = core
        self.token = token
        self.timeout_s = timeout_s  # each call between workers, each transfer

    async def command(self, args: Sequence[str]) -> AdminReply:
        match list(args):
            case []:
                return AdminReply(True, {"requests": self.core.serving()})
            case [rid, dst]:
                return await self.migrate(rid, dst)
        return AdminReply(False, error=f"wrong arguments for migrate: {USAGE}")

    def _destination(self, rid: str, dst: str) -> tuple[str, str, mg.Destination] | str:
        """(source id, source control, destination), or why not."""
        core = self.core
        src = core.serving().get(rid)
        if src is None:
            return f"no placed request {rid!r} (see `memserve admin migrate`)"
        if src == dst:
            return f"{rid} already runs on {dst}"
        a, b = core.registry.get(src), core.registry.get(dst)
        if b is None:
            return f"unknown instance {dst!r}"
        if a is None:
            return f"{rid} runs on {src}, which is gone"
        if not (a.healthy and b.healthy):
            return f"{src if not a.healthy else dst} is not healthy"
        if a.role != b.role:
            return f"{src} is {a.role} and {dst} is {b.role}: migrate within one role"
        for iid in (src, dst):
            if core.elastic.group_of(iid) is not None:
                return f"{iid} is in a KunServe group"
        if not (a.control and b.control):
            return "both workers need a control socket"
        return src, a.control, mg.Destination(dst, b.control, b.address, b.mempool)

    async def migrate(self, rid: str, dst: str) -> AdminReply:
        found = self._destination(rid, dst)
        if isinstance(found, str):
            return AdminReply(False, error=found)
        src, control, destination = found
        msg = mg.Migrate(self.token, rid, destination, timeout_s=self.timeout_s)
        client: RpcClient[mg.MigrateRequest, _Reply] = RpcClient(control, mg.MigrateRequest, _Reply)
        # Stages, the stop and the hand-over each wait at most timeout_s on a call.
        budget = 4 * (msg.max_stages + 2) * self.timeout_s
        try:
            reply = await client.call(msg, budget)
        except RpcTimeout:
            return AdminReply(False, error=f"{src} did not answer Migrate within {budget:g} s")
        except Exception as exc:
            return AdminReply(False, error=f"{src}: {exc}")
        finally:
            client.close()
        if not isinstance(reply, mg.Migrated):
            why = getattr(reply, "error", "") or type(reply).__name__
            return AdminReply(False, error=f"{src} refused: {why}")
        self.core.move_charge(rid, src, dst)
        log.info("migrated", request_id=rid, src=src, dst=dst, stages=reply.stages)
        return AdminReply(True, _describe(reply))


def _describe(m: mg.Migrated) -> dict[str, Any]:
    return {
        "request_id": m.request_id,
        "src": m.src,
        "dst": m.dst,
        "stages": m.stages,
        "live_stages": m.live_stages,
        "blocks": m.blocks,
        "bytes": m.bytes,
        "pause_ms": round(m.pause_s * 1000, 3),
        "total_ms": round(m.total_s * 1000, 3),
        "num_computed_tokens": m.num_computed_tokens,
        "output_tokens": m.output_tokens,
    }
