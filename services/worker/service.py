"""The worker service: an asyncio shell around a `MempoolEngine` on its MemPool daemon's
memory.

    gateway ──Generate/Abort (PUSH)──▶ PULL ──▶ MempoolEngine ──TokenChunk (PUSH)──▶ reply_to
    prefill worker ──Continue (PUSH)──▶ PULL            (P/D: the decode side of a request)
    heartbeats (load, health) ──PUSH──▶ scheduler;  control RPC ◀── memserve admin

A request's KV plan comes with it (common/protocol/worker.py): colocated, prefill (compute
the prompt and the first token, hand the KV to the decode instance, send it `Continue`)
or decode (go on from the KV that arrived). The role in the config is what the worker
advertises to the scheduler; any worker serves any plan it is sent.

The hand-off belongs to the engine's `KVConnector` (services/worker/kv_connector.py): a
prefill's final output returns its `KvTransfer`, the connector `send`s it (the prompt's
KV stays pinned, or owned, on the prefill side until the transfer has ended, either way),
and this shell only wraps what arrived in a `Continue`, with the request's generator
state, so sampling goes on where it stopped. A `Continue` is always sent, with no KV when
the transfer failed (the decode side recomputes); a decode worker that has already seen
an `Abort` for a request frees the KV of its late `Continue` instead of running it.

The daemon: every heartbeat first checks it (`Stats`), and `DaemonLink`
(services/worker/daemon_link.py) says what its answers mean. A daemon that stops
answering makes the worker unhealthy and fails what is in flight; a daemon that answers as
another incarnation (restarted, by `memserve up` or by hand, on the same address) makes the
worker abandon its engine (requests failed, leases and mapping dropped) and attach to the
new one with the same model, retrying with a backoff, then report healthy again: the
worker itself is never restarted for its daemon's sake.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

import msgspec

from common.auth import check_admin_token
from common.codec import DecodeError
from common.errors import MemServeError
from common.logging import get_logger
from common.mempool_client import MempoolClient
from common.metrics import check_address, refresh_every, serve
from common.modes import ROLES
from common.net import advertise
from common.protocol import elastic as el
from common.protocol import migrate as mg
from common.protocol import scheduler as sp
from common.protocol import worker as wp
from common.protocol.admin import AdminReply, AdminRequest
from common.service import ServiceShell
from common.sockets import PullSocket, PushSocket, RpcServer
from services.worker.async_engine import StreamOutput
from services.worker.config import EngineConfig
from services.worker.daemon_link import DaemonLink, LinkAction, LinkState
from services.worker.elastic import ElasticMember
from services.worker.kv_connector import KvPlan, KvPrefix, KvTransfer
from services.worker.load import KvLoad
from services.worker.mempool_engine import MempoolEngine
from services.worker.metrics import WorkerMetrics
from services.worker.migration import Migration

log = get_logger(__name__)

# How long an Abort is remembered for a Continue that may still be on its way.
_ABORT_MEMORY_S = 120.0
# Reply and hand-off peers a worker keeps sockets for (gateways and decode workers).
MAX_PEERS = 64
# How long a follower waits to hand a request to its leader before failing it.
_FORWARD_TIMEOUT_S = 5.0
# Missed daemon health checks in a row before the worker reports itself unhealthy.
_DAEMON_STRIKES = 3


class WorkerConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    instance_id: str = "worker-0"
    role: str = "colocated"  # what the scheduler places here: colocated | prefill | decode
    address: str = "tcp://127.0.0.1:0"  # where requests arrive (PULL, bound)
    advertise_host: str = ""  # the host others connect to when `address` binds 0.0.0.0
    mempool: str = "tcp://127.0.0.1:5601"  # the instance's MemPool daemon (RPC)
    caching: bool = True  # False: never match or insert, whatever the request asks
    scheduler: str = ""  # the scheduler's heartbeat PULL; "" = standalone (no heartbeats)
    heartbeat_interval_s: float = 0.5
    control_address: str = "tcp://127.0.0.1:0"
    # Prometheus /metrics over HTTP (common/metrics.py): host:port, "" = off (loopback by
    # default; elsewhere it exposes counts only).
    metrics_address: str = "127.0.0.1:0"
    admin_token: str = ""
    transfer_timeout_s: float = 10.0
    # KunServe groups: where this worker receives hidden states (bound while it is in a
    # group), and how long the leader waits for a batch to come round the ring.
    stage_address: str = "tcp://127.0.0.1:0"
    stage_timeout_s: float = 10.0
    log_level: str = "info"
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)

    def validate(self) -> WorkerConfig:
        if self.role not in ROLES:
            raise ValueError(f"worker.role must be one of {'|'.join(ROLES)}, got {self.role!r}")
        if not 0 < self.heartbeat_interval_s <= 60:
            raise ValueError(
                f"worker.heartbeat_interval_s must be in (0, 60], got {self.heartbeat_interval_s}"
            )
        if not 0 < self.stage_timeout_s <= 3600:
            raise ValueError(
                f"worker.stage_timeout_s must be in (0, 3600], got {self.stage_timeout_s}"
            )
        if not 0 < self.transfer_timeout_s <= 3600:
            raise ValueError(
                f"worker.transfer_timeout_s must be in (0, 3600], got {self.transfer_timeout_s}"
            )
        check_address("worker.metrics_address", self.metrics_address)
        self.engine.validate()
        return self


class WorkerService(ServiceShell):
    kind = "worker"

    def __init__(self, cfg: WorkerConfig, engine: MempoolEngine, events: str = ""):
        super().__init__()
        self.cfg = cfg
        self.engine = engine
        self.events = events  # the daemon's KV-event PUB, for the scheduler
        self.requests = PullSocket(cfg.address, wp.WorkerRequest, bind=True)
        self.control: RpcServer[Any, Any] = RpcServer(
            cfg.control_address,
            AdminRequest | el.ElasticRequest | mg.MigrateRequest,
            AdminReply | el.ElasticReply | mg.MigrateReply,
        )
        self.heartbeats: PushSocket[sp.Heartbeat] | None = None
        if cfg.scheduler:
            self.heartbeats = PushSocket(cfg.scheduler, sp.Heartbeat, bind=False)
        # reply_to and decode workers, by address, least recently used first: at most
        # MAX_PEERS sockets (each holds a file descriptor and a reconnecting connection).
        self.peers: OrderedDict[str, PushSocket[Any]] = OrderedDict()
        self.aborted: dict[str, float] = {}
        self.started_at = time.time()
        self.incarnation = os.urandom(8).hex()  # this process: the scheduler refuses others
        self.link = DaemonLink(engine.incarnation, strikes=_DAEMON_STRIKES)
        engine.on_fenced = self._engine_fenced
        # Daemon checks go through a client of their own: the engine's closes itself when
        # its connection drops (MempoolEngine._watch_connection).
        self.probe = MempoolClient(cfg.mempool)
        self.device_blocks = (0, 0)  # (used, total) at the daemon's last answer
        # Fixed by the model and block size, which a re-attach checks are unchanged.
        self.block_size = engine.block_size
        self.block_bytes = engine.engine.cache.layout.bytes_per_block
        self.served = 0
        self.failed = 0
        # Where each live request streams to: a request leaving for a group's leader (or
        # coming home from one) takes its reply address along.
        self.routes: dict[str, str] = {}
        self.elastic = ElasticMember(self)
        self.migration = Migration(self)
        # For the elastic drop planner (heartbeats): one full copy, at attach.
        self.num_layers = engine.engine.model_config.num_layers
        self.full_param_bytes = int(engine.engine.model.param_bytes())
        self.budget_bytes = 0  # the daemon's (`create` reads it)
        self.metrics = WorkerMetrics(cfg.instance_id, cfg.role, cfg.engine.model)
        self.metrics_server = serve(self.metrics, cfg.metrics_address, cfg.advertise_host)

    @classmethod
    async def create(cls, cfg: WorkerConfig) -> WorkerService:
        engine = await _attach(cfg)
        info = await engine.client.info()
        svc = cls(cfg, engine, info.events)
        svc.budget_bytes = info.budget_bytes
        return svc

    @property
    def healthy(self) -> bool:
        return self.link.healthy

    @property
    def address(self) -> str:
        return advertise(self.requests.address, self.cfg.advertise_host)

    @property
    def control_address(self) -> str:
        return self.control.address

    @property
    def endpoints(self) -> dict[str, str]:
        out = {
            "requests": self.address,
            "control": self.control_address,
            "mempool": self.cfg.mempool,
        }
        if self.metrics_server is not None:
            out["metrics"] = self.metrics_server.url
        return out

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """Requests and hand-offs, the control socket, and the daemon check with heartbeats
        (sent with a scheduler); serve() runs them until closed or an admin `shutdown`."""
        return [
            self._serve_requests(),
            self.control.serve(self._control),
            self._beat(),
            refresh_every(self._refresh_metrics),
        ]

    def _refresh_metrics(self) -> None:
        preempted = (self._preemption().get("preemptions", 0), self.engine.incarnation)
        ex = self.elastic.exchanger
        self.metrics.refresh(
            self._load(),
            self.device_blocks,
            preempted,
            self.healthy,
            self.elastic.state,
            ex.stats if ex is not None else None,
        )

    async def _serve_requests(self) -> None:
        while True:
            try:
                msg = await self.requests.recv()
            except DecodeError as exc:
                log.warning("malformed worker request dropped", error=str(exc))
                continue
            forward = self.elastic.forward_to
            if isinstance(msg, wp.Abort):  # also to where a restore sent the request
                forward = self.elastic.abort_to(msg.request_id)
            if forward and isinstance(msg, wp.Generate | wp.Abort):
                # A follower serves no request of its own: its leader serves the group's.
                # In a task of its own: a leader that stopped reading (dead, its queue
                # full) must not stall this loop.
                self._spawn(self._forward(forward, msg))
                continue
            match msg:
                case wp.Generate():
                    self._spawn(self._generate(msg))
                case wp.Continue():
                    self._spawn(self._continue(msg))
                case wp.Abort(request_id=rid):
                    self._remember_abort(rid)
                    self.engine.abort(rid)

    async def _forward(self, address: str, msg: wp.Generate | wp.Abort) -> None:
        try:
            await asyncio.wait_for(self._peer(address).send(msg), _FORWARD_TIMEOUT_S)
        except TimeoutError:
            log.warning("could not forward to the leader", request_id=msg.request_id)
            if isinstance(msg, wp.Generate):
                err = MemServeError(f"the group's leader at {address} did not take the request")
                await self._fail(self._peer(msg.reply_to), msg.request_id, err, 0)

    def _spawn(self, coro: Any) -> None:
        self.tasks.spawn(coro)

    def _remember_abort(self, rid: str) -> None:
        now = time.monotonic()
        self.aborted[rid] = now
        if len(self.aborted) > 1024:
            self.aborted = {r: t for r, t in self.aborted.items() if now - t < _ABORT_MEMORY_S}

    # ------------------------------------------------------------------ requests
    async def _refuse_unattached(self, rid: str, reply_to: str) -> bool:
        """Fail a request at once while no daemon is attached (there is no engine to run
        it on); True if it was failed."""
        if self.link.state is LinkState.ATTACHED:
            return False
        why = f"its MemPool daemon is {self.link.state.value}"
        await self._fail(self._peer(reply_to), rid, MemServeError(why), 0)
        return True

    async def _generate(self, req: wp.Generate) -> None:
        if await self._refuse_unattached(req.request_id, req.reply_to):
            return
        handoff = req.handoff
        if handoff is not None and (
            req.params.max_tokens <= 1 or len(req.token_ids) + 1 >= self.engine.engine.max_model_len
        ):
            handoff = None  # nothing left for a decode side to do
        plan = KvPlan(cache=req.cache and self.cfg.caching, fetch=req.fetch, handoff=handoff)
        params = req.params
        if handoff is not None:
            params = msgspec.structs.replace(params, max_tokens=1)
        out = self._peer(req.reply_to)
        offset = 0
        self.routes[req.request_id] = req.reply_to
        counted = False
        try:
            async for chunk in self.engine.generate(req.token_ids, params, req.request_id, plan):
                if not counted and chunk.num_prompt_tokens:  # the first output: admitted
                    counted = True
                    self.metrics.prefix(chunk.num_prompt_tokens, chunk.num_cached_tokens)
                if chunk.moved:  # it goes on in a group (or back home): not ours to end
                    return
                if chunk.kv_transfer is not None:  # prefill done: the rest is decode's
                    await out.send(
                        wp.TokenChunk(
                            request_id=req.request_id,
                            token_ids=chunk.token_ids,
                            num_prompt_tokens=chunk.num_prompt_tokens,
                            num_cached_tokens=chunk.num_cached_tokens,
                            offset=0,
                            instance_id=self.cfg.instance_id,
                        )
                    )
                    await self._hand_off(req, chunk, chunk.kv_transfer)
                    return
                await out.send(self._chunk(req.request_id, chunk, offset))
                offset += len(chunk.token_ids)
            self.served += 1
        except Exception as exc:  # the stream must end with a final chunk, whatever broke
            await self._fail(out, req.request_id, exc, offset)
        finally:
            self.routes.pop(req.request_id, None)

    async def _hand_off(self, req: wp.Generate, first: StreamOutput, kv: KvTransfer) -> None:
        """Move the prompt's KV to the decode instance (the connector owns it until then),
        then send it `Continue` with what arrived and where the request's generator stands."""
        connector = self.engine.connector
        if req.request_id in self.aborted:
            await connector.finished_sending(kv)
            arrived = KvPrefix()
        else:
            arrived = await connector.send(kv)
        to = kv.to
        decode = self._peer(to.address)
        if req.request_id in self.aborted:  # ordered before the Continue on this socket
            await decode.send(wp.Abort(req.request_id))
        await decode.send(
            wp.Continue(
                request_id=req.request_id,
                token_ids=req.token_ids + first.token_ids,
                params=msgspec.structs.replace(
                    req.params, max_tokens=req.params.max_tokens - len(first.token_ids)
                ),
                reply_to=req.reply_to,
                kv_block_ids=arrived.block_ids,
                kv_handle=arrived.handle,
                cache=to.cache,
                return_kv_to=self.cfg.mempool if to.return_kv else "",
                num_prompt_tokens=len(req.token_ids),
                num_cached_tokens=first.num_cached_tokens,
                output_offset=len(first.token_ids),
                generator_state=first.output.generator_state if first.output else b"",
            )
        )
        self.served += 1

    async def _continue(self, req: wp.Continue) -> None:
        arrived = KvPrefix(req.kv_block_ids, req.kv_handle)
        if await self._refuse_unattached(req.request_id, req.reply_to):
            return
        if req.request_id in self.aborted:  # the client left while the KV was moving
            with contextlib.suppress(Exception):
                await self.engine.connector.release_prefix(arrived)
            return
        plan = KvPlan(
            cache=req.cache and self.cfg.caching,
            arrived=arrived,
            return_kv_to=req.return_kv_to,
        )
        out = self._peer(req.reply_to)
        offset = req.output_offset
        self.routes[req.request_id] = req.reply_to
        try:
            async for chunk in self.engine.generate(
                req.token_ids,
                req.params,
                req.request_id,
                plan,
                generator_state=req.generator_state,
            ):
                if chunk.moved:
                    return
                await out.send(
                    self._chunk(
                        req.request_id,
                        chunk,
                        offset,
                        num_prompt=req.num_prompt_tokens,
                        num_cached=req.num_cached_tokens,
                    )
                )
                offset += len(chunk.token_ids)
            self.served += 1
        except Exception as exc:
            await self._fail(out, req.request_id, exc, offset)
        finally:
            self.routes.pop(req.request_id, None)

    def adopt(self, state: el.RequestState) -> None:
        """Stream the rest of a request taken over from another worker (a group formed or
        dissolved): first an empty chunk, so the gateway knows who serves it now, then
        its new tokens from `output_offset` on."""
        self._spawn(self._adopted(state))

    def forward_abort(self, request_id: str, address: str) -> None:
        """An abort for a request that a restore sent home to the worker at `address`."""
        self._spawn(self._peer(address).send(wp.Abort(request_id)))

    def announce(self, state: el.RequestState, instance_id: str, address: str) -> None:
        """Tell the gateway that `instance_id` serves this request from now on (an empty
        chunk at its offset): the death of that instance must fail it, wherever the
        request is in the hand-over."""
        chunk = wp.TokenChunk(
            request_id=state.request_id,
            token_ids=[],
            num_prompt_tokens=len(state.prompt_token_ids),
            num_cached_tokens=state.num_cached_tokens,
            offset=state.output_offset,
            instance_id=instance_id,
            address=address,
        )
        self._spawn(self._peer(state.reply_to).send(chunk))

    def fail_moved(self, state: el.RequestState, error: str) -> None:
        """End a request that left this engine (`export`) and that no engine took over."""
        out = self._peer(state.reply_to)
        self._spawn(self._fail(out, state.request_id, MemServeError(error), state.output_offset))

    async def _adopted(self, state: el.RequestState) -> None:
        rid = state.request_id
        out = self._peer(state.reply_to)
        offset = state.output_offset
        num_prompt = len(state.prompt_token_ids)
        self.routes[rid] = state.reply_to
        try:
            await out.send(
                wp.TokenChunk(
                    request_id=rid,
                    token_ids=[],
                    num_prompt_tokens=num_prompt,
                    num_cached_tokens=state.num_cached_tokens,
                    offset=offset,
                    instance_id=self.cfg.instance_id,
                    address=self.address,
                )
            )
            plan = KvPlan(cache=False)
            async for chunk in self.engine.adopt(state, plan):
                if chunk.moved:
                    return
                await out.send(
                    self._chunk(
                        rid,
                        chunk,
                        offset,
                        num_prompt=num_prompt,
                        num_cached=state.num_cached_tokens,
                    )
                )
                offset += len(chunk.token_ids)
            self.served += 1
        except Exception as exc:
            await self._fail(out, rid, exc, offset)
        finally:
            if self.routes.get(rid) == state.reply_to:
                self.routes.pop(rid, None)

    def _chunk(
        self,
        rid: str,
        chunk: Any,
        offset: int,
        num_prompt: int | None = None,
        num_cached: int | None = None,
    ) -> wp.TokenChunk:
        if chunk.error:
            self.failed += 1
        return wp.TokenChunk(
            request_id=rid,
            token_ids=chunk.token_ids,
            finished=chunk.finished,
            finish_reason=chunk.finish_reason,
            num_prompt_tokens=chunk.num_prompt_tokens if num_prompt is None else num_prompt,
            num_cached_tokens=chunk.num_cached_tokens if num_cached is None else num_cached,
            error=chunk.error,
            offset=offset,
            instance_id=self.cfg.instance_id,
        )

    async def _fail(self, out: PushSocket[Any], rid: str, exc: Exception, offset: int) -> None:
        self.failed += 1
        log.warning("request failed", request_id=rid, error=str(exc), exc_info=True)
        with contextlib.suppress(Exception):
            await out.send(
                wp.TokenChunk(
                    request_id=rid,
                    token_ids=[],
                    finished=True,
                    finish_reason="error",
                    error=f"worker {self.cfg.instance_id}: {exc}",
                    offset=offset,
                    instance_id=self.cfg.instance_id,
                )
            )

    def _peer(self, address: str) -> PushSocket[Any]:
        sock = self.peers.get(address)
        if sock is not None:
            self.peers.move_to_end(address)
        if sock is None:
            sock = PushSocket(address, wp.TokenChunk | wp.WorkerRequest, bind=False)
            self.peers[address] = sock
            if len(self.peers) > MAX_PEERS:
                # The least recently used: a live stream sends every step, so this is a
                # peer gone quiet (a finished request's gateway run, an unreachable one).
                _, old = self.peers.popitem(last=False)
                old.close()
        return sock

    # ------------------------------------------------------------- heartbeats
    async def _beat(self) -> None:
        while True:
            self.device_blocks = await self._check_daemon()
            await self._heartbeat()
            await asyncio.sleep(self.cfg.heartbeat_interval_s)

    async def _heartbeat(self) -> None:
        """One heartbeat with the current state (nothing without a scheduler)."""
        if self.heartbeats is None:
            return
        cfg = self.cfg
        used, total = self.device_blocks
        waiting, running, wait_tokens, run_tokens = self._load()
        kv = self._kv_load(total)
        await self.heartbeats.send(
            sp.Heartbeat(
                cfg.instance_id,
                cfg.role,
                self.address,
                cfg.mempool,
                self.events,
                self.control_address,
                self.block_size,
                self.block_bytes,
                self.started_at,
                sp.InstanceLoad(
                    waiting,
                    running,
                    wait_tokens,
                    run_tokens,
                    used,
                    total,
                    used_blocks=kv.used,
                    waiting_blocks=kv.waiting,
                    capacity_blocks=kv.capacity,
                ),
                self.healthy,
                self.incarnation,
                model=cfg.engine.model,
                num_layers=self.num_layers,
                param_bytes=self.full_param_bytes,
                budget_bytes=self.budget_bytes,
            )
        )

    async def _check_daemon(self) -> tuple[int, int]:
        """Ask the daemon for its stats and act on what `DaemonLink` makes of the answer
        (or its absence). Returns (used, total) device blocks, 0s when unknown."""
        if self.link.state is LinkState.REATTACHING:
            return 0, 0  # the re-attach task talks to the daemon meanwhile
        cfg = self.cfg
        try:
            st = await self.probe.stats(timeout_s=max(1.0, 2 * cfg.heartbeat_interval_s))
        except Exception as exc:
            log.warning(
                "MemPool daemon did not answer", misses=self.link.misses + 1, error=str(exc)
            )
            if self.link.missed() is LinkAction.FAIL_ALL:
                log.error("lost the MemPool daemon; failing every request", mempool=cfg.mempool)
                self.engine.fail_all(f"worker {cfg.instance_id} lost its MemPool daemon")
            return 0, 0
        if self.link.answered(st.incarnation) is LinkAction.REATTACH:
            log.warning(
                "the MemPool daemon answers as another incarnation, or after our connection "
                "dropped; failing every request and re-attaching",
                mempool=cfg.mempool,
                incarnation=st.incarnation,
                restarted=st.incarnation != self.engine.incarnation,
            )
            await self._abandon_engine()
            return 0, 0
        total = st.capacity.get("device", 0)
        return total - st.free.get("device", 0), total

    def _engine_fenced(self) -> None:
        if self.link.disconnected() is LinkAction.FAIL_ALL:
            log.error("lost the MemPool daemon; every request failed", mempool=self.cfg.mempool)
            # Unhealthy now, not at the next beat: the scheduler stops placing here at once.
            self.device_blocks = (0, 0)
            self._spawn(self._heartbeat())

    async def _abandon_engine(self) -> None:
        model = await self.engine.abandon(
            f"worker {self.cfg.instance_id}: its MemPool daemon was restarted; "
            "this request's KV memory is gone"
        )
        self._spawn(self._reattach(model))

    async def _reattach(self, model: Any) -> None:
        """Attach to the daemon now on `cfg.mempool` as at start-up (same model), until it
        works; the worker stays unhealthy meanwhile."""
        while True:
            try:
                engine = await _attach(self.cfg, model)
                info = await engine.client.info()
            except Exception as exc:
                delay = self.link.reattach_failed()
                log.warning("re-attach to the MemPool daemon failed", error=str(exc), retry_s=delay)
                await asyncio.sleep(delay)
                continue
            engine.on_fenced = self._engine_fenced
            self.engine, self.events = engine, info.events
            self.link.reattached(engine.incarnation)
            log.info(
                "re-attached to the restarted MemPool daemon",
                mempool=self.cfg.mempool,
                incarnation=engine.incarnation,
            )
            return

    def _load(self) -> tuple[int, int, int, int]:
        if self.engine.abandoned:
            return 0, 0, 0, 0
        return self.engine.load()

    def _kv_load(self, daemon_capacity: int) -> KvLoad:
        """The elastic controller's signals (services/worker/load.py); 0s while the
        engine is gone or the daemon did not answer."""
        if self.engine.abandoned or not self.healthy:
            return KvLoad()
        try:
            return self.engine.kv_load(daemon_capacity, leader=self.elastic.state == "leader")
        except RuntimeError:  # a queue changed under the read (a step in its thread): the
            return KvLoad()  # heartbeat goes out anyway, the next one has the figures

    # ----------------------------------------------------------------- control
    async def _control(self, req: Any) -> Any:
        if isinstance(req, AdminRequest):
            return await self._admin(req)
        if isinstance(req, mg.Migrate | mg.Reserve | mg.Arrive | mg.Cancel):
            return await self.migration.handle(req)
        return await self.elastic.handle(req)

    async def _admin(self, req: AdminRequest) -> AdminReply:
        if not check_admin_token(req.token, self.cfg.admin_token):
            return AdminReply(False, error="bad admin token")
        if req.command == "status":
            waiting, running, wait_tokens, run_tokens = self._load()
            return AdminReply(
                True,
                {
                    "service": "worker",
                    "instance_id": self.cfg.instance_id,
                    "role": self.cfg.role,
                    "pid": os.getpid(),
                    "uptime_s": round(time.time() - self.started_at, 3),
                    "healthy": self.healthy,
                    "mempool": self.link.state.value,
                    "mempool_reattaches": self.link.reattaches,
                    "waiting": waiting,
                    "running": running,
                    "waiting_tokens": wait_tokens,
                    "running_tokens": run_tokens,
                    "served": self.served,
                    "failed": self.failed,
                    "peers": len(self.peers),
                    "elastic": self.elastic.status(),
                    "migration": self.migration.status(),
                    "preemption": self._preemption(),
                    "rss_bytes": rss_bytes(),
                    "param_bytes": self._param_bytes(),
                },
            )
        if req.command == "shutdown":
            log.info("shutdown requested over the control socket")
            with contextlib.suppress(Exception):  # the daemon goes with its worker
                await self.probe.call(AdminRequest(req.token, "shutdown"), timeout_s=2.0)
            self.stop()
            return AdminReply(True, {"stopping": self.cfg.instance_id})
        return AdminReply(
            False, error=f"the worker answers status and shutdown, not {req.command!r}"
        )

    def _preemption(self) -> dict[str, int]:
        engine = getattr(self.engine, "engine", None)  # none while the daemon is away
        return engine.preemption_stats() if engine is not None else {}

    def _param_bytes(self) -> int:
        if self.engine.abandoned:
            return 0
        return int(self.engine.engine.model.param_bytes())

    async def close(self) -> None:
        """Hand-offs in flight are cancelled, then the engine gives its leased blocks back
        to the daemon and unmaps the region, then the sockets close."""
        await self.tasks.close(self.drain_s)
        await self.elastic.close()
        await self.migration.close()
        await self.engine.close()
        self.close_sockets()

    def close_sockets(self) -> None:
        self.probe.close()
        self.requests.close()
        self.control.close()
        if self.heartbeats is not None:
            self.heartbeats.close()
        for sock in self.peers.values():
            sock.close()
        if self.metrics_server is not None:
            self.metrics_server.close()


def rss_bytes() -> int:
    """This process's private resident memory (Linux `RssAnon`; 0 elsewhere): where its
    parameters live, and what a parameter drop lowers. The KV region is the daemon's shared
    memory, which plain RSS would also count once touched: left out on purpose."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


async def _attach(cfg: WorkerConfig, model: Any = None) -> MempoolEngine:
    return await MempoolEngine.connect(
        cfg.engine,
        cfg.mempool,
        owner=cfg.instance_id,
        caching=cfg.caching,
        transfer_timeout_s=cfg.transfer_timeout_s,
        model=model,
    )
