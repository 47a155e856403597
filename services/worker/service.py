"""The worker service: an asyncio shell that serves `Generate` / `Abort` (common/protocol/
worker.py) with a `MempoolEngine` on its MemPool daemon's memory.

    gateway ──Generate/Abort (PUSH)──▶ PULL ──▶ MempoolEngine ──TokenChunk (PUSH)──▶ reply_to

Roles: `colocated` serves a request from prompt to last token on one instance; the
prefill / decode roles of disaggregated serving build on the same shell.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import msgspec

from common.codec import DecodeError
from common.logging import get_logger
from common.protocol import worker as wp
from common.sockets import PullSocket, PushSocket
from services.worker.config import EngineConfig
from services.worker.mempool_engine import MempoolEngine

log = get_logger(__name__)


class WorkerConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    instance_id: str = "worker-0"
    role: str = "colocated"
    address: str = "tcp://127.0.0.1:0"  # where requests arrive (PULL, bound)
    mempool: str = "tcp://127.0.0.1:5601"  # the instance's MemPool daemon (RPC)
    caching: bool = True
    log_level: str = "info"
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)

    def validate(self) -> WorkerConfig:
        if self.role != "colocated":
            raise ValueError(f"worker.role {self.role!r} is not served yet (colocated only)")
        self.engine.validate()
        return self


class WorkerService:
    def __init__(self, cfg: WorkerConfig, engine: MempoolEngine):
        self.cfg = cfg
        self.engine = engine
        self.requests: PullSocket[Any] = PullSocket(
            cfg.address, cast(Any, wp.WorkerRequest), bind=True
        )
        self.replies: dict[str, PushSocket[wp.TokenChunk]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def create(cls, cfg: WorkerConfig) -> WorkerService:
        engine = await MempoolEngine.connect(
            cfg.engine, cfg.mempool, owner=cfg.instance_id, caching=cfg.caching
        )
        return cls(cfg, engine)

    @property
    def address(self) -> str:
        return self.requests.address

    async def serve(self) -> None:
        while True:
            try:
                msg = await self.requests.recv()
            except DecodeError as exc:
                log.warning("malformed worker request dropped", error=str(exc))
                continue
            match msg:
                case wp.Generate():
                    task = asyncio.create_task(self._generate(msg))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                case wp.Abort(request_id=rid):
                    self.engine.abort(rid)

    async def _generate(self, req: wp.Generate) -> None:
        out = self._reply_socket(req.reply_to)
        try:
            async for chunk in self.engine.generate(req.token_ids, req.params, req.request_id):
                await out.send(
                    wp.TokenChunk(
                        req.request_id,
                        chunk.token_ids,
                        chunk.finished,
                        chunk.finish_reason,
                        chunk.num_prompt_tokens,
                        chunk.num_cached_tokens,
                        chunk.error,
                    )
                )
        except Exception as exc:  # the stream must end with a final chunk, whatever broke
            log.warning("request failed", request_id=req.request_id, error=str(exc), exc_info=True)
            with contextlib.suppress(Exception):
                await out.send(
                    wp.TokenChunk(req.request_id, [], True, "error", error=f"worker error: {exc}")
                )

    def _reply_socket(self, address: str) -> PushSocket[wp.TokenChunk]:
        sock = self.replies.get(address)
        if sock is None:
            sock = PushSocket(address, wp.TokenChunk, bind=False)
            self.replies[address] = sock
        return sock

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.engine.close()
        self.requests.close()
        for sock in self.replies.values():
            sock.close()
