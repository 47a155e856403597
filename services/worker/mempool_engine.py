"""An `AsyncEngine` whose KV memory belongs to the instance's MemPool daemon.

    worker process                                   MemPool daemon process
    ┌──────────────────────────────────┐            ┌─────────────────────────────┐
    │ Engine ── KVCache over ──────────┼── mmap ────┼─▶ device region (shm)        │
    │   BlockPool: leased block ids    │◀─ RPC ────▶│   allocator + prompt tree    │
    └──────────────────────────────────┘            └─────────────────────────────┘

The engine computes in place on the daemon's region; only block ids cross the socket.
Around each request:

- admission: `match` the prompt (at most len - 1 tokens: the last one is computed to get
  logits); the hit becomes the request's borrowed prefix, pinned until the request ends;
- before each step: lease from the daemon the blocks the step will allocate
  (`Scheduler.demand`), so the synchronous engine never waits on a socket;
- at the end: `insert` the request's KV (prompt + output, whole blocks) into the daemon's
  index, which takes the blocks (freeing duplicates and the partial tail), then release the
  pin; the engine disowns those blocks;
- when idle: give leased blocks above `keep_free_blocks` back, so the daemon can use them.

With `caching=False` nothing is matched or inserted: finished requests' blocks go back to
the lease (colocated serving without context caching).
"""

from __future__ import annotations

import gc
from typing import Any

from common.errors import MemServeError
from common.logging import get_logger
from common.mempool_client import MempoolClient
from common.sockets import RpcError
from common.tokenizer import Tokenizer
from services.mempool.region import ShmRegion
from services.worker.async_engine import AsyncEngine, _Pending
from services.worker.block_pool import BlockPool
from services.worker.config import EngineConfig
from services.worker.engine import Engine, RequestOutput, resolve_dtype
from services.worker.kv_cache import KVLayout
from services.worker.model.config import ModelConfig
from services.worker.model.presets import resolve_model

log = get_logger(__name__)

# Blocks leased above the step's demand, so a decode that crosses into a new block rarely
# costs an extra round trip.
_LEASE_SLACK = 8


class MempoolEngine(AsyncEngine):
    def __init__(
        self,
        engine: Engine,
        client: MempoolClient,
        region: ShmRegion,
        *,
        owner: str,
        tokenizer: Tokenizer | None = None,
        caching: bool = True,
        keep_free_blocks: int = 32,
    ):
        super().__init__(engine, tokenizer)
        self.client = client
        self.region = region
        self.owner = owner
        self.caching = caching
        self.keep_free_blocks = keep_free_blocks

    @classmethod
    async def connect(
        cls,
        config: EngineConfig,
        mempool_address: str,
        *,
        owner: str,
        caching: bool = True,
        tokenizer: Tokenizer | None = None,
    ) -> MempoolEngine:
        """Map the daemon's device region and build an engine on it (same model and layout)."""
        client = MempoolClient(mempool_address)
        info = await client.info()
        if info.device_kind != "shm":
            raise MemServeError(
                f"mempool {mempool_address} serves a {info.device_kind} region; this worker maps shm"
            )
        model_cfg = ModelConfig.from_folder(resolve_model(config.model))
        layout = KVLayout.for_model(
            model_cfg, config.block_size, resolve_dtype(config.dtype, config.device)
        )
        if info.block_size != config.block_size or info.block_bytes != layout.bytes_per_block:
            raise MemServeError(
                f"mempool blocks ({info.block_size} tokens, {info.block_bytes} bytes) do not fit this engine "
                f"({config.block_size} tokens, {layout.bytes_per_block} bytes): same model, dtype and block size?"
            )
        region = ShmRegion.attach(info.device_name, info.block_bytes, info.device_max_blocks)
        sized = EngineConfig(**{**_fields(config), "num_kv_blocks": info.device_max_blocks})
        engine = Engine.from_config(sized, kv_buffer=region.buffer, pool=BlockPool())
        return cls(engine, client, region, owner=owner, tokenizer=tokenizer, caching=caching)

    # ------------------------------------------------------------------ hooks
    async def _admit(self, p: _Pending) -> dict[str, Any]:
        if not self.caching:
            return {}
        m = await self.client.match(
            p.prompt_ids, owner=self.owner, max_tokens=len(p.prompt_ids) - 1
        )
        if not m.handle:
            return {"keep_blocks": True}
        p.pin = m.handle
        return {
            "borrowed_block_ids": m.block_ids,
            "num_computed_tokens": m.num_tokens,
            "keep_blocks": True,
        }

    async def _refused(self, p: _Pending) -> None:
        if p.pin:
            await self.client.release(p.pin)
            p.pin = 0

    async def _before_step(self) -> None:
        want = self.engine.scheduler.demand() - self.engine.pool.num_free
        if want > 0:
            await self._lease(want + _LEASE_SLACK)

    async def _lease(self, n: int) -> None:
        # Ask for less when the daemon cannot give it all (everything else pinned or in
        # use): the scheduler then preempts, as on any engine that runs short.
        while n > 0:
            try:
                self.engine.pool.add(await self.client.alloc_mem(n, owner=self.owner))
                return
            except RpcError as exc:
                if "blocks asked" not in str(exc):
                    raise
                n //= 2

    async def _on_finished(self, p: _Pending, out: RequestOutput) -> None:
        handle, p.pin = p.pin, 0
        try:
            if out.block_ids:  # caching: the request kept its blocks for the index
                tokens = (p.prompt_ids + p.output_ids)[: out.num_kv_tokens]
                await self.client.insert(tokens, out.block_ids)
                # The index (or the daemon's free list, for duplicates and the tail) has them.
                self.engine.disown_blocks([b for b in out.block_ids if b in self.engine.handed_out])
        finally:
            if handle:
                await self.client.release(handle)

    async def _on_idle(self) -> None:
        extra = self.engine.pool.num_free - self.keep_free_blocks
        if extra > 0:
            await self.client.free_mem(self.engine.pool.take_free(extra))

    async def close(self) -> None:
        await super().close()
        spare = self.engine.pool.take_free(self.engine.pool.num_free)
        try:
            if spare:
                await self.client.free_mem(spare)
        except (RpcError, TimeoutError) as exc:
            log.warning("could not return blocks to the mempool", error=str(exc))
        self.client.close()
        # The KV tensor is a view of the region: drop it before unmapping.
        del self.engine
        gc.collect()
        try:
            self.region.close()
        except BufferError:
            log.warning("the KV region is still referenced; it is unmapped at exit")


def _fields(config: EngineConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__struct_fields__}
