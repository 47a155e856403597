"""The MemPool daemon: an asyncio shell around `MemPool` that owns the sockets and memory.

    worker / peers / scheduler / admin ──RPC (ROUTER)──▶ handle() ──▶ a handler (table below)
                                                              │
    scheduler ◀──PUB kv_events── publish() ◀── tree events ───┘
    peer daemons ◀══ data plane (shm | tcp | ucx | ...) ══▶ our regions

The parts, one concept each:

    pool_requests.py     memory and index requests: one synchronous call into `MemPool`
    block_transfers.py   KV blocks to and from peers (send side; PrepareReceive, commit)
    tensor_transfers.py  named tensors: put / get / delete / list, to and from peers
    send_leg.py          the sender's prepare -> send -> commit/abort leg, shared by both
    incoming.py          the receiver's transfers in flight: commit, abort, expiry
    transfer_state.py    a transfer's states and the table of legal moves (both sides)
    data_plane.py        one region's transports (the KV device tier, the tensor region)
    memory.py            the regions: device tier, host tier, tensor region

Only this event loop touches the pool, so core calls never interleave.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from common.auth import check_admin_token
from common.errors import ErrorKind
from common.logging import get_logger
from common.metrics import MetricsServer, refresh_every, serve
from common.model.config import ModelConfig
from common.model.presets import resolve_model
from common.protocol import kv_events as ev
from common.protocol import mempool as mp
from common.protocol.admin import AdminReply, AdminRequest
from common.service import ServiceShell
from common.sockets import PubSocket, RpcServer
from services.mempool.block_transfers import BlockTransfers
from services.mempool.config import MempoolConfig
from services.mempool.data_plane import DataPlane
from services.mempool.incoming import IncomingTransfers
from services.mempool.memory import DaemonMemory
from services.mempool.metrics import MempoolMetrics
from services.mempool.pool import MemPool, MemPoolError
from services.mempool.pool_requests import PoolRequests, wire_event
from services.mempool.prompt_tree import Tier
from services.mempool.send_leg import Peers, TransferShared
from services.mempool.split_mode import SplitRequests
from services.mempool.tensor_store import TensorStore
from services.mempool.tensor_transfers import TensorTransfers
from services.mempool.transfer_state import TransferCounters

log = get_logger(__name__)

_MAX_TIMEOUT_S = 3600


class MempoolDaemon(ServiceShell):
    kind = "mempool"

    def __init__(self, cfg: MempoolConfig, block_bytes: int | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        self.block_bytes = block_bytes or cfg.geometry().block_bytes
        # With a budget it sizes the device tier: reserve what B could hold, start with
        # what fits beside the model's parameters (the worker's SetParams corrects them).
        budget = cfg.memory_budget(self.block_bytes, _expected_param_bytes(cfg))
        if budget is not None:
            device, max_blocks = budget.kv_capacity_blocks(), budget.max_blocks
        else:
            device = cfg.device_block_count(self.block_bytes)
            max_blocks = max(device, cfg.device_max_blocks or device)
        host = cfg.host_blocks or cfg.host_memory_bytes // self.block_bytes
        self.memory = DaemonMemory(cfg, self.block_bytes, max_blocks, device, host)
        self.device = self.memory.device
        self.pool = MemPool(
            cfg.block_size,
            device,
            host,
            device_max_blocks=max_blocks,
            copy_blocks=self.memory.copy_blocks,
            ttl_s=cfg.ttl_s,
        )
        try:  # a config that names no usable transport: give the memory back, then fail
            tcp = cfg.tcp_receiver_options()
            self.kv_plane = DataPlane(
                self.device, cfg.transports, cfg.data_host, cfg.host_id, tcp_options=tcp
            )
            self.tensor_plane = DataPlane(
                self.memory.tensor_region,
                cfg.transports,
                cfg.data_host,
                cfg.host_id,
                tcp_options=tcp,
            )
        except BaseException:
            self.memory.close()
            raise
        self.endpoints = self.kv_plane.endpoints
        self.tensor_endpoints = self.tensor_plane.endpoints
        self.server = RpcServer(
            cfg.control_address,
            mp.MempoolRequest,
            mp.MempoolReply,
            max_message_bytes=cfg.rpc_max_message_bytes(),
        )
        self.events = PubSocket(cfg.events_address, ev.KvEventBatch, bind=True)
        self.counters = TransferCounters()
        self.peers = Peers()
        self.incoming = IncomingTransfers(self.counters)
        self.pool_requests = PoolRequests(
            self.pool, self.device, prefault=cfg.prefault, budget=budget
        )
        self.split_mode = SplitRequests(self.pool_requests, cfg.geometry().num_layers)
        shared = TransferShared(self.peers, self.incoming, self.counters, cfg.host_id)
        self.blocks = BlockTransfers(self.pool, self.kv_plane, shared)
        self.tensors = TensorTransfers(
            TensorStore(self.memory.tensor_pages), self.tensor_plane, shared
        )
        self._handlers = self._handler_table()
        self._seq = itertools.count()
        self.started_at = time.time()
        self.metrics = MempoolMetrics()
        self.metrics_server: MetricsServer | None = None  # bound by start()
        self.incarnation = secrets.token_hex(8)  # tells a worker this process from an earlier one

    def _handler_table(self) -> dict[type, Callable[[Any], Any]]:
        """Every request type and its handler (a reply, or an awaitable of one)."""
        pool, blocks, tensors = self.pool_requests, self.blocks, self.tensors
        return {
            AdminRequest: self._admin,
            # memory and index
            mp.AllocMem: pool.alloc_mem,
            mp.FreeMem: pool.free_mem,
            mp.SwapOut: pool.swap_out,
            mp.SwapIn: pool.swap_in,
            mp.Insert: pool.insert,
            mp.Match: pool.match,
            mp.Release: pool.release,
            mp.Delete: pool.delete,
            mp.Evict: pool.evict,
            mp.Grow: pool.grow,
            mp.SetParams: pool.set_params,
            mp.Split: self.split_mode.split,
            mp.Merge: self.split_mode.merge,
            mp.Shrink: self.split_mode.shrink,
            mp.ReleaseOwner: pool.release_owner,
            mp.Chown: pool.chown,
            # KV between daemons: sending side, then receiving side
            mp.Transfer: blocks.transfer,
            mp.TransferWithInsert: blocks.transfer_with_insert,
            mp.PrepareReceive: blocks.prepare,
            mp.CommitReceive: self.incoming.commit,
            mp.AbortReceive: self._abort_receive,
            # named tensors
            mp.PutTensor: tensors.put,
            mp.GetTensor: tensors.get,
            mp.DeleteTensor: tensors.delete,
            mp.ListTensors: tensors.list,
            mp.SendTensor: tensors.send,
            mp.PrepareTensor: tensors.prepare,
            # introspection
            mp.Stats: self._stats,
            mp.CheckIntegrity: self._check_integrity,
            mp.Info: self._info,
            mp.IndexSnapshot: self._index_snapshot,
        }

    @property
    def address(self) -> str:
        return self.server.address

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> dict[str, str]:
        await self.kv_plane.start()
        await self.tensor_plane.start()
        await self._publish([ev.AllCleared()])
        self.tasks.spawn(self._housekeep())
        self.tasks.spawn(refresh_every(self._refresh_metrics))
        self.metrics_server = serve(self.metrics, self.cfg.metrics_address, self.cfg.data_host)
        log.info(
            "mempool ready",
            address=self.address,
            device_blocks=self.pool.alloc[Tier.DEVICE].capacity,
            block_bytes=self.block_bytes,
            budget_bytes=self.cfg.budget_bytes,
            param_bytes=self.pool_requests.param_bytes,
            transports=list(self.kv_plane.transports),
            incarnation=self.incarnation,
        )
        return {
            "rpc": self.address,
            "events": self.events.address,
            self.device.kind: self.device.name,
            **({"metrics": self.metrics_server.url} if self.metrics_server else {}),
        }

    def _refresh_metrics(self) -> None:
        self.metrics.refresh(self.pool.stats(), self.counters)

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """The RPC socket: serve() runs it until closed or told to `shutdown`."""
        return [self.server.serve(self.handle)]

    def close_sockets(self) -> None:
        self.server.close()
        self.events.close()
        self.peers.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    async def close(self) -> None:
        """Housekeeping stops, the sockets close, then the data planes and the memory."""
        await super().close()
        await self.kv_plane.close()
        await self.tensor_plane.close()
        self.memory.close()

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
        if timeout is not None and not 0 < timeout <= _MAX_TIMEOUT_S:
            raise MemPoolError(
                f"timeout_s must be in (0, {_MAX_TIMEOUT_S}] seconds, got {timeout}",
                kind=ErrorKind.BAD_REQUEST,
            )
        handler = self._handlers.get(type(req))
        if handler is None:
            raise MemPoolError(
                f"unsupported request {type(req).__name__}", kind=ErrorKind.BAD_REQUEST
            )
        reply = handler(req)
        return await reply if inspect.isawaitable(reply) else reply

    def _abort_receive(self, req: mp.AbortReceive) -> mp.Ok:
        self.incoming.abort(req.transfer_id)
        return mp.Ok()

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
                    "pending_transfers": len(self.incoming),
                    # The instance's memory split (KunServe): parameters + KV <= budget.
                    "budget_bytes": self.cfg.budget_bytes,
                    "param_bytes": self.pool_requests.param_bytes,
                    "kv_bytes": self.pool.alloc[Tier.DEVICE].capacity * self.device.block_bytes,
                    "split": self.pool.split_factor,
                    "block_bytes": self.device.block_bytes,
                },
            )
        if req.command == "shutdown":
            log.info("shutdown requested over the RPC socket")
            # After this reply is out: stopping now would cancel the reply itself.
            self.stop(after_s=0.05)
            return AdminReply(True, {"stopping": self.cfg.instance_id})
        return AdminReply(
            False, error=f"the daemon answers status and shutdown, not {req.command!r}"
        )

    # ----------------------------------------------------------------- events
    async def _publish_tree_events(self) -> None:
        tree_events = self.pool.drain_events()
        if tree_events:
            await self._publish([wire_event(e) for e in tree_events])

    async def _publish(self, events: list[ev.KvEvent]) -> None:
        await self._send_batch(self._batch(events))

    def _batch(self, events: list[ev.KvEvent]) -> ev.KvEventBatch:
        """The next batch: numbered here, so the seq order is the order of the calls."""
        return ev.KvEventBatch(
            self.cfg.instance_id, next(self._seq), self.cfg.block_size, events, self.events.address
        )

    async def _send_batch(self, batch: ev.KvEventBatch) -> None:
        await self.events.publish(self.cfg.instance_id.encode(), batch)

    async def _index_snapshot(self, req: mp.IndexSnapshot) -> mp.IndexSnapshotReply:
        """The index as of a batch numbered now: the changes not yet published go in that
        batch (empty if none), and nothing awaits between numbering it and reading the
        tree, so the snapshot is exactly the state after the batches up to its seq."""
        batch = self._batch([wire_event(e) for e in self.pool.drain_events()])
        cap = min(max(0, req.max_blocks), mp.SNAPSHOT_MAX_BLOCKS)
        runs, truncated = self.pool.tree.snapshot(cap)
        reply = mp.IndexSnapshotReply(
            self.cfg.instance_id,
            batch.seq,
            self.cfg.block_size,
            [mp.IndexRun(int(tier), hashes) for tier, hashes in runs],
            truncated,
            self.events.address,
        )
        await self._send_batch(batch)  # also the subscriber's sign its subscription is live
        return reply

    # ------------------------------------------------------------ introspection
    def _stats(self, req: mp.Stats) -> mp.StatsReply:
        s = self.pool.stats()
        return mp.StatsReply(
            instance_id=self.cfg.instance_id,
            capacity=s.capacity,
            free=s.free,
            client=s.client,
            index=s.index,
            pinned=s.pinned,
            match_calls=s.match_calls,
            match_hits=s.match_hits,
            matched_tokens=s.matched_tokens,
            queried_tokens=s.queried_tokens,
            evicted_blocks=s.evicted_blocks,
            demoted_blocks=s.demoted_blocks,
            promoted_blocks=s.promoted_blocks,
            bytes_sent=self.counters.bytes_sent,
            bytes_received=self.counters.bytes_received,
            transfers_failed=self.counters.transfers_failed,
            pending_transfers=len(self.incoming),
            incarnation=self.incarnation,
            budget_bytes=self.cfg.budget_bytes,
            param_bytes=self.pool_requests.param_bytes,
            split=self.pool.split_factor,
            block_bytes=self.device.block_bytes,
        )

    def _check_integrity(self, req: mp.CheckIntegrity) -> mp.IntegrityReply:
        try:
            self.pool.check_integrity()
            self.tensors.check_integrity()
        except AssertionError as exc:
            return mp.IntegrityReply(ok=False, message=str(exc))
        if why := self.split_mode.check():
            return mp.IntegrityReply(ok=False, message=why)
        if why := self.pool_requests.check_budget():
            return mp.IntegrityReply(ok=False, message=why)
        return mp.IntegrityReply(ok=True)

    def _info(self, req: mp.Info) -> mp.InfoReply:
        return mp.InfoReply(
            instance_id=self.cfg.instance_id,
            block_size=self.cfg.block_size,
            block_bytes=self.device.block_bytes,
            device_kind=self.device.kind,
            device_name=self.device.name,
            device_max_blocks=self.device.max_blocks,
            device_blocks=self.pool.alloc[Tier.DEVICE].capacity,
            host_blocks=self.pool.alloc[Tier.HOST].capacity,
            events=self.events.address,
            transports=list(self.kv_plane.transports),
            incarnation=self.incarnation,
            budget_bytes=self.cfg.budget_bytes,
            param_bytes=self.pool_requests.param_bytes,
            split=self.pool.split_factor,
        )


def _expected_param_bytes(cfg: MempoolConfig) -> int:
    """The whole model's parameter bytes from its config.json (only read with a budget)."""
    if not cfg.budget_bytes:
        return 0
    return ModelConfig.from_folder(resolve_model(cfg.model)).param_bytes(cfg.dtype)
