"""The scheduler service: an asyncio shell around the pure `GlobalScheduler` core.

    workers ──Heartbeat (PUSH)──▶ PULL ──▶ core.on_heartbeat ──▶ PUB InstanceUp / Down ──▶ gateways
    gateways ──Place / Release / GatewayAlive (RPC)──▶ core.place / release / on_gateway_alive
    every instance's daemon ──KvEventBatch (PUB)──▶ one SUB for all (kv_feed.py) ──▶ core.on_kv_events
    a new member's daemon ◀──IndexSnapshot (RPC)── after subscribing ──▶ core.on_snapshot
    ticker ──▶ core.tick (silent instances dropped ──▶ InstanceDown, ReleaseOwner at its daemon)
    memserve admin ──AdminRequest (RPC)──▶ token check ──▶ core.admin, or cache-stats /
                                           flush-cache / shutdown, which talk to other processes
    memserve admin elastic drop / restore ──▶ elastic_control.py ──Prepare/Commit/Restore──▶
                                           workers' control sockets; Break to the survivors of
                                           a group a member's death broke (after heartbeats, ticks)
    every elastic_poll_s ──▶ core.controller.poll (votes, groups) ──▶ a decision, while on ──▶
                                           the same drop / restore (elastic_control.decide)

The shell's members follow the registry: after every heartbeat and tick, each registered
incarnation has exactly one member, and the one KV-event SUB socket follows exactly the
members' events addresses; a member whose instance left the registry (silence) is
unfollowed and its daemon told to `ReleaseOwner`. A restart only replaces the member (the
new worker frees its own leftovers), following its new events address if it moved. A
batch goes to the members whose events address it names (a worker and its daemon may be
named apart); a batch naming an address no member has is dropped.
A new member (a first registration in this scheduler's life: after a scheduler restart,
every instance) is subscribed first, then its daemon's `IndexSnapshot` is fetched while
its batches are buffered, then the batches after the snapshot replay (global_tree.py), so
a restarted scheduler knows what was cached before it started. A gap in a member's batches
fetches a snapshot again; a snapshot whose own batch does not arrive within SNAPSHOT_CONFIRM_S
(the subscription was not live yet) is fetched again, at most SNAPSHOT_RETRIES times. A
daemon that does not answer snapshots leaves the member on events alone, as before.
A heartbeat claiming a live instance's id for another process, or moving a live
incarnation's addresses, is refused (registry.py) with a throttled warning.
At most `max_instances` are registered (a heartbeat beyond is refused, with a warning at
most every REFUSAL_LOG_S), so the scheduler's state and connections stay bounded.
Calls to other processes are best effort with short timeouts (remote.py): a dead daemon
or worker costs a log line or an error entry, never the scheduler's loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from common.codec import DecodeError
from common.logging import Throttled, get_logger
from common.mempool_client import MempoolClient
from common.metrics import refresh_every, serve
from common.net import advertise
from common.protocol import kv_events as ev
from common.protocol import scheduler as sp
from common.protocol.admin import AdminReply, AdminRequest
from common.protocol.mempool import IndexSnapshotReply
from common.service import ServiceShell
from common.sockets import PubSocket, PullSocket, RpcServer
from services.scheduler import remote
from services.scheduler.config import SchedulerConfig
from services.scheduler.core import ELASTIC_SERVICE, GlobalScheduler
from services.scheduler.elastic_control import ElasticControl
from services.scheduler.kv_feed import KvEventFeed
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.migrate_control import MigrateControl
from services.scheduler.registry import ClaimRefusedError, RegistryFullError

log = get_logger(__name__)

# How long a call to another process may take before it is given up (best effort).
CALL_TIMEOUT_S = 2.0
# Refused heartbeats (registry full) are counted, and logged at most this often.
REFUSAL_LOG_S = 10.0
# A loaded snapshot whose own KV-event batch has not arrived after this long is fetched
# again, at most SNAPSHOT_RETRIES times per incarnation.
SNAPSHOT_CONFIRM_S = 1.0
SNAPSHOT_RETRIES = 5
# Snapshot calls in flight at once (each holds a socket): a restarted scheduler meeting
# hundreds of instances, or a flood of made-up ones, holds a bounded number of them.
MAX_SNAPSHOT_CALLS = 16


@dataclass
class _Member:
    """What the shell keeps of one registered incarnation: the events address the feed
    follows for it ("" when it names none, or the connect failed) and its daemon."""

    epoch: int
    mempool: str
    events: str = ""
    warned: bool = False  # "named apart" said once
    fetching: bool = False  # an IndexSnapshot call in flight
    snapshot_retries: int = 0


class SchedulerService(ServiceShell):
    kind = "scheduler"

    def __init__(
        self,
        cfg: SchedulerConfig,
        clock: Callable[[], float] = time.monotonic,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.clock = clock  # monotonic seconds; tests drive expiry with a fake one
        self.call_timeout_s = call_timeout_s
        self.core = GlobalScheduler(cfg)
        self.elastic = ElasticControl(
            self.core,
            cfg.admin_token,
            clock,
            cfg.elastic_prepare_timeout_s,
            cfg.elastic_timeout_s,
            restore_live=cfg.elastic_restore_live,
        )
        self.migrate = MigrateControl(self.core, cfg.admin_token, cfg.elastic_timeout_s)
        self.elastic.migrator = self.migrate.migrate
        self.started_at = time.time()
        self.members: dict[str, _Member] = {}
        self._by_events: dict[str, set[str]] = {}  # events address -> member ids
        self._refused = 0  # heartbeats refused since the last warning
        self._refusal_logged_at: float | None = None
        self._claims_log = Throttled(log)  # a live id claimed by another process
        self._snapshot_calls = asyncio.Semaphore(MAX_SNAPSHOT_CALLS)
        opened: list[Any] = []
        try:
            self.kv = KvEventFeed()
            opened.append(self.kv)
            self.rpc = RpcServer(cfg.address, sp.SchedulerRequest, sp.SchedulerReply)
            opened.append(self.rpc)
            self.heartbeats = PullSocket(cfg.heartbeat_address, sp.Heartbeat, bind=True)
            opened.append(self.heartbeats)
            self.events = PubSocket(cfg.events_address, sp.InstanceEvent, bind=True)
            opened.append(self.events)
            self.admin: RpcServer[AdminRequest, AdminReply] | None = None
            if cfg.admin_address:
                self.admin = RpcServer(cfg.admin_address, AdminRequest, AdminReply)
                opened.append(self.admin)
            self.metrics = SchedulerMetrics()
            self.metrics_server = serve(self.metrics, cfg.metrics_address)
        except BaseException:
            for sock in opened:
                sock.close()
            raise

    # ------------------------------------------------------------ endpoints
    @property
    def address(self) -> str:
        return advertise(self.rpc.address)

    @property
    def heartbeat_address(self) -> str:
        return advertise(self.heartbeats.address)

    @property
    def events_address(self) -> str:
        return advertise(self.events.address)

    @property
    def admin_address(self) -> str:
        return self.admin.address if self.admin is not None else ""

    def endpoints(self) -> dict[str, str]:
        out = {
            "rpc": self.address,
            "heartbeats": self.heartbeat_address,
            "events": self.events_address,
        }
        if self.admin is not None:
            out["admin"] = self.admin_address
        if self.metrics_server is not None:
            out["metrics"] = self.metrics_server.url
        return out

    # ------------------------------------------------------------- serving
    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """Served until closed or told to `shutdown` over the admin socket."""
        loops = [
            self.rpc.serve(self._handle),
            self._recv_heartbeats(),
            self._tick(),
            self._recv_kv_events(),
            self._elastic_controller(),
            refresh_every(lambda: self.metrics.refresh(self.core)),
        ]
        if self.admin is not None:
            loops.append(self.admin.serve(self._admin))
        return loops

    async def closing(self) -> None:
        """Stop following the instances' KV events."""
        for iid in list(self.members):
            self._unfollow(iid)
        self.members.clear()

    def close_sockets(self) -> None:
        self.kv.close()
        self.rpc.close()
        self.heartbeats.close()
        self.events.close()
        if self.admin is not None:
            self.admin.close()
        if self.metrics_server is not None:
            self.metrics_server.close()

    async def _handle(self, req: sp.SchedulerRequest) -> sp.SchedulerReply:
        match req:
            case sp.Place():
                placement = self.core.place(req, self.clock())
                self._count(placement)
                return placement
            case sp.Release():
                return self.core.release(req)
            case sp.GatewayAlive():
                return self.core.on_gateway_alive(req, self.clock())
        raise TypeError(f"unsupported request {type(req).__name__}")

    def _count(self, p: sp.Placement) -> None:
        first = self.core.registry.get(p.instance_id)
        decode = self.core.registry.get(p.handoff.instance_id) if p.handoff else None
        self.metrics.placed(p, first.role if first else "unknown", decode.role if decode else None)

    async def _recv_heartbeats(self) -> None:
        while True:
            try:
                hb = await self.heartbeats.recv()
            except DecodeError as exc:
                log.warning("malformed heartbeat dropped", error=str(exc))
                continue
            try:
                events = self.core.on_heartbeat(hb, self.clock())
            except RegistryFullError as exc:
                self._refuse(str(exc))
                continue
            except ClaimRefusedError as exc:
                # Keyed by the reason (a fixed set), never by the claimed id.
                self._claims_log.warning(
                    exc.reason, "heartbeat refused", instance=hb.instance_id, error=str(exc)
                )
                continue
            except ValueError as exc:
                log.warning("heartbeat refused", error=str(exc))
                continue
            await self._publish(events)
            self._send_breaks()
            self._sync_members()
            if any(isinstance(e, sp.InstanceUp) for e in events):
                # Registered, or healthy again (a new daemon, whose first batches the SUB
                # socket likely missed): its tree comes from a snapshot (a no-op if one is
                # in flight already).
                self._fetch_snapshot(hb.instance_id)

    def _refuse(self, error: str) -> None:
        """Count a refused heartbeat; warn at most every REFUSAL_LOG_S (a flood of them
        must not become a flood of log lines)."""
        self._refused += 1
        now = time.monotonic()
        if self._refusal_logged_at is None or now - self._refusal_logged_at >= REFUSAL_LOG_S:
            log.warning(
                "heartbeats refused: registry full",
                refused=self._refused,
                max_instances=self.cfg.max_instances,
                error=error,
            )
            self._refused = 0
            self._refusal_logged_at = now

    async def _tick(self) -> None:
        interval = self.cfg.heartbeat_timeout_s / 4
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            await self._publish(self.core.tick(now))
            self._send_breaks()
            self._sync_members()
            self._refetch_unconfirmed(now)

    async def _elastic_controller(self) -> None:
        """Every `elastic_poll_s`: count the votes and check the groups (controller.py);
        while the controller is on, run its decision. Skipped while a drop or restore (a
        commanded one too) holds the lock: the monitor sees its outcome afterwards."""
        while True:
            await asyncio.sleep(self.cfg.elastic_poll_s)
            if self.elastic.lock.locked():
                continue
            decision = self.core.controller.poll(self.clock())
            if decision is None:
                continue
            try:
                await self.elastic.decide(decision)
            except Exception as exc:  # the loop outlives any one decision
                log.exception("elastic controller: decision failed", error=str(exc))
            self._send_breaks()

    async def _publish(self, events: list[sp.InstanceEvent]) -> None:
        for event in events:
            log.info("instance event", kind=type(event).__name__, **_fields(event))
            await self.events.publish(sp.INSTANCE_TOPIC, event)

    def _send_breaks(self) -> None:
        if self.core.elastic.breaks:
            self.tasks.spawn(self.elastic.send_breaks())

    # -------------------------------------------------------- KV events
    def _sync_members(self) -> None:
        """Follow the registry: one `_Member` per registered incarnation, and the feed
        connected to exactly the members' events addresses."""
        registered = {i.instance_id: i for i in self.core.registry.instances()}
        for iid in [i for i in self.members if i not in registered]:
            gone = self._unfollow(iid)
            # Dropped for silence: whatever the dead worker held at its daemon is freed.
            if gone.mempool:
                self.tasks.spawn(remote.release_owner(gone.mempool, iid, self.call_timeout_s))
        for iid, inst in registered.items():
            member = self.members.get(iid)
            if member is not None and member.epoch == inst.epoch:
                continue
            if member is not None:  # restarted: its events address may have moved
                self._unfollow(iid)
            member = self.members[iid] = _Member(inst.epoch, inst.mempool)
            if not inst.events:
                continue
            try:
                self.kv.follow(inst.events)
            except OSError as exc:
                log.warning("cannot subscribe to KV events", instance=iid, error=str(exc))
                continue
            member.events = inst.events
            self._by_events.setdefault(inst.events, set()).add(iid)
            self._fetch_snapshot(iid)  # subscribed first: nothing after the snapshot is lost

    def _unfollow(self, iid: str) -> _Member:
        member = self.members.pop(iid)
        if member.events:
            self.kv.unfollow(member.events)
            ids = self._by_events[member.events]
            ids.discard(iid)
            if not ids:
                del self._by_events[member.events]
        return member

    def _fetch_snapshot(self, iid: str) -> None:
        """Fetch `iid`'s index snapshot unless one is in flight; its batches wait for it."""
        member = self.members.get(iid)
        if member is None or member.fetching or not member.mempool or not member.events:
            return  # (no events followed: a snapshot would never be kept up to date)
        if not self.core.begin_sync(iid):
            return
        member.fetching = True
        self.tasks.spawn(self._load_snapshot(iid, member))

    async def _load_snapshot(self, iid: str, member: _Member) -> None:
        snap: IndexSnapshotReply | None = None
        error = ""
        client: MempoolClient | None = None
        try:
            async with self._snapshot_calls:
                if self.members.get(iid) is member:  # not dropped while it waited its turn
                    client = MempoolClient(member.mempool, timeout_s=self.call_timeout_s)
                    snap = await client.index_snapshot()
        except Exception as exc:  # best effort: a dead, unreachable or older daemon
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if client is not None:
                client.close()
            member.fetching = False
        if self.members.get(iid) is not member:
            return  # dropped or restarted meanwhile: the snapshot describes nobody we know
        now = self.clock()
        if snap is None:
            log.warning("no index snapshot: following KV events alone", instance=iid, error=error)
            self.core.on_snapshot_failed(iid, now)
        else:
            blocks = sum(len(r.block_hashes) for r in snap.runs)
            log.info(
                "index snapshot loaded",
                instance=iid,
                seq=snap.seq,
                blocks=blocks,
                truncated=snap.truncated,
            )
            self.core.on_snapshot(iid, snap, now)
        self._fetch_wanted()

    def _fetch_wanted(self) -> None:
        wanted, self.core.want_snapshot = self.core.want_snapshot, set()
        for iid in sorted(wanted):
            self._fetch_snapshot(iid)

    def _refetch_unconfirmed(self, now: float) -> None:
        for iid in self.core.unconfirmed_snapshots(now, SNAPSHOT_CONFIRM_S):
            member = self.members.get(iid)
            if member is None or member.fetching or member.snapshot_retries >= SNAPSHOT_RETRIES:
                continue
            member.snapshot_retries += 1
            self._fetch_snapshot(iid)

    def _attribute(self, batch: ev.KvEventBatch) -> list[str]:
        """The members a batch belongs to: those following the address it names; for a
        batch naming none (an older daemon), the member of its own id, if it follows any."""
        if batch.events_address:
            return sorted(self._by_events.get(batch.events_address, ()))
        member = self.members.get(batch.instance_id)
        return [batch.instance_id] if member is not None and member.events else []

    async def _recv_kv_events(self) -> None:
        while True:
            try:
                _, batch = await self.kv.recv()
            except DecodeError as exc:
                log.warning("malformed KV event batch dropped", error=str(exc))
                continue
            now = self.clock()
            for iid in self._attribute(batch):
                member = self.members[iid]
                if batch.instance_id != iid and not member.warned:
                    member.warned = True
                    log.info(
                        "daemon named apart from its worker", instance=iid, daemon=batch.instance_id
                    )
                self.core.on_kv_events(iid, batch, now)
            self._fetch_wanted()

    # ------------------------------------------------------------- admin
    async def _admin(self, req: AdminRequest) -> AdminReply:
        if not self.core.authorize(req.token):
            return AdminReply(False, error="bad admin token")
        now = self.clock()
        match req.command:
            case "status":
                reply = self.core.admin("status", req.args, now)
                if reply.ok:
                    reply.result.update(
                        pid=os.getpid(),
                        uptime_s=round(time.time() - self.started_at, 3),
                        endpoints=self.endpoints(),
                        subscriptions=sorted(i for i, m in self.members.items() if m.events),
                        kv_connections=self.kv.connections,
                    )
                return reply
            case "cache-stats":
                return AdminReply(
                    True, await remote.cache_stats(self._daemons(), self.call_timeout_s)
                )
            case "flush-cache":
                return AdminReply(
                    True, await remote.flush_cache(self._daemons(), self.call_timeout_s)
                )
            case "shutdown":
                return await self._shutdown(req.token)
            case "elastic" if req.args and req.args[0] in ELASTIC_SERVICE:
                return await self.elastic.command(req.args)
            case "migrate":
                return await self.migrate.command(req.args)
        return self.core.admin(req.command, req.args, now)

    def _daemons(self) -> dict[str, str]:
        return {i.instance_id: i.mempool for i in self.core.registry.instances() if i.mempool}

    async def _shutdown(self, token: str) -> AdminReply:
        log.info("cluster shutdown requested over the admin socket")
        await self.events.publish(sp.INSTANCE_TOPIC, sp.ClusterShutdown())
        controls = {i.instance_id: i.control for i in self.core.registry.instances() if i.control}
        workers = await remote.stop_workers(controls, token, self.call_timeout_s)
        # Stop once this reply is out: stopping now would cancel the reply itself.
        self.stop(after_s=0.05)
        return AdminReply(True, {"stopping": self.cfg.instance_id, "workers": workers})


def _fields(event: sp.InstanceEvent) -> dict[str, Any]:
    return {f: getattr(event, f) for f in event.__struct_fields__}
