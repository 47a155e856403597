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

Each request carries a `KvPlan` (from the worker shell; the scheduler's caching mode
decides it): with `cache=False` nothing is matched or inserted and finished requests'
blocks go back to the lease (serving without context caching). P/D adds two shapes:

- prefill (`plan.handoff`): the prompt's whole blocks are kept after the first token, pinned
  in the index (cache) or owned by this worker (no cache), in `plan.outbox` for the shell
  to transfer to the decode instance; the shell calls `handed_off` when they are sent;
- decode (`plan.kv_block_ids`): the prompt's KV arrived from the prefill side, pinned by
  `plan.kv_handle` in our index or allocated to us (plain transfer); it is the request's
  borrowed prefix. With `plan.return_kv_to` (pd-caching-3) the whole history goes back to
  the prefill daemon after the insert, in the background.

A fetch (`plan.fetch`) first pulls a prefix another instance holds into our index, so the
local `match` finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from dataclasses import dataclass, field
from typing import Any

import torch

from common.errors import ErrorKind, MemServeError
from common.logging import get_logger
from common.mempool_client import MempoolClient
from common.model.config import ModelConfig
from common.model.presets import resolve_model
from common.protocol import mempool as mp
from common.protocol import worker as wp
from common.sockets import RpcError
from common.tokenizer import Tokenizer
from services.mempool.region import Region, ShmRegion
from services.worker.async_engine import AsyncEngine, _Pending
from services.worker.block_pool import BlockPool
from services.worker.config import EngineConfig
from services.worker.engine import Engine, RequestOutput, resolve_dtype
from services.worker.kv_cache import KVLayout
from services.worker.request import FinishReason

log = get_logger(__name__)

# Blocks leased above the step's demand, so a decode that crosses into a new block rarely
# costs an extra round trip.
_LEASE_SLACK = 8


@dataclass
class Outbox:
    """A prefilled prompt's KV, waiting to be sent to the decode instance: whole blocks
    holding `tokens`, pinned by `handle` in our index, or (handle 0) owned by this worker
    in the daemon (freed once sent)."""

    tokens: list[int]
    block_ids: list[int]
    handle: int = 0


@dataclass
class KvPlan:
    """What one request does with the MemPool (see the module docstring)."""

    cache: bool = True
    fetch: wp.Fetch | None = None
    handoff: wp.HandOff | None = None
    kv_block_ids: list[int] = field(default_factory=list)
    kv_handle: int = 0
    return_kv_to: str = ""
    outbox: Outbox | None = None  # set when a handoff request's prefill is done
    borrowed_owned: list[int] = field(default_factory=list)  # freed at the end


