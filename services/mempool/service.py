"""The MemPool daemon: an asyncio shell around `MemPool` that owns the sockets and memory.

    worker / peers / scheduler / admin ──RPC (ROUTER)──▶ handle() ──▶ MemPool (pure core)
                                                            │
    scheduler ◀──PUB kv_events── publish() ◀── tree events ─┘
    peer daemons ◀══ data plane (shm | tcp | ucx): Sender ══▶ peer's Receiver ══▶ our region

A transfer, seen from the sending daemon S and the receiving daemon D:

    S: check src blocks are readable (client-owned or pinned)
    S ──PrepareReceive──▶ D: allocate (or take the given dst ids), expect the runs, name the transfer
    S ══ bytes ════════▶ D's region (straight into the destination blocks)
    S ──CommitReceive───▶ D: wait until every byte is in (+ checksum), then insert / pin
    failure: S ──AbortReceive──▶ D: forget it and free; D also expires any transfer that is
             not committed by its deadline, so a sender that dies leaks nothing.

D frees a failed transfer's blocks at once only where the transport fences late writes
(tcp, ucx: `Receiver.cancel_fences_writes`); otherwise (shm) it waits until the sender has
stopped or the deadline passed.
Only this event loop touches the pool, so core calls never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from common.auth import check_admin_token
from common.codec import DTYPE_BYTES
from common.kv_geometry import KVGeometry
from common.logging import get_logger
from common.protocol import kv_events as ev
from common.protocol import mempool as mp
from common.protocol.admin import AdminReply, AdminRequest
from common.sockets import PubSocket, RpcClient, RpcServer
from services.mempool.config import MempoolConfig
from services.mempool.pool import InvalidBlocks, MemPool, MemPoolError
from services.mempool.prompt_tree import Tier, TreeEvent
from services.mempool.region import HostRegion, Region, ShmRegion, copy_blocks
from services.mempool.tensor_store import PAGE_BYTES, TensorEntry, TensorStore, TensorStoreError
from services.mempool.transport import (
    CopyRun,
    Receiver,
    Sender,
    available_transports,
    coalesce,
    make_transport,
)

if TYPE_CHECKING:
    from services.mempool.cuda_region import CudaRegion

log = get_logger(__name__)

# How long a receiver keeps blocks of an unfenced failed transfer after its deadline.
_GRACE_S = 1.0


@dataclass
class _Pending:
    ids: list[int]  # KV blocks, or for a tensor [first_page]
    owned: bool  # allocated by the transfer (freed on failure) vs. given by a client
    transport: str
    deadline: float
    handle: asyncio.TimerHandle | None = None
    tensor: TensorEntry | None = None  # set for a tensor transfer (pages reserved, not named yet)
    committing: bool = False  # a commit is waiting for the last bytes
    aborted: bool = False  # ... and was told to give up
    # skip_cached: the receiver's own cached blocks for the leading part of the tokens,
    # pinned by `skip_handle` until the commit inserts them with the received ones.
    skip_ids: list[int] = field(default_factory=list)
    skip_handle: int = 0


class MempoolDaemon:
    def __init__(self, cfg: MempoolConfig, block_bytes: int | None = None):
        self.cfg = cfg.validate()
        self.block_bytes = (
            block_bytes
            or KVGeometry.for_model_name(
                cfg.model, cfg.block_size, cfg.dtype, cfg.num_layers
            ).block_bytes
        )
        device = cfg.device_blocks or max(1, cfg.device_memory_bytes // self.block_bytes)
        max_blocks = max(device, cfg.device_max_blocks or device)
        host = cfg.host_blocks or cfg.host_memory_bytes // self.block_bytes
        self.device = _create_device_region(cfg, self.block_bytes, max_blocks, device)
        self.host: Region | None = HostRegion(self.block_bytes, host) if host else None
        self.pool = MemPool(
            cfg.block_size,
            device,
            host,
            device_max_blocks=max_blocks,
            copy_blocks=self._copy_blocks,
            ttl_s=cfg.ttl_s,
        )
        pages = cfg.tensor_memory_bytes // PAGE_BYTES
        self.tensors = TensorStore(pages)
        self.tensor_region = ShmRegion.create(PAGE_BYTES, max(1, pages))
        try:  # a config that names no usable transport: give the memory back, then fail
            self.transports = self._make_transports(self.device)
            self.tensor_transports = self._make_transports(self.tensor_region)
        except BaseException:
            for region in (self.device, self.host, self.tensor_region):
                if region is not None:
                    region.close()
            raise
        self.endpoints: dict[str, dict[str, str]] = {}
        self.tensor_endpoints: dict[str, dict[str, str]] = {}
        self.server = RpcServer(cfg.control_address, mp.MempoolRequest, mp.MempoolReply)
        self.events = PubSocket(cfg.events_address, ev.KvEventBatch, bind=True)
        self.peers: dict[str, RpcClient[Any, Any]] = {}
        self.pending: dict[int, _Pending] = {}
        self.tensors_sending: Counter[str] = Counter()  # names a SendTensor is reading
        self._transfer_ids = itertools.count(1)
        self._seq = itertools.count()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.transfers_failed = 0
        self._housekeeping: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.started_at = time.time()

    @property
    def address(self) -> str:
        return self.server.address

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> dict[str, str]:
        for name, (receiver, _) in self.transports.items():
            self.endpoints[name] = await receiver.start()
        for name, (receiver, _) in self.tensor_transports.items():
            self.tensor_endpoints[name] = await receiver.start()
        await self._publish([ev.AllCleared()])
        self._housekeeping = asyncio.create_task(self._housekeep())
        log.info(
            "mempool ready",
            address=self.address,
            device_blocks=self.pool.alloc[Tier.DEVICE].capacity,
            block_bytes=self.block_bytes,
            transports=list(self.transports),
        )
        return {
            "rpc": self.address,
            "events": self.events.address,
            self.device.kind: self.device.name,
        }

    def _make_transports(self, region: Region) -> dict[str, tuple[Receiver, Sender]]:
        """The configured transports that can move `region`'s memory here (host memory:
        shm, tcp, ucx, gloo; a CUDA device tier: nccl), receiving on `data_host`."""
        memory = "host" if region.on_host else "cuda"
        usable = available_transports(memory)
        names = [t for t in self.cfg.transports if t in usable]
        missing = sorted(set(self.cfg.transports) - set(names))
        if missing:
            log.warning("transports not available here", memory=memory, missing=missing)
        if not names:
            raise ValueError(
                f"none of mempool.transports {self.cfg.transports} can move {memory} memory "
                f"here (usable: {usable or 'none'})"
            )
        host = self.cfg.data_host
        options: dict[str, dict[str, Any]] = {
            "tcp": {"host": host},
            "ucx": {"advertise_host": host},
            "gloo": {"advertise_host": host},
            "nccl": {"advertise_host": host},
        }
        return {
            name: make_transport(name, region, receiver_options=options.get(name)) for name in names
        }

    async def serve(self) -> None:
        """Serve until closed or told to `shutdown` (then return)."""
        serving = asyncio.create_task(self.server.serve(self.handle))
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([serving, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (serving, stop):
                t.cancel()
            await asyncio.gather(serving, stop, return_exceptions=True)

    async def close(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        self.server.close()
        self.events.close()
        for client in self.peers.values():
            client.close()
        for receiver, sender in [*self.transports.values(), *self.tensor_transports.values()]:
            await receiver.close()
            await sender.close()
        self.device.close()
        self.tensor_region.close()
        if self.host is not None:
            self.host.close()

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.pool.expire():
                await self._publish_tree_events()

    # ------------------------------------------------------------------ requests
    async def handle(self, req: Any) -> Any:
        try:
            reply = await self._dispatch(req)
        finally:
            await self._publish_tree_events()
        return reply

    async def _dispatch(self, req: Any) -> Any:
        timeout = getattr(req, "timeout_s", None)
        if timeout is not None and not 0 < timeout <= 3600:
            raise MemPoolError(f"timeout_s must be in (0, 3600] seconds, got {timeout}")
        pool = self.pool
        match req:
            case AdminRequest():
                return self._admin(req)
            case mp.AllocMem(n=n, tier=tier, owner=owner):
                return mp.Blocks(pool.alloc_mem(n, _tier(tier), owner))
            case mp.FreeMem(block_ids=ids, tier=tier):
                pool.free_mem(ids, _tier(tier))  # refuses blocks a transfer is using
                return mp.Ok(len(ids))
            case mp.SwapOut(block_ids=ids, n=n):
                if ids:
                    return mp.Blocks(pool.swap_out(ids))
                if pool.alloc[Tier.HOST].capacity == 0:
                    raise MemPoolError("swap_out(n): this daemon has no host tier")
                return mp.Ok(pool.evict(n, Tier.DEVICE, demote_only=True))
            case mp.SwapIn(block_ids=ids):
                return mp.Blocks(pool.swap_in(ids))
            case mp.Insert(tokens=tokens, block_ids=ids, tier=tier, pin_owner=pin_owner):
                r = pool.insert(_tokens(tokens), ids, _tier(tier), pin_owner=pin_owner or None)
                return mp.Inserted(
                    r.num_indexed_tokens, r.index_block_ids, r.freed_block_ids, r.handle
                )
            case mp.Match(tokens=tokens, owner=owner, promote=promote, max_tokens=cap):
                m = pool.match(_tokens(tokens), owner, promote, None if cap < 0 else cap)
                return mp.Matched(m.handle, m.num_tokens, m.block_ids, [int(t) for t in m.tiers])
            case mp.Release(handle=handle):
                pool.release(handle)
                return mp.Ok()
            case mp.Delete(tokens=tokens):
                return mp.Ok(pool.delete(_tokens(tokens)))
            case mp.Evict(n=n, tier=tier):
                return mp.Ok(pool.evict(n, _tier(tier)))
            case mp.Grow(device_blocks=n):
                pool.grow(n)  # first: it refuses a bad size before anything changes
                old = self.device.capacity_blocks
                self.device.grow(n)
                if self.cfg.prefault:
                    self.device.populate(old, n - old)
                return mp.Ok(n)
            case mp.ReleaseOwner(owner=owner):
                return mp.Ok(pool.release_owner(owner))
            case mp.Transfer():
                return await self._send(
                    req.dst,
                    req.src_ids,
                    req.dst_ids,
                    b"",
                    "",
                    req.transport,
                    req.checksum,
                    req.timeout_s,
                    owner=req.owner,
                )
            case mp.TransferWithInsert(from_index=True, src_ids=[]):
                # Cached KV back to another daemon in one call (pd-caching-3): match here,
                # send the cached prefix, release that pin whatever happens.
                tokens = _tokens(req.tokens)
                m = pool.match(tokens, owner="from_index", promote=True)
                if not m.handle:
                    return mp.Transferred([], 0, 0.0, "")
                try:
                    return await self._send(
                        req.dst,
                        m.block_ids,
                        [],
                        tokens[: m.num_tokens * 4],
                        req.pin_owner,
                        req.transport,
                        req.checksum,
                        req.timeout_s,
                        skip_cached=req.skip_cached,
                    )
                finally:
                    pool.release(m.handle)
            case mp.TransferWithInsert():
                tokens = _tokens(req.tokens)
                need = -(-(len(tokens) // 4) // self.cfg.block_size)
                if len(req.src_ids) != need:
                    raise InvalidBlocks(
                        f"{len(tokens) // 4} tokens need {need} blocks, got {len(req.src_ids)}"
                    )
                return await self._send(
                    req.dst,
                    req.src_ids,
                    [],
                    tokens,
                    req.pin_owner,
                    req.transport,
                    req.checksum,
                    req.timeout_s,
                    skip_cached=req.skip_cached,
                )
            case mp.PutTensor():
                return self._put_tensor(req)
            case mp.GetTensor(name=name):
                e = self._tensor(name)
                data = self.tensor_region.array[e.first_page * PAGE_BYTES :][: e.nbytes].copy()
                return mp.TensorData(e.name, e.dtype, list(e.shape), data)
            case mp.DeleteTensor(name=name):
                self._tensor(name)
                self._check_not_sending(name)
                self.tensors.delete(name)
                return mp.Ok()
            case mp.ListTensors():
                infos = [
                    mp.TensorInfo(e.name, e.dtype, list(e.shape), e.nbytes)
                    for e in self.tensors.tensors.values()
                ]
                return mp.TensorList(infos, self.tensors.arena.free_pages * PAGE_BYTES)
            case mp.SendTensor():
                return await self._send_tensor(req)
            case mp.PrepareTensor():
                return self._prepare_tensor(req)
            case mp.PrepareReceive():
                return self._prepare(req)
            case mp.CommitReceive():
                return await self._commit(req)
            case mp.AbortReceive(transfer_id=tid):
                self._abort(tid, sender_done=True)
                return mp.Ok()
            case mp.Stats():
                return self._stats()
            case mp.CheckIntegrity():
                try:
                    self.pool.check_integrity()
                    reserved = [
                        (p.tensor.first_page, p.tensor.num_pages)
                        for p in self.pending.values()
                        if p.tensor
                    ]
                    self.tensors.check(reserved)
                except AssertionError as exc:
                    return mp.IntegrityReply(False, str(exc))
                return mp.IntegrityReply(True)
            case mp.Info():
                return self._info()
        raise MemPoolError(f"unsupported request {type(req).__name__}")

    def _admin(self, req: AdminRequest) -> AdminReply:
        if not check_admin_token(req.token, self.cfg.admin_token):
            return AdminReply(False, error="bad admin token")
        if req.command == "status":
            st = self.pool.stats()
            return AdminReply(
                True,
                {
                    "service": "mempool",
                    "instance_id": self.cfg.instance_id,
                    "uptime_s": round(time.time() - self.started_at, 3),
                    "capacity": dict(st.capacity),
                    "free": dict(st.free),
                    "pending_transfers": len(self.pending),
                },
            )
        if req.command == "shutdown":
            log.info("shutdown requested over the RPC socket")
            # After this reply is out: stopping now would cancel the reply itself.
            asyncio.get_running_loop().call_later(0.05, self._stop.set)
            return AdminReply(True, {"stopping": self.cfg.instance_id})
        return AdminReply(
            False, error=f"the daemon answers status and shutdown, not {req.command!r}"
        )

    # ----------------------------------------------------------- sending side
    def _peer(self, address: str) -> RpcClient[Any, Any]:
        client = self.peers.get(address)
        if client is None or client.closed:
            client = RpcClient(address, mp.MempoolRequest, mp.MempoolReply)
            self.peers[address] = client
        return client

    async def _send(
        self,
        dst: str,
        src_ids: list[int],
        dst_ids: list[int],
        tokens: bytes,
        pin_owner: str,
        transport: str,
        checksum: bool,
        timeout_s: float,
        *,
        owner: str = "",
        skip_cached: bool = False,
    ) -> mp.Transferred:
        if dst_ids and len(dst_ids) != len(src_ids):
            raise InvalidBlocks(
                f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks"
            )
        self.pool.check_readable(src_ids)
        offered = [transport] if transport else list(self.transports)
        if transport and transport not in self.transports:
            raise MemPoolError(
                f"transport {transport!r} is not enabled here; enabled: {list(self.transports)}"
            )
        peer = self._peer(dst)
        start = time.perf_counter()
        deadline = start + timeout_s
        # Until the bytes are out, nobody may free, swap, insert or evict the source blocks.
        self.pool.mark_busy(src_ids)
        pin = self.pool.pin_blocks(src_ids, owner="transfer")
        try:
            whole = len(tokens) // (4 * self.cfg.block_size) * 4 * self.cfg.block_size
            prep = await peer.call(
                mp.PrepareReceive(
                    len(src_ids),
                    dst_ids,
                    offered,
                    self.cfg.host_id,
                    self.block_bytes,
                    timeout_s,
                    owner,
                    tokens[:whole] if skip_cached else b"",
                ),
                timeout_s=timeout_s,
            )
            try:
                crc = None
                if prep.dst_ids:  # nothing to move when the receiver had every block
                    _, sender = self.transports[prep.transport]
                    crc = await sender.send(
                        prep.endpoint,
                        prep.transfer_id,
                        self.device,
                        coalesce(src_ids[prep.skip :], prep.dst_ids),
                        timeout_s=max(0.01, deadline - time.perf_counter()),
                        checksum=checksum,
                    )
                done = await peer.call(
                    mp.CommitReceive(
                        prep.transfer_id, tokens, pin_owner, -1 if crc is None else crc
                    ),
                    timeout_s=max(0.01, deadline - time.perf_counter()),
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await peer.call(mp.AbortReceive(prep.transfer_id), timeout_s=1.0)
                raise
        except MemPoolError:
            self.transfers_failed += 1
            raise
        except Exception as exc:
            self.transfers_failed += 1
            raise MemPoolError(f"transfer to {dst} failed: {type(exc).__name__}: {exc}") from None
        finally:
            self.pool.unmark_busy(src_ids)
            if pin:
                self.pool.release(pin)
        self.bytes_sent += done.nbytes
        return mp.Transferred(
            prep.dst_ids,
            done.nbytes,
            time.perf_counter() - start,
            prep.transport,
            done.num_indexed_tokens,
            done.index_block_ids,
            done.handle,
            done.tail_ids,
            prep.skip,
        )

    # --------------------------------------------------------- receiving side
    def _choose_transport(
        self, offered: list[str], sender_host: str, enabled: dict[str, tuple[Receiver, Sender]]
    ) -> str:
        for name in offered:
            if name not in enabled:
                continue
            if name in ("shm", "cuda-ipc") and sender_host != self.cfg.host_id:
                continue
            return name
        raise MemPoolError(
            f"no common transport: sender offers {offered}, receiver has {list(enabled)}"
        )

    def _prepare(self, req: mp.PrepareReceive) -> mp.Prepared:
        if req.block_bytes and req.block_bytes != self.block_bytes:
            raise MemPoolError(
                f"block size mismatch: sender {req.block_bytes} bytes, receiver {self.block_bytes}"
            )
        name = self._choose_transport(req.transports, req.sender_host, self.transports)
        tid = next(self._transfer_ids)
        skip_ids, skip_handle = [], 0
        if req.skip_tokens and not req.dst_ids:
            hit = self.pool.match(_tokens(req.skip_tokens), f"transfer:{tid}", promote=True)
            skip_ids, skip_handle = hit.block_ids[: req.num_blocks], hit.handle
        if req.dst_ids:
            if len(req.dst_ids) != req.num_blocks:
                raise InvalidBlocks(
                    f"{req.num_blocks} blocks announced, {len(req.dst_ids)} destination ids"
                )
            self.pool.check_client(req.dst_ids, Tier.DEVICE)
            ids, owned = list(req.dst_ids), False
        else:
            try:
                ids = self.pool.alloc_mem(
                    req.num_blocks - len(skip_ids),
                    Tier.DEVICE,
                    owner=req.owner or f"transfer:{tid}",
                )
            except Exception:
                if skip_handle:
                    self.pool.release(skip_handle)
                raise
            owned = True
        receiver, _ = self.transports[name]
        if ids:
            receiver.expect(tid, [(r.dst_block, r.num_blocks) for r in coalesce(ids, ids)])
        # Bytes will land here: the blocks' owner may not free or reuse them meanwhile.
        self.pool.mark_busy(ids)
        loop = asyncio.get_running_loop()
        p = _Pending(ids, owned, name, time.monotonic() + req.timeout_s)
        p.skip_ids, p.skip_handle = skip_ids, skip_handle
        p.handle = loop.call_later(req.timeout_s + _GRACE_S, self._expire, tid)
        self.pending[tid] = p
        return mp.Prepared(tid, ids, name, self.endpoints[name], len(skip_ids))

    async def _commit(self, req: mp.CommitReceive) -> mp.Committed:
        p = self.pending.get(req.transfer_id)
        if p is None or p.committing:
            raise MemPoolError(f"unknown, expired or already committing transfer {req.transfer_id}")
        tokens = _tokens(req.tokens) if req.tokens else b""
        all_ids = p.skip_ids + p.ids
        if tokens and -(-(len(tokens) // 4) // self.cfg.block_size) != len(all_ids):
            self._abort(req.transfer_id, sender_done=True)
            raise InvalidBlocks(
                f"{len(tokens) // 4} tokens do not fit the {len(all_ids)} blocks received"
            )
        receiver, _ = (self.tensor_transports if p.tensor else self.transports)[p.transport]
        # While we wait for the last bytes, an abort or the expiry timer only cancels the
        # receiver: freeing is left to this commit, so no block is freed under it.
        p.committing = True
        try:
            nbytes = 0
            if p.ids or p.tensor is not None:
                nbytes = await receiver.wait_complete(
                    req.transfer_id,
                    max(0.01, p.deadline - time.monotonic()),
                    None if req.checksum < 0 else req.checksum,
                )
            if p.aborted:
                raise MemPoolError(f"transfer {req.transfer_id} was aborted")
        except Exception:
            p.committing = False
            self._abort(req.transfer_id, sender_done=True)
            raise
        self._forget(req.transfer_id)
        if p.tensor is None:
            self.pool.unmark_busy(p.ids)
        self.bytes_received += nbytes
        if p.tensor is not None:
            t = p.tensor
            self.tensors.commit(t.name, t.dtype, t.shape, t.nbytes, t.first_page)
            return mp.Committed(nbytes)
        if not tokens:
            self._unpin_skipped(p)
            return mp.Committed(nbytes)
        try:
            # The pin promotes: every block handed to the new owner must be on the device.
            owner = req.pin_owner or None
            r = self.pool.insert(tokens, all_ids, Tier.DEVICE, tail_owner=owner, pin_owner=owner)
            handle, index_ids = r.handle, r.index_block_ids
            tail = all_ids[r.num_indexed_tokens // self.cfg.block_size :] if owner else []
        except MemPoolError:
            self.pool.free_mem(p.ids, Tier.DEVICE)
            raise
        finally:
            self._unpin_skipped(p)
        return mp.Committed(nbytes, r.num_indexed_tokens, index_ids, handle, tail)

    def _unpin_skipped(self, p: _Pending) -> None:
        if p.skip_handle:
            handle, p.skip_handle = p.skip_handle, 0
            self.pool.release(handle)

    def _forget(self, tid: int) -> _Pending | None:
        p = self.pending.pop(tid, None)
        if p is not None and p.handle is not None:
            p.handle.cancel()
        return p

    def _abort(self, tid: int, sender_done: bool) -> None:
        p = self.pending.get(tid)
        if p is None:
            return
        receiver, _ = (self.tensor_transports if p.tensor else self.transports)[p.transport]
        receiver.cancel(tid)
        if p.committing:
            p.aborted = True  # the commit in progress fails and frees
            return
        if p.owned and not (sender_done or receiver.cancel_fences_writes):
            return  # keep the blocks until the expiry timer: the sender may still write
        self._forget(tid)
        self._unpin_skipped(p)
        if p.tensor is not None:
            self.tensors.release(p.tensor.first_page, p.tensor.nbytes)
            return
        self.pool.unmark_busy(p.ids)
        if p.owned:
            self.pool.free_mem(p.ids, Tier.DEVICE)
        log.info("transfer aborted", transfer_id=tid, blocks=len(p.ids))

    def _expire(self, tid: int) -> None:
        p = self.pending.get(tid)
        if p is None:
            return
        log.warning("transfer expired before its commit", transfer_id=tid)
        self.transfers_failed += 1
        # Past deadline + grace the sender has given up: its late bytes are harmless.
        self._abort(tid, sender_done=True)

    # ---------------------------------------------------------------- tensors
    def _tensor(self, name: str) -> TensorEntry:
        try:
            return self.tensors.get(name)
        except TensorStoreError as exc:
            raise MemPoolError(str(exc)) from None

    def _check_not_sending(self, name: str) -> None:
        if self.tensors_sending[name]:
            raise MemPoolError(f"tensor {name!r} is being sent; try again when the send ends")

    def _put_tensor(self, req: mp.PutTensor) -> mp.Ok:
        self._check_not_sending(req.name)
        nbytes = _tensor_nbytes(req.dtype, req.shape)
        data = np.asarray(req.data).reshape(-1).view(np.uint8)
        if data.size != nbytes:
            raise MemPoolError(
                f"tensor {req.name!r}: {data.size} bytes sent, {req.dtype}{req.shape} needs {nbytes}"
            )
        try:
            first = self.tensors.reserve(nbytes)
        except TensorStoreError as exc:
            raise MemPoolError(str(exc)) from None
        self.tensor_region.array[first * PAGE_BYTES : first * PAGE_BYTES + nbytes] = data
        self.tensors.commit(req.name, req.dtype, tuple(req.shape), nbytes, first)
        return mp.Ok(nbytes)

    async def _send_tensor(self, req: mp.SendTensor) -> mp.Transferred:
        e = self._tensor(req.name)
        if req.transport and req.transport not in self.tensor_transports:
            raise MemPoolError(f"transport {req.transport!r} is not enabled here")
        offered = [req.transport] if req.transport else list(self.tensor_transports)
        peer = self._peer(req.dst)
        start = time.perf_counter()
        deadline = start + req.timeout_s
        self.tensors_sending[e.name] += 1  # its pages must not be freed or reused meanwhile
        try:
            prep = await peer.call(
                mp.PrepareTensor(
                    req.dst_name or e.name,
                    e.dtype,
                    list(e.shape),
                    e.nbytes,
                    offered,
                    self.cfg.host_id,
                    req.timeout_s,
                ),
                timeout_s=req.timeout_s,
            )
            try:
                _, sender = self.tensor_transports[prep.transport]
                runs = [CopyRun(e.first_page, prep.dst_ids[0], e.num_pages)]
                crc = await sender.send(
                    prep.endpoint,
                    prep.transfer_id,
                    self.tensor_region,
                    runs,
                    timeout_s=max(0.01, deadline - time.perf_counter()),
                    checksum=req.checksum,
                )
                done = await peer.call(
                    mp.CommitReceive(prep.transfer_id, checksum=-1 if crc is None else crc),
                    timeout_s=max(0.01, deadline - time.perf_counter()),
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await peer.call(mp.AbortReceive(prep.transfer_id), timeout_s=1.0)
                raise
        except Exception as exc:
            self.transfers_failed += 1
            raise MemPoolError(
                f"sending tensor {req.name!r} to {req.dst} failed: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            self.tensors_sending[e.name] -= 1
            if not self.tensors_sending[e.name]:
                del self.tensors_sending[e.name]
        self.bytes_sent += done.nbytes
        return mp.Transferred(
            prep.dst_ids, done.nbytes, time.perf_counter() - start, prep.transport
        )

    def _prepare_tensor(self, req: mp.PrepareTensor) -> mp.Prepared:
        nbytes = _tensor_nbytes(req.dtype, req.shape)
        if nbytes != req.nbytes:
            raise MemPoolError(
                f"tensor {req.name!r}: {req.nbytes} bytes announced, {req.dtype}{req.shape} is {nbytes}"
            )
        name = self._choose_transport(req.transports, req.sender_host, self.tensor_transports)
        try:
            first = self.tensors.reserve(nbytes)
        except TensorStoreError as exc:
            raise MemPoolError(str(exc)) from None
        tid = next(self._transfer_ids)
        entry = TensorEntry(
            req.name, req.dtype, tuple(req.shape), nbytes, first, TensorStore.pages_for(nbytes)
        )
        receiver, _ = self.tensor_transports[name]
        receiver.expect(tid, [(first, entry.num_pages)])
        p = _Pending([first], True, name, time.monotonic() + req.timeout_s, tensor=entry)
        p.handle = asyncio.get_running_loop().call_later(
            req.timeout_s + _GRACE_S, self._expire, tid
        )
        self.pending[tid] = p
        return mp.Prepared(tid, [first], name, self.tensor_endpoints[name])

    # ----------------------------------------------------------------- events
    async def _publish_tree_events(self) -> None:
        tree_events = self.pool.drain_events()
        if tree_events:
            await self._publish([_wire_event(e) for e in tree_events])

    async def _publish(self, events: list[ev.KvEvent]) -> None:
        batch = ev.KvEventBatch(self.cfg.instance_id, next(self._seq), self.cfg.block_size, events)
        await self.events.publish(self.cfg.instance_id.encode(), batch)

    # ------------------------------------------------------------ introspection
    def _stats(self) -> mp.StatsReply:
        s = self.pool.stats()
        return mp.StatsReply(
            self.cfg.instance_id,
            s.capacity,
            s.free,
            s.client,
            s.index,
            s.pinned,
            s.match_calls,
            s.match_hits,
            s.matched_tokens,
            s.queried_tokens,
            s.evicted_blocks,
            s.demoted_blocks,
            s.promoted_blocks,
            self.bytes_sent,
            self.bytes_received,
            self.transfers_failed,
            len(self.pending),
        )

    def _info(self) -> mp.InfoReply:
        return mp.InfoReply(
            self.cfg.instance_id,
            self.cfg.block_size,
            self.block_bytes,
            self.device.kind,
            self.device.name,
            self.device.max_blocks,
            self.pool.alloc[Tier.DEVICE].capacity,
            self.pool.alloc[Tier.HOST].capacity,
            self.events.address,
            list(self.transports),
        )

    # ------------------------------------------------------------------ memory
    def _copy_blocks(self, src: Tier, src_ids: Any, dst: Tier, dst_ids: Any) -> None:
        src_region, dst_region = self._region(src), self._region(dst)
        for run in coalesce(list(src_ids), list(dst_ids)):
            copy_blocks(src_region, run.src_block, dst_region, run.dst_block, run.num_blocks)

    def _region(self, tier: Tier) -> Region:
        if tier == Tier.DEVICE:
            return self.device
        assert self.host is not None, "no host tier"
        return self.host


def _create_device_region(
    cfg: MempoolConfig, block_bytes: int, max_blocks: int, capacity: int
) -> ShmRegion | CudaRegion:
    """The device tier: a shared-memory segment on CPU, device memory shared by CUDA IPC
    on a GPU (`mempool.device = "cuda:N"`)."""
    if cfg.device == "cpu":
        return ShmRegion.create(block_bytes, max_blocks, capacity, prefault=cfg.prefault)
    from services.mempool.cuda_region import CudaRegion, cuda_available

    if not cuda_available():
        raise ValueError(
            f"mempool.device = {cfg.device!r}, but cupy sees no CUDA device here "
            "(install the `cuda` extra on a GPU machine, or use device = 'cpu')"
        )
    return CudaRegion.create(block_bytes, max_blocks, capacity, cfg.device)


def _tier(value: int) -> Tier:
    try:
        return Tier(value)
    except ValueError:
        raise MemPoolError(f"unknown tier {value} (0 = device, 1 = host)") from None


def _tensor_nbytes(dtype: str, shape: list[int]) -> int:
    if dtype not in DTYPE_BYTES:
        raise MemPoolError(
            f"unsupported tensor dtype {dtype!r}; supported: {', '.join(DTYPE_BYTES)}"
        )
    if any(d < 0 for d in shape):
        raise MemPoolError(f"negative dimension in shape {shape}")
    return int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype]


def _tokens(data: bytes) -> bytes:
    if len(data) % 4:
        raise MemPoolError(f"token bytes of length {len(data)} are not whole int32 tokens")
    return bytes(data)


def _wire_event(e: TreeEvent) -> ev.KvEvent:
    if e.stored:
        return ev.BlockStored(int(e.tier), e.parent_hash, e.hashes, e.token_bytes)
    return ev.BlockRemoved(int(e.tier), e.hashes)
