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
- when idle: give leased blocks above `keep_free_blocks` back, so the daemon can use them;
- preemption by swap (`preemption_mode = "swap"`): before each step, before leasing, do
  the swaps the scheduler marked through the daemon's host tier: `swap_out` a victim's
  blocks (the daemon copies them to host blocks and frees the device ones; a refusal,
  e.g. the host tier full, falls back to recompute), and for a request coming back give
  the blocks reserved for it back and `swap_in` (the daemon picks the device blocks);
  host blocks of requests that ended while swapped are freed.

Each request carries a `KvPlan` (from the worker shell; the scheduler's caching mode
decides it), and everything about its KV outside the engine (the prefix found or fetched
at admission, the insert at the end, the P/D hand-off and the pd-caching-3 return) belongs
to the worker's `KVConnector` (services/worker/kv_connector.py); this class only leases
memory and tells the engine which blocks the connector took. A prefill's hand-off comes
back on the stream's final output (`StreamOutput.kv_transfer`), for the shell to `send`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable
from typing import Any

import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from common.errors import ErrorKind, MemServeError
from common.logging import get_logger
from common.mempool_client import MempoolClient
from common.model.config import ModelConfig
from common.model.presets import resolve_model
from common.protocol import mempool as mp
from common.sockets import RpcError
from common.tokenizer import Tokenizer
from services.mempool.region import Region, ShmRegion
from services.worker.async_engine import AsyncEngine, StreamOutput, _Pending
from services.worker.block_pool import BlockPool
from services.worker.config import EngineConfig
from services.worker.engine import Engine, RequestOutput, resolve_dtype
from services.worker.kv_cache import KVCache, KVLayout
from services.worker.kv_connector import KvPlan, KvPrefix, KvTransfer, MempoolConnector
from services.worker.load import KvLoad, kv_load
from services.worker.model.arena import ParamArena, place_in_region
from services.worker.request import FinishReason, Request

log = get_logger(__name__)