class MempoolEngine(AsyncEngine):
    def __init__(
        self,
        engine: Engine,
        client: MempoolClient,
        region: Region,
        *,
        owner: str,
        tokenizer: Tokenizer | None = None,
        caching: bool = True,
        keep_free_blocks: int = 32,
        mempool_address: str = "",
        transfer_timeout_s: float = 10.0,
    ):
        super().__init__(engine, tokenizer)
        self.client = client
        self.region = region
        self.owner = owner
        self.caching = caching  # the plan of requests that come without one
        self.keep_free_blocks = keep_free_blocks
        self.mempool_address = mempool_address
        self.transfer_timeout_s = transfer_timeout_s
        self.peers: dict[str, MempoolClient] = {}
        self.background: set[asyncio.Task[None]] = set()
        self.returned_kv = 0  # pd-caching-3 transfers back that succeeded

    @classmethod
    async def connect(
        cls,
        config: EngineConfig,
        mempool_address: str,
        *,
        owner: str,
        caching: bool = True,
        tokenizer: Tokenizer | None = None,
        transfer_timeout_s: float = 10.0,
    ) -> MempoolEngine:
        """Map the daemon's device region and build an engine on it (same model and layout).
        Whatever the daemon still holds for `owner` (an earlier run of this worker that
        died) is released first."""
        client = MempoolClient(mempool_address)
        info = await client.info()
        on_gpu = config.device.startswith("cuda")
        if info.device_kind != ("cuda" if on_gpu else "shm"):
            raise MemServeError(
                f"mempool {mempool_address} serves a {info.device_kind} region; this worker "
                f"runs on {config.device} (set mempool.device to match worker.device)"
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
        released = await client.release_owner(owner)
        if released:
            log.warning("released blocks of an earlier run", owner=owner, blocks=released)
        region = _attach_region(info)
        sized = EngineConfig(**{**_fields(config), "num_kv_blocks": info.device_max_blocks})
        kv: memoryview | torch.Tensor = region.buffer if region.on_host else region.tensor()
        engine = Engine.from_config(sized, kv_buffer=kv, pool=BlockPool())
        return cls(
            engine,
            client,
            region,
            owner=owner,
            tokenizer=tokenizer,
            caching=caching,
            mempool_address=mempool_address,
            transfer_timeout_s=transfer_timeout_s,
        )

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    def peer(self, address: str) -> MempoolClient:
        client = self.peers.get(address)
        if client is None:
            client = self.peers[address] = MempoolClient(address)
        return client

    # ------------------------------------------------------------------ hooks
    def _plan(self, p: _Pending) -> KvPlan:
        if p.context is None:
            p.context = KvPlan(cache=self.caching)
        assert isinstance(p.context, KvPlan)
        return p.context

    async def _admit(self, p: _Pending) -> dict[str, Any]:
        plan = self._plan(p)
        keep = plan.cache or plan.handoff is not None
        if plan.kv_block_ids:  # decode: the prompt's KV came from the prefill side
            p.pin = plan.kv_handle
            if not plan.kv_handle:
                plan.borrowed_owned = list(plan.kv_block_ids)
            return {
                "borrowed_block_ids": plan.kv_block_ids,
                "num_computed_tokens": len(plan.kv_block_ids) * self.block_size,
                "keep_blocks": keep,
            }
        if not plan.cache:
            return {"keep_blocks": keep}
        if plan.fetch is not None:
            await self._fetch(p.prompt_ids, plan.fetch)
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

    async def _fetch(self, prompt: list[int], fetch: wp.Fetch) -> None:
        """Pull a prefix from `fetch.mempool` into our index; on failure, compute it."""
        src = self.peer(fetch.mempool)
        try:
            m = await src.match(prompt[: fetch.num_tokens], owner=f"fetch:{self.owner}")
        except Exception as exc:
            log.warning(
                "fetch: match at the source failed", source=fetch.instance_id, error=str(exc)
            )
            return
        if not m.handle:
            return
        try:
            await src.transfer_with_insert(
                self.mempool_address,
                prompt[: m.num_tokens],
                m.block_ids,
                timeout_s=self.transfer_timeout_s,
                skip_cached=True,
            )
        except Exception as exc:
            log.warning("fetch failed; computing instead", source=fetch.instance_id, error=str(exc))
        finally:
            with contextlib.suppress(Exception):
                await src.release(m.handle)

    async def _refused(self, p: _Pending) -> None:
        await self._drop_borrowed(p)

    async def _drop_borrowed(self, p: _Pending) -> None:
        handle, p.pin = p.pin, 0
        plan = self._plan(p)
        owned, plan.borrowed_owned = plan.borrowed_owned, []
        if handle:
            await self.client.release(handle)
        if owned:
            await self.client.free_mem(owned)

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
                if exc.kind != ErrorKind.OUT_OF_MEMORY:
                    raise
                n //= 2

    async def _on_finished(self, p: _Pending, out: RequestOutput) -> None:
        plan = self._plan(p)
        try:
            if plan.handoff is not None and out.finish_reason == FinishReason.LENGTH:
                await self._keep_for_handoff(p, plan, out)
            elif out.block_ids:  # caching: the request kept its blocks for the index
                if plan.cache:
                    tokens = (p.prompt_ids + p.output_ids)[: out.num_kv_tokens]
                    inserted = await self.client.insert(tokens, out.block_ids)
                    # The index (or the daemon's free list, for duplicates and the tail) has them.
                    self.engine.disown_blocks(
                        [b for b in out.block_ids if b in self.engine.handed_out]
                    )
                    if plan.return_kv_to and inserted.num_indexed_tokens:
                        tokens = tokens[: inserted.num_indexed_tokens]
                        self._spawn(self._return_kv(tokens, plan.return_kv_to))
                else:  # a handoff request that ended early (abort, error, eos)
                    self.engine.release_blocks(
                        [b for b in out.block_ids if b in self.engine.handed_out]
                    )
        finally:
            await self._drop_borrowed(p)

    async def _keep_for_handoff(self, p: _Pending, plan: KvPlan, out: RequestOutput) -> None:
        """Prefill done: keep the prompt's whole blocks for the decode side (`plan.outbox`)."""
        bs = self.block_size
        whole = out.num_kv_tokens // bs
        tokens = p.prompt_ids[: whole * bs]
        handed = [b for b in out.block_ids if b in self.engine.handed_out]
        if plan.cache:
            # Under a block nothing is indexed or pinned: decode recomputes the prompt.
            r = await self.client.insert(
                p.prompt_ids[: out.num_kv_tokens], out.block_ids, pin_owner=self.owner
            )
            self.engine.disown_blocks(handed)
            pinned = len(r.index_block_ids) * bs
            plan.outbox = Outbox(tokens[:pinned], r.index_block_ids, r.handle)
            return
        # No cache: the whole blocks leave the engine (still ours in the daemon) until
        # they are sent; the partial tail goes back to the lease.
        send = out.block_ids[:whole]
        self.engine.release_blocks(out.block_ids[whole:])
        self.engine.disown_blocks(send)
        plan.outbox = Outbox(tokens, send)

    async def handed_off(self, outbox: Outbox) -> None:
        """The outbox was sent (or given up): unpin or free its blocks."""
        if outbox.handle:
            await self.client.release(outbox.handle)
        elif outbox.block_ids:
            await self.client.free_mem(outbox.block_ids)

    async def _return_kv(self, tokens: list[int], dst: str) -> None:
        """pd-caching-3: send the request's history (decode-phase KV included) back to the
        prefill daemon, which indexes it; only the blocks it lacks move."""
        m = await self.client.match(tokens, owner=self.owner)
        if not m.handle:
            return
        try:
            await self.client.transfer_with_insert(
                dst,
                tokens[: m.num_tokens],
                m.block_ids,
                timeout_s=self.transfer_timeout_s,
                skip_cached=True,
            )
            self.returned_kv += 1
        finally:
            await self.client.release(m.handle)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background transfer failed", error=str(t.exception()))

        task.add_done_callback(done)

    async def _on_idle(self) -> None:
        extra = self.engine.pool.num_free - self.keep_free_blocks
        if extra > 0:
            await self.client.free_mem(self.engine.pool.take_free(extra))

    def load(self) -> tuple[int, int, int, int]:
        """(waiting requests, running requests, waiting tokens, running tokens)."""
        sched = self.engine.scheduler
        waiting = list(sched.waiting)
        wait_tokens = sum(r.num_tokens - r.num_computed_tokens for r in waiting)
        run_tokens = sum(r.num_computed_tokens for r in sched.running)
        return len(waiting) + len(self._inbox), len(sched.running), wait_tokens, run_tokens

    async def close(self) -> None:
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await super().close()
        spare = self.engine.pool.take_free(self.engine.pool.num_free)
        try:
            if spare:
                await self.client.free_mem(spare)
        except (RpcError, TimeoutError) as exc:
            log.warning("could not return blocks to the mempool", error=str(exc))
        self.client.close()
        for peer in self.peers.values():
            peer.close()
        # The KV tensor is a view of the region: drop it before unmapping.
        del self.engine
        gc.collect()
        try:
            self.region.close()
        except BufferError:
            log.warning("the KV region is still referenced; it is unmapped at exit")


def _attach_region(info: mp.InfoReply) -> Region:
    """Map the daemon's device tier: its shm segment (populating the blocks in use, the KV
    every forward pass writes), or its GPU memory through the CUDA IPC handle."""
    if info.device_kind == "cuda":
        from services.mempool.cuda_region import CudaRegion

        return CudaRegion.attach(info.device_name, info.block_bytes, info.device_max_blocks)
    return ShmRegion.attach(
        info.device_name,
        info.block_bytes,
        info.device_max_blocks,
        prefault_blocks=info.device_blocks,
    )


def _fields(config: EngineConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__struct_fields__}
