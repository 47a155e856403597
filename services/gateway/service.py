"""The gateway: an asyncio shell that owns the client-facing ROUTER, the workers' reply PULL,
the scheduler's RPC and event SUB, and the control socket. Decisions are `GatewayCore`'s
(core.py) and each stream's (stream.py); this module only moves messages.

    client ──Complete──▶ ROUTER ─admit─▶ Place (scheduler) ─▶ Generate (PUSH) ─▶ worker
    client ◀─Chunk/Final─ ROUTER ◀─ RequestStream ◀─ TokenChunk (PULL) ◀─ workers
                                    Release ──▶ scheduler (first token in P/D; the end)

Self-healing: a client's `Ping` is answered `Pong` (its liveness check); a request whose
instance died before its first token is placed again elsewhere; every `alive_interval_s`
a `GatewayAlive` tells the scheduler this incarnation lives (when it dies, the scheduler
drops its charges), and once the scheduler answers, the releases it missed are sent.

Invariants: every `Complete` gets exactly one `Final` unless its client is gone; every
request that ends early (cancel, client gone, stop string, error, timeout, a dead
instance, shutdown) sends `Abort` to each live leg, so workers free its blocks; every
placement's charge is released at the scheduler. Nothing on the per-token path waits on
the scheduler or on a worker: releases and aborts run in their own tasks, with timeouts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from common.auth import check_admin_token
from common.codec import DecodeError
from common.logging import Throttled, get_logger
from common.metrics import refresh_every, serve
from common.net import advertise
from common.protocol import client as cp
from common.protocol import scheduler as sp
from common.protocol import worker as wp
from common.protocol.admin import AdminReply, AdminRequest
from common.service import ServiceShell
from common.sockets import (
    MalformedFrom,
    PeerGone,
    PullSocket,
    PushSocket,
    RouterSocket,
    RpcClient,
    RpcError,
    RpcServer,
    SubSocket,
)
from common.tokenizer import Tokenizer
from services.gateway.config import GatewayConfig
from services.gateway.core import GatewayCore, Request
from services.gateway.metrics import GatewayMetrics
from services.gateway.public import client_socket_security
from services.gateway.readiness import status_report
from services.gateway.sessions import Sessions

log = get_logger(__name__)

# A worker whose socket cannot take a message for this long is unreachable: a send never
# holds a request (or the gateway) longer than that.
WORKER_SEND_TIMEOUT_S = 2.0


class GatewayService(ServiceShell):
    kind = "gateway"
    # At close, the aborts and releases of what was in flight go out (each is bounded by
    # its own timeout).
    drain_s = WORKER_SEND_TIMEOUT_S

    def __init__(self, cfg: GatewayConfig, tokenizer: Tokenizer, max_model_len: int, vocab: int):
        super().__init__()
        self.cfg = cfg
        self.started_at = time.time()  # with instance_id: this incarnation
        self.clients = RouterSocket(
            cfg.address, cp.ClientRequest, security=client_socket_security(cfg)
        )
        self.replies = PullSocket(cfg.reply_address, wp.TokenChunk, bind=True)
        self.scheduler = RpcClient(cfg.scheduler, sp.SchedulerRequest, sp.SchedulerReply)
        self.events: SubSocket[sp.InstanceEvent] | None = None
        if cfg.scheduler_events:
            self.events = SubSocket(
                cfg.scheduler_events, sp.InstanceEvent, bind=False, topics=[sp.INSTANCE_TOPIC]
            )
        self.control = RpcServer(cfg.control_address, AdminRequest, AdminReply)
        self.warn = Throttled(log, burst=cfg.log_burst, interval_s=cfg.log_interval_s)
        context = min(cfg.max_model_len or max_model_len, max_model_len)
        self.core = GatewayCore(
            tokenizer,
            vocab_size=vocab,
            max_model_len=context,
            max_inflight=cfg.max_inflight,
            max_inflight_per_client=cfg.max_inflight_per_client,
            max_id_bytes=cfg.max_id_bytes,
            max_prompt_bytes=cfg.prompt_bytes_limit(context),
            max_tokens_limit=max_model_len,
            sessions=Sessions(cfg.session_ttl_s, cfg.max_sessions, cfg.max_sessions_per_client),
            # A fresh prefix per run: a restarted gateway never reuses an id that a worker
            # or the scheduler may still hold.
            id_prefix=f"{cfg.instance_id}-{secrets.token_hex(3)}",
            reply_to=advertise(self.replies.address, cfg.advertise_host),
            max_replacements=cfg.replace_attempts,
            gateway_id=cfg.instance_id,
            started_at=self.started_at,
        )
        # By the worker's request address.
        self.workers: dict[str, PushSocket[wp.WorkerRequest]] = {}
        # The scheduler's last answer to GatewayAlive, and when (a client's Status).
        self.known: sp.GatewayKnown | None = None
        self.known_at = 0.0
        self.metrics = GatewayMetrics()
        self.metrics_server = serve(self.metrics, cfg.metrics_address, cfg.advertise_host)

    @property
    def endpoints(self) -> dict[str, str]:
        return {
            "clients": advertise(self.clients.address, self.cfg.advertise_host),
            "replies": self.core.reply_to,
            "control": self.control.address,
            **({"metrics": self.metrics_server.url} if self.metrics_server else {}),
        }

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """Served until closed, or until shutdown (admin or cluster-wide)."""
        loops = [
            self._serve_clients(),
            self._serve_replies(),
            self._watchdog(),
            self._keep_alive(),
            self.control.serve(self._admin),
            refresh_every(lambda: self.metrics.refresh(len(self.core.requests))),
        ]
        if self.events is not None:
            loops.append(self._serve_events())
        return loops

    # ----------------------------------------------------------------- clients
    async def _serve_clients(self) -> None:
        while True:
            try:
                peer, msg = await self.clients.recv()
            except MalformedFrom as exc:
                self.warn.warning("malformed", "malformed client message", error=str(exc)[:200])
                await self._to_client(
                    exc.peer, cp.Final("", "error", error=f"malformed request: {exc}")
                )
                continue
            match msg:
                case cp.Complete():
                    await self._complete(peer, msg)
                case cp.Ping(waiting=waiting):
                    await self._to_client(peer, cp.Pong(self.core.unknown_of(peer, waiting)))
                case cp.Status():
                    now, interval = time.monotonic(), self.cfg.alive_interval_s
                    report = status_report(self.known, self.known_at, now, interval)
                    await self._to_client(peer, report)
                case cp.Cancel(request_id=crid):
                    r = self.core.lookup(peer, crid)
                    if r is not None:  # else it already ended: its Final is on its way
                        await self._end(r, r.stream.end("abort", time.monotonic()), abort=True)
                    else:  # or its text is being tokenized: it ends "abort" once it is
                        self.core.cancel_held(peer, crid)
                case cp.OpenSession():
                    try:
                        sid = self.core.sessions.open(time.monotonic(), peer)
                    except ValueError as exc:
                        self.warn.warning("session", "session refused", error=str(exc))
                        await self._to_client(peer, cp.SessionClosed("", str(exc)))
                    else:
                        await self._to_client(peer, cp.SessionOpened(sid))
                case cp.CloseSession(session_id=sid):
                    limit = self.cfg.max_id_bytes
                    if len(sid) > limit or len(sid.encode()) > limit:  # never echo it
                        error = f"session_id longer than {self.cfg.max_id_bytes} bytes"
                        self.warn.warning("session", "session refused", error=error)
                        await self._to_client(peer, cp.SessionClosed("", error))
                        continue
                    try:
                        self.core.sessions.close(sid)
                    except ValueError as exc:
                        await self._to_client(peer, cp.SessionClosed(sid, str(exc)))
                    else:
                        await self._to_client(peer, cp.SessionClosed(sid))

    async def _complete(self, peer: bytes, msg: cp.Complete) -> None:
        """Admit `msg` or refuse it. Its bounds are judged first, on the loop (cheap); a
        text prompt within them is tokenized in a thread, so no prompt stalls the loop."""
        refusal = self.core.check(peer, msg)
        if refusal is None and msg.prompt is not None:
            self.core.hold(peer, msg)
            self.tasks.spawn(self._tokenize_then_admit(peer, msg))
            return
        admitted = refusal or self.core.admit(peer, msg, time.monotonic())
        if isinstance(admitted, cp.Final):
            self.warn.warning("refused", "request refused", error=admitted.error[:200])
            self.metrics.refused()
            await self._to_client(peer, admitted)
        else:
            self.tasks.spawn(self._dispatch(admitted))

    async def _tokenize_then_admit(self, peer: bytes, msg: cp.Complete) -> None:
        assert msg.prompt is not None
        bos = self.core.needs_bos(msg)
        try:
            ids = await asyncio.to_thread(
                self.core.tokenizer.encode, msg.prompt, add_special_tokens=bos
            )
        finally:
            cancelled = self.core.unhold(peer, msg)
        if cancelled:
            await self._to_client(peer, cp.Final(msg.request_id, "abort"))
            return
        admitted = self.core.admit(peer, msg, time.monotonic(), (ids, bos))
        if isinstance(admitted, cp.Final):
            self.warn.warning("refused", "request refused", error=admitted.error[:200])
            self.metrics.refused()
            await self._to_client(peer, admitted)
        else:
            await self._dispatch(admitted)

    async def _dispatch(self, r: Request) -> None:
        """Place the request, then send its `Generate` to the first worker; a first worker
        that cannot be reached is avoided and the request placed again (`can_replace`)."""
        while True:
            try:
                placement = await self.scheduler.call_for(
                    self.core.place_request(r), sp.Placement, timeout_s=self.cfg.place_timeout_s
                )
            except (RpcError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):  # it may have been placed (and charged)
                    self.core.owe_release(r.rid)
                if r.rid in self.core.requests:
                    now = time.monotonic()
                    await self._end(r, r.stream.end("error", now, f"no placement: {exc}"))
                return
            if r.rid not in self.core.requests:  # cancelled (or its client left) while placed
                await self._release(r.rid, "all")
                return
            gen = self.core.placed(r, placement)
            moves = len(r.avoid)
            if await self._send_worker(placement.address, gen):
                return
            if r.rid not in self.core.requests or len(r.avoid) != moves:
                return  # it ended, or an InstanceDown already placed it again
            iid = placement.instance_id
            if not self.core.can_replace(r):
                msg = f"instance {iid} at {placement.address} is unreachable"
                await self._end(r, r.stream.end("error", time.monotonic(), msg))
                return
            self._unplace(r, iid, "unreachable")

    def _unplace(self, r: Request, dead: str, why: str) -> None:
        """Take `r` off instance `dead` before its first token, under a fresh id: its other
        legs stop and the old id's charge is released (see `GatewayCore.unplace`)."""
        old, live = self.core.unplace(r, dead, time.monotonic())
        log.info("placing a request again", request=old, now=r.rid, instance=dead, reason=why)
        for leg in live:
            if leg.address:
                self.tasks.spawn(self._send_worker(leg.address, wp.Abort(old)))
        self.tasks.spawn(self._release(old, "all"))

    # ----------------------------------------------------------------- workers
    async def _serve_replies(self) -> None:
        # The per-token path: one decode, one dict lookup, one stream step, one send.
        requests = self.core.requests
        while True:
            try:
                chunk = await self.replies.recv()
            except DecodeError as exc:
                log.warning("malformed token chunk dropped", error=str(exc))
                continue
            r = requests.get(chunk.request_id)
            if r is None:
                continue  # a late chunk of a request that already ended
            if chunk.instance_id and not r.has_leg_on(chunk.instance_id):
                left = self.core.follow(r, chunk)  # a group took it over, or gave it back
                if left is not None:
                    log.info(
                        "request moved", request=r.rid, left=left.instance_id, now=chunk.instance_id
                    )
            up = r.stream.accept(chunk, time.monotonic())
            if up.text or up.token_ids:
                await self._to_client(
                    r.peer, cp.Chunk(r.stream.client_request_id, up.text, up.token_ids)
                )
            if up.first_token and r.pd and not r.prefill_released:
                r.prefill_released = True
                self.tasks.spawn(self._release(r.rid, "prefill"))
            if up.final is not None:
                await self._end(r, up.final, abort=up.abort_legs)

    def _worker(self, address: str) -> PushSocket[wp.WorkerRequest]:
        sock = self.workers.get(address)
        if sock is None:
            sock = self.workers[address] = PushSocket(address, wp.WorkerRequest, bind=False)
        return sock

    async def _send_worker(self, address: str, msg: wp.Generate | wp.Abort) -> bool:
        try:
            await asyncio.wait_for(self._worker(address).send(msg), WORKER_SEND_TIMEOUT_S)
            return True
        except Exception as exc:  # timeout, or the socket was dropped (instance down)
            log.warning("cannot reach worker", address=address, error=repr(exc))
            return False

    def _drop_worker(self, address: str) -> None:
        """Forget a dead worker's socket: what is queued for it is dropped (linger 0), and
        a worker that comes back at that address starts from a fresh connection."""
        sock = self.workers.pop(address, None)
        if sock is not None:
            sock.close()

    async def _end(
        self,
        r: Request,
        final: cp.Final,
        *,
        abort: bool = False,
        notify: bool = True,
        dead: str = "",
    ) -> None:
        """End a request: forget it, stop its workers when it ended early (`abort`, or not
        by the workers' own stop / length; not instance `dead`), release its placement,
        tell the client (unless it is gone)."""
        if self.core.finish(r.rid, final, time.monotonic()) is None:
            return
        self.metrics.finished(final, r.stream.handoff_gap_s if r.pd else None)
        if abort or final.finish_reason not in ("stop", "length"):
            for leg in r.stream.legs:
                if leg.instance_id != dead and leg.address:  # (a moved leg may have none)
                    self.tasks.spawn(self._send_worker(leg.address, wp.Abort(r.rid)))
        if r.placed:
            self.tasks.spawn(self._release(r.rid, "all"))
        if notify:
            await self._to_client(r.peer, final)

    async def _release(self, rid: str, phase: str) -> None:
        try:
            await self.scheduler.call(sp.Release(rid, phase), timeout_s=self.cfg.place_timeout_s)
        except TimeoutError:
            self.core.owe_release(rid)  # sent again once the scheduler answers
        except RpcError:
            pass

    async def _keep_alive(self) -> None:
        """Tell the scheduler this incarnation lives; once it answers (again), send the
        releases it missed. Best effort: a scheduler that is down is simply tried again."""
        interval = self.cfg.alive_interval_s
        alive = sp.GatewayAlive(self.cfg.instance_id, self.started_at, interval)
        while True:
            try:
                known = await self.scheduler.call(alive, timeout_s=max(interval, 1.0))
            except TimeoutError:
                pass
            except RpcError as exc:  # it answered, if only with an error (an older one)
                log.debug("GatewayAlive refused", error=str(exc))
                self._send_owed()
            else:
                if isinstance(known, sp.GatewayKnown):
                    self.known, self.known_at = known, time.monotonic()
                self._send_owed()
            await asyncio.sleep(interval)

    def _send_owed(self) -> None:
        for rid in self.core.take_owed():
            self.tasks.spawn(self._release(rid, "all"))

    async def _to_client(self, peer: bytes, msg: cp.ClientReply) -> None:
        try:
            await self.clients.send_to(peer, msg)
        except PeerGone:
            await self._client_gone(peer)

    async def _client_gone(self, peer: bytes) -> None:
        """The client went away: end each of its requests (their workers stop)."""
        now = time.monotonic()
        for r in self.core.of_peer(peer):
            await self._end(r, r.stream.end("abort", now), abort=True, notify=False)

    # ------------------------------------------------------------- cluster events
    async def _serve_events(self) -> None:
        assert self.events is not None
        while True:
            try:
                _, event = await self.events.recv()
            except DecodeError as exc:
                log.warning("malformed instance event dropped", error=str(exc))
                continue
            now = time.monotonic()
            match event:
                case sp.InstanceDown(instance_id=iid, reason=why):
                    hit = self.core.on_instance(iid)
                    gone = {
                        leg.address for r in hit for leg in r.stream.legs if leg.instance_id == iid
                    }
                    for r in hit:
                        if self.core.can_replace(r):  # no token out yet: nobody can tell
                            self._unplace(r, iid, f"down ({why})")
                            self.tasks.spawn(self._dispatch(r))
                            continue
                        final = r.stream.end("error", now, f"instance {iid} is down ({why})")
                        await self._end(r, final, dead=iid)
                    for address in gone:
                        self._drop_worker(address)  # what was queued for it goes too
                case sp.ClusterShutdown(reason=why):
                    for r in list(self.core.requests.values()):
                        await self._end(r, r.stream.end("error", now, f"cluster stopping: {why}"))
                    self.stop()

    async def _watchdog(self) -> None:
        timeout_s = self.cfg.request_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 4))
            now = time.monotonic()
            for r in self.core.silent(now, timeout_s):
                legs = ", ".join(leg.instance_id for leg in r.stream.legs) or "no worker"
                msg = f"no answer from {legs} for {timeout_s:g} s"
                await self._end(r, r.stream.end("error", now, msg))
            self.core.sessions.expire(now)

    # ----------------------------------------------------------------- control
    async def _admin(self, req: AdminRequest) -> AdminReply:
        if not check_admin_token(req.token, self.cfg.admin_token):
            return AdminReply(False, error="bad admin token")
        if req.command == "status":
            return AdminReply(
                True,
                {
                    "service": "gateway",
                    "instance_id": self.cfg.instance_id,
                    "pid": os.getpid(),
                    "uptime_s": round(time.time() - self.started_at, 3),
                    **self.core.status(),
                },
            )
        if req.command == "shutdown":
            self.stop(after_s=0.05)
            return AdminReply(True, {"stopping": self.cfg.instance_id})
        return AdminReply(
            False, error=f"the gateway answers status and shutdown, not {req.command!r}"
        )

    # ----------------------------------------------------------------- closing
    async def closing(self) -> None:
        """Fail what is in flight, aborting its legs (the aborts go out in `drain_s`)."""
        now = time.monotonic()
        for r in list(self.core.requests.values()):
            await self._end(r, r.stream.end("error", now, "the gateway is stopping"))

    def close_sockets(self) -> None:
        for sock in (self.clients, self.replies, self.scheduler, self.control):
            sock.close()
        if self.events is not None:
            self.events.close()
        for w in self.workers.values():
            w.close()
        if self.metrics_server is not None:
            self.metrics_server.close()


def build(cfg: GatewayConfig) -> GatewayService:
    """A gateway for `cfg`: the tokenizer, context length and vocabulary of `cfg.model`."""
    from common.model.config import ModelConfig
    from common.model.presets import resolve_model

    folder = resolve_model(cfg.model)
    model = ModelConfig.from_folder(folder)
    return GatewayService(
        cfg, Tokenizer.from_folder(folder), model.max_position_embeddings, model.vocab_size
    )