# Blocks leased above the step's demand, so a decode that crosses into a new block rarely
# costs an extra round trip.
_LEASE_SLACK = 8
# Giving blocks back at close: a dead daemon must not hold up a worker's exit.
_CLOSE_RPC_TIMEOUT_S = 1.0
_HOST_TIER = 1
# A swap-out the daemon refuses (host tier full or absent, blocks in a transfer): the
# victim is recomputed instead. Anything else (the daemon gone) fails the step.
_SWAP_REFUSALS = (ErrorKind.OUT_OF_MEMORY, ErrorKind.BAD_REQUEST, ErrorKind.REFUSED)


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
        incarnation: str = "",
    ):
        super().__init__(engine, tokenizer)
        self.client = client
        self.region = region
        self.owner = owner
        self.incarnation = incarnation  # of the daemon whose memory this engine runs on
        self.abandoned = ""  # why, once `abandon` ran
        self.fenced = ""  # why, once the connection to the daemon dropped
        self.on_fenced: Callable[[], None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.caching = caching  # the plan of requests that come without one
        # In a KunServe group the engine's pool is fixed for the group's life (group
        # blocks, not daemon blocks): nothing is leased per step or given back when idle,
        # and nothing is cached. `group_lease` is what this worker holds at its daemon.
        self.grouped = False
        self.group_lease: list[int] = []
        self.stepped = asyncio.Event()  # set as a group's leader starts each step
        # On a GPU with a budget: the parameters live at the top of the daemon's region.
        self.arena: ParamArena | None = None
        self.keep_free_blocks = keep_free_blocks
        self.connector = MempoolConnector(
            client,
            owner=owner,
            block_size=engine.block_size,
            mempool_address=mempool_address,
            transfer_timeout_s=transfer_timeout_s,
        )

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
        model: Any = None,
    ) -> MempoolEngine:
        """Map the daemon's device region and build an engine on it (same model and layout).
        Whatever the daemon still holds for `owner` (an earlier run of this worker that
        died, or stale requests of this one from before its daemon restarted) is released
        first. `model`: the loaded model of an engine this one replaces (a re-attach)."""
        client = MempoolClient(mempool_address)
        try:
            info = await client.info()
            if info.split > 1:
                info = await _unsplit(client, owner, info, config)
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
            if model is None:
                engine = Engine.from_config(sized, kv_buffer=kv, pool=BlockPool())
            else:
                n = info.device_max_blocks
                cache = (
                    KVCache.from_bytes(layout, kv, n)
                    if isinstance(kv, torch.Tensor)
                    else KVCache.from_buffer(layout, kv, n)
                )
                engine = Engine(model, cache, sized, BlockPool())
            arena = None
            if on_gpu and info.budget_bytes:
                # One allocation for parameters and KV (docs/mempool.md, the instance
                # arena): the parameters move to the top of the daemon's region, so a drop
                # frees memory the daemon can lend to KV.
                arena = place_in_region(
                    engine.model, region.tensor(), info.device_blocks * info.block_bytes
                )
            try:
                await _report_params(
                    client, engine.model, mempool_address, arena.footprint if arena else None
                )
            except MemServeError:
                del engine, kv  # views of the region: drop them before unmapping it
                gc.collect()
                with contextlib.suppress(BufferError):
                    region.close()
                raise
            out = cls(
                engine,
                client,
                region,
                owner=owner,
                tokenizer=tokenizer,
                caching=caching,
                mempool_address=mempool_address,
                transfer_timeout_s=transfer_timeout_s,
                incarnation=info.incarnation,
            )
            out.arena = arena
            out._watch = asyncio.create_task(out._watch_connection())
            return out
        except BaseException:
            client.close()
            raise

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    # ------------------------------------------------------------------ hooks
    def _plan(self, p: _Pending) -> KvPlan:
        if p.context is None:
            p.context = KvPlan(cache=self.caching)
        assert isinstance(p.context, KvPlan)
        return p.context

    async def _admit(self, p: _Pending) -> dict[str, Any]:
        plan = self._plan(p)
        if self.grouped:
            return {}
        prefix = p.borrowed = await self.connector.get_prefix(p.prompt_ids, plan)
        if not prefix.block_ids:
            return {"keep_blocks": plan.keep_blocks}
        return {
            "borrowed_block_ids": prefix.block_ids,
            "num_computed_tokens": len(prefix.block_ids) * self.block_size,
            "keep_blocks": plan.keep_blocks,
        }

    async def _refused(self, p: _Pending) -> None:
        await self._release_borrowed(p)

    async def _release_borrowed(self, p: _Pending) -> None:
        prefix, p.borrowed = p.borrowed, None
        if isinstance(prefix, KvPrefix):
            await self.connector.release_prefix(prefix)

    async def _exported(self, p: _Pending) -> None:
        await self._release_borrowed(p)
        await self._free_host_garbage()  # one that left while swapped: before the engine may go

    async def _before_step(self) -> None:
        if self.grouped:
            self.stepped.set()
            return
        await self._swap()
        want = self.engine.scheduler.demand() - self.engine.pool.num_free
        if want > 0:
            await self._lease(want + _LEASE_SLACK)

    async def _swap(self) -> None:
        """The scheduler's swaps, through the daemon's host tier (see the module docstring)."""
        sched = self.engine.swapper()
        if sched is None:
            return
        for req in list(sched.swapping_out):
            try:
                host = await self.client.swap_out(list(req.owned_block_ids))
            except RpcError as exc:
                if exc.kind not in _SWAP_REFUSALS:
                    raise
                log.debug(
                    "swap-out refused; recomputing", request_id=req.request_id, error=str(exc)
                )
                sched.swap_out_refused(req)
                continue
            sched.swap_out_done(req, host, disown=True)
        for req in list(sched.swapping_in):
            reserved = sched.take_swap_in_blocks(req)
            if reserved:  # room at the daemon for the swap-in (the pool shrinks, then grows back)
                await self.client.free_mem(reserved)
            try:
                blocks = await self.client.swap_in(sched.swapped_kv[req.request_id].host_block_ids)
            except RpcError as exc:
                if exc.kind != ErrorKind.OUT_OF_MEMORY:
                    raise
                sched.swap_in_refused(req)  # memory went elsewhere meanwhile: later
                continue
            sched.swap_in_done(req, blocks)
        await self._free_host_garbage()

    async def _free_host_garbage(self) -> None:
        sched = self.engine.swapper()
        if sched is not None and sched.host_garbage:
            garbage, sched.host_garbage = sched.host_garbage, []
            if not (self.fenced or self.abandoned):  # else that daemon's memory is gone
                await self.client.free_mem(garbage, tier=_HOST_TIER)

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

    async def _on_finished(self, p: _Pending, out: RequestOutput) -> KvTransfer | None:
        """The connector decides what becomes of the blocks the engine handed over; the
        engine disowns those it took and takes the others of its own back to the lease."""
        try:
            if not out.block_ids:  # the request kept nothing (no cache, no hand-off)
                return None
            assert out.finish_reason is not None
            tokens = (p.prompt_ids + p.output_ids)[: out.num_kv_tokens]
            done = await self.connector.request_finished(
                tokens, out.block_ids, self._plan(p), out.finish_reason
            )
            handed = [b for b in out.block_ids if b in self.engine.handed_out]
            taken = set(done.taken)
            self.engine.disown_blocks([b for b in handed if b in taken])
            self.engine.release_blocks([b for b in handed if b not in taken])
            return done.transfer
        finally:
            await self._release_borrowed(p)

    async def _on_idle(self) -> None:
        if self.grouped:
            return
        await self._free_host_garbage()
        extra = self.engine.pool.num_free - self.keep_free_blocks
        if extra > 0:
            await self.client.free_mem(self.engine.pool.take_free(extra))

    async def _fail_all(self, message: str) -> None:
        await super()._fail_all(self.fenced or message)

    # ------------------------------------------------------------------ fencing
    async def _watch_connection(self) -> None:
        """Fence this engine the moment its connection to the daemon drops: close the
        client, so that the requests ZeroMQ queued for a daemon that is gone are dropped,
        not delivered to the next daemon on that address (a restarted one), where block ids
        leased here would mean other memory. Its requests then fail (their KV is gone).
        The socket is the client's own (private to common/sockets.py: read, not changed)."""
        sock = self.client._rpc._sock
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    break
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
        self.fenced = (
            f"worker {self.owner} lost its connection to its MemPool daemon (it exited or "
            "restarted): this request's KV memory is gone"
        )
        log.error("connection to the MemPool daemon dropped; fencing the engine")
        self.client.close()
        self.fail_all(self.fenced)
        if self.on_fenced is not None:
            self.on_fenced()

    async def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None

    def load(self) -> tuple[int, int, int, int]:
        """(waiting requests, running requests, waiting tokens, running tokens)."""
        sched = self.engine.scheduler
        waiting = list(sched.waiting) + self._swapped()
        wait_tokens = sum(r.num_tokens - r.num_computed_tokens for r in waiting)
        run_tokens = sum(r.num_computed_tokens for r in sched.running)
        return len(waiting) + len(self._inbox), len(sched.running), wait_tokens, run_tokens

    def kv_load(self, daemon_capacity: int, leader: bool) -> KvLoad:
        """The elastic controller's figures (services/worker/load.py): a solo engine's
        capacity is its daemon's (`daemon_capacity`), a group leader's its group blocks;
        a follower reports nothing (its leader does, for the group)."""
        if self.grouped and not leader:
            return KvLoad()
        sched = self.engine.scheduler
        capacity = self.engine.pool.num_blocks if self.grouped else daemon_capacity
        pending = [len(p.prompt_ids) for p in self._inbox if p.adopted is None]
        # Copies first: a step may run in the executor thread meanwhile.
        running, waiting = list(sched.running), list(sched.waiting) + self._swapped()
        return kv_load(running, waiting, pending, self.block_size, capacity)

    def _swapped(self) -> list[Request]:
        """Requests whose KV is (or goes) off the device: they wait for blocks to come back
        into (a swapped request holds only its borrowed prefix, so `blocks_needed` counts
        all it needs)."""
        sched = self.engine.swapper()
        if sched is None:
            return []
        return [*sched.swapping_out, *sched.swapped, *sched.swapping_in]

    async def close(self) -> None:
        """Stop, give the leased blocks back (briefly: the daemon may be gone), unmap."""
        if self.abandoned:
            return
        await self._stop_watch()
        await self.connector.close()
        await super().close()
        if self.grouped:
            spare, self.group_lease = self.group_lease, []
        else:
            spare = self.engine.pool.take_free(self.engine.pool.num_free)
        try:
            if spare:
                await self.client.call(mp.FreeMem(spare), timeout_s=_CLOSE_RPC_TIMEOUT_S)
            sched = self.engine.swapper()
            if sched is not None and sched.host_garbage:
                garbage, sched.host_garbage = sched.host_garbage, []
                await self.client.call(
                    mp.FreeMem(garbage, _HOST_TIER), timeout_s=_CLOSE_RPC_TIMEOUT_S
                )
        except (RpcError, TimeoutError) as exc:
            log.warning("could not return blocks to the mempool", error=str(exc))
        self.client.close()
        self._unmap()

    async def abandon(self, message: str) -> Any:
        """The daemon this engine ran on is gone (a restarted daemon is another process,
        with other memory): end every request with `message`, stop, and unmap, without a
        word to the daemon. The client closes first, so nothing of this engine (a lease, an
        insert, a free of block ids that mean nothing there) reaches the daemon now on the
        same address. Returns the loaded model, for the engine that replaces this one."""
        self.abandoned = message
        await self._stop_watch()
        self.client.close()  # every call from here on raises RpcClosed
        model = self.engine.model
        await self.connector.close()
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._driver
            self._driver = None
        await asyncio.to_thread(self._executor.shutdown, True)  # a step in flight ends
        for p in [*self._streams.values(), *self._inbox]:
            p.queue.put_nowait(
                StreamOutput(
                    p.request_id,
                    [],
                    finished=True,
                    finish_reason=FinishReason.ERROR.value,
                    error=message,
                )
            )
        self._streams.clear()
        self._inbox.clear()
        self._unmap()
        return model

    def _unmap(self) -> None:
        # The KV tensor is a view of the region: drop it before unmapping.
        del self.engine
        gc.collect()
        try:
            self.region.close()
        except BufferError:
            log.warning("the KV region is still referenced; it is unmapped at exit")


