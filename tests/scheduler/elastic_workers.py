"""Scripted workers for the scheduler's elastic tests: a real RpcServer on each, answering
the elastic channel (common/protocol/elastic.py) on its "control socket" as a worker would
(`Ready`, `FollowerCommitted` / `GroupServing`, `Restored`, `Done`), or staying silent or
refusing where a test says. Every message it gets is recorded, in one order shared by all
the workers of a test (`Script.log`), so a test can tell what went where and when."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from common.protocol.admin import AdminReply, AdminRequest
from common.protocol.elastic import (
    Abort,
    Break,
    Commit,
    Dissolve,
    Done,
    ElasticReply,
    ElasticRequest,
    FollowerCommitted,
    GroupServing,
    Prepare,
    Ready,
    Refused,
    Restore,
    Restored,
)
from common.sockets import RpcServer

_Request = AdminRequest | ElasticRequest
_Reply = AdminReply | ElasticReply


@dataclass
class Script:
    """What the workers of one test were told, in order: (instance id, message)."""

    log: list[tuple[str, Any]] = field(default_factory=list)

    def of(self, instance_id: str) -> list[str]:
        return [type(m).__name__ for i, m in self.log if i == instance_id]


class FakeWorker:
    def __init__(
        self,
        instance_id: str,
        script: Script,
        *,
        silent_on: tuple[str, ...] = (),
        refuse_on: tuple[str, ...] = (),
        **ready: Any,
    ) -> None:
        self.instance_id = instance_id
        self.script = script
        self.silent_on = silent_on  # message type names it never answers
        self.refuse_on = refuse_on  # ... it answers `Refused`
        self.ready: dict[str, Any] = {
            "model": "tiny",
            "num_layers": 4,
            "param_bytes": 4000,
            "budget_bytes": 100_000,
            "block_bytes": 256,
            **ready,
        }
        self.server: RpcServer[_Request, _Reply] = RpcServer("tcp://127.0.0.1:0", _Request, _Reply)
        self.serving = asyncio.create_task(self.server.serve(self._handle))

    @property
    def control(self) -> str:
        return self.server.address

    def received(self, kind: type) -> list[Any]:
        return [m for i, m in self.script.log if i == self.instance_id and isinstance(m, kind)]

    async def _handle(self, req: _Request) -> _Reply:
        self.script.log.append((self.instance_id, req))
        name = type(req).__name__
        if name in self.silent_on:
            await asyncio.sleep(3600)
        if name in self.refuse_on:
            return Refused(f"{self.instance_id} will not {name}")
        iid = self.instance_id
        match req:
            case Prepare():
                return Ready(iid, stage=f"tcp://127.0.0.1:1/{iid}-stage", **self.ready)
            case Commit(members=members) if members[0].instance_id == iid:
                freed = self.ready["param_bytes"] // 2
                return GroupServing(req.group_id, 32, 16, len(req.followers), freed, freed)
            case Commit():
                freed = self.ready["param_bytes"] // 2
                return FollowerCommitted(iid, [], 32, freed, freed)
            case Restore():
                return Restored(req.group_id, 1, 0, 4096, 0.01)
            case Abort() | Break() | Dissolve():
                return Done(iid, self.ready["param_bytes"])
            case AdminRequest():
                return AdminReply(True, {"instance_id": iid})
        return Refused(f"unexpected {name}")

    async def close(self) -> None:
        self.serving.cancel()
        await asyncio.gather(self.serving, return_exceptions=True)
        self.server.close()