async def _unsplit(
    client: MempoolClient, owner: str, info: mp.InfoReply, config: EngineConfig
) -> mp.InfoReply:
    """The daemon is still split: an earlier run of this worker died in a KunServe group.
    Give back what that run held, lower the capacity to whole blocks that fit beside the
    full model's parameters, and merge; then this worker attaches as to any daemon."""
    released = await client.release_owner(owner)
    g = info.split
    target = info.device_blocks // g * g
    if info.budget_bytes:
        dtype = str(resolve_dtype(config.dtype, config.device)).removeprefix("torch.")
        params = ModelConfig.from_folder(resolve_model(config.model)).param_bytes(dtype)
        full_block = info.block_bytes * g
        target = min(target, max(0, info.budget_bytes - params) // full_block * g)
    await client.shrink(target)
    await client.merge()
    log.warning(
        "the daemon was left split by an earlier run; merged it back", split=g, released=released
    )
    return await client.info()


async def _report_params(
    client: MempoolClient, model: Any, address: str, nbytes: int | None = None
) -> None:
    """Tell the daemon our resident parameter bytes (its memory budget's other half); a
    daemon whose budget cannot hold them beside its KV refuses, and so start-up fails.
    `nbytes`: what they occupy when that is not their sum (the arena's footprint)."""
    if nbytes is None:
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        await client.set_params(nbytes)
    except RpcError as exc:
        raise MemServeError(
            f"mempool {address} refused this worker's {nbytes:,} parameter bytes: {exc}"
        ) from exc


def _attach_region(info: mp.InfoReply) -> Region:
    """Map the daemon's device tier: its shm segment (populating the blocks in use, the KV
    every forward pass writes), or its GPU memory through the CUDA IPC handle."""
    if info.device_kind == "cuda":
        from services.mempool.cuda_region import CudaRegion

        return CudaRegion.attach(
            info.device_name,
            info.block_bytes,
            info.device_max_blocks,
            nbytes=info.budget_bytes or None,  # with a budget: the whole arena
        )
    return ShmRegion.attach(
        info.device_name,
        info.block_bytes,
        info.device_max_blocks,
        prefault_blocks=info.device_blocks,
    )


def _fields(config: EngineConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__struct_fields__}
