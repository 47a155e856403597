"""The gateway: an asyncio shell that owns the client-facing ROUTER, the workers' reply PULL,
the scheduler's RPC and event SUB, and the control socket.

    client ──Complete──▶ ROUTER ─validate─▶ Place (scheduler) ─▶ Generate (PUSH) ─▶ worker
    client ◀──Chunk/Final── ROUTER ◀── RequestStream ◀── TokenChunk (PULL) ◀── workers

Invariants: every `Complete` gets exactly one `Final` (unless its client is gone); every
request that ends early (cancel, client gone, stop string, error, timeout, a dead instance)
sends `Abort` to each of its legs, so workers free its blocks; every placement's charge is
released at the scheduler. Nothing on the per-token path waits on the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from typing import Any, cast

from common.codec import DecodeError
from common.detokenizer import IncrementalDetokenizer
from common.errors import InvalidRequestError
from common.logging import get_logger
from common.net import advertise
from common.protocol import client as cp
from common.protocol import scheduler as sp
from common.protocol import worker as wp
from common.protocol.admin import AdminReply, AdminRequest
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
from services.gateway.sessions import Sessions
from services.gateway.stream import Leg, RequestStream

log = get_logger(__name__)


class _Request:
    def __init__(self, peer: bytes, rid: str, stream: RequestStream, session_id: str):
        self.peer = peer
        self.rid = rid  # the gateway's id, unique across clients
        self.stream = stream
        self.session_id = session_id
        self.pd = False
        self.prefill_released = False


class GatewayService:
    def __init__(self, cfg: GatewayConfig, tokenizer: Tokenizer, max_model_len: int, vocab: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_model_len = min(cfg.max_model_len or max_model_len, max_model_len)
        self.vocab = vocab
        self.clients: RouterSocket[Any] = RouterSocket(cfg.address, cast(Any, cp.ClientRequest))
        self.replies: PullSocket[wp.TokenChunk] = PullSocket(
            cfg.reply_address, wp.TokenChunk, bind=True
        )
        self.reply_to = advertise(self.replies.address, cfg.advertise_host)
        self.scheduler: RpcClient[Any, Any] = RpcClient(
            cfg.scheduler, cast(Any, sp.SchedulerRequest), cast(Any, sp.SchedulerReply)
        )
        self.events: SubSocket[Any] | None = None
        if cfg.scheduler_events:
            self.events = SubSocket(
                cfg.scheduler_events,
                cast(Any, sp.InstanceEvent),
                bind=False,
                topics=[sp.INSTANCE_TOPIC],
            )
        self.control: RpcServer[AdminRequest, AdminReply] = RpcServer(
            cfg.control_address, AdminRequest, AdminReply
        )
        self.workers: dict[str, PushSocket[Any]] = {}
        self.requests: dict[str, _Request] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}
        self.sessions = Sessions(cfg.session_ttl_s, cfg.max_sessions)
        self.tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count()
        self.started_at = time.time()
        self.served = 0
        self.failed = 0
        self._stop = asyncio.Event()

    @property
    def endpoints(self) -> dict[str, str]:
        return {
            "clients": advertise(self.clients.address, self.cfg.advertise_host),
            "replies": self.reply_to,
            "control": self.control.address,
        }

    async def serve(self) -> None:
        """Serve until closed, or until shutdown (admin or cluster-wide; then return)."""
        loops = [
            self._serve_clients(),
            self._serve_replies(),
            self._watchdog(),
            self.control.serve(self._admin),
        ]
        if self.events is not None:
            loops.append(self._serve_events())
        running = [asyncio.create_task(c) for c in loops]
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([*running, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in [*running, stop]:
                t.cancel()
            await asyncio.gather(*running, stop, return_exceptions=True)

    # ----------------------------------------------------------------- clients
    async def _serve_clients(self) -> None:
        while True:
            try:
                peer, msg = await self.clients.recv()
            except MalformedFrom as exc:
                log.warning("malformed client message", error=str(exc))
                await self._to_client(exc.peer, cp.Final("", "error", f"malformed request: {exc}"))
                continue
            now = time.monotonic()
            match msg:
                case cp.Complete():
                    self._admit(peer, msg, now)
                case cp.Cancel(request_id=crid):
                    rid = self.by_client.get((peer, crid))
                    if rid is not None:
                        await self._finish(rid, self.requests[rid].stream.end("abort", now), True)
                case cp.OpenSession():
                    try:
                        await self._to_client(peer, cp.SessionOpened(self.sessions.open(now)))
                    except InvalidRequestError as exc:
                        await self._to_client(peer, cp.SessionClosed("", str(exc)))
                case cp.CloseSession(session_id=sid):
                    try:
                        self.sessions.close(sid)
                        await self._to_client(peer, cp.SessionClosed(sid))
                    except InvalidRequestError as exc:
                        await self._to_client(peer, cp.SessionClosed(sid, str(exc)))

    def _admit(self, peer: bytes, req: cp.Complete, now: float) -> None:
        """Validate and register a request synchronously (so overload and duplicates are
        judged in arrival order), then place and dispatch it in a task."""
        error = ""
        if (peer, req.request_id) in self.by_client:
            error = f"request id {req.request_id!r} is already in flight"
        elif len(self.requests) >= self.cfg.max_inflight:
            error = (
                f"overloaded: {len(self.requests)} requests in flight (max_inflight); retry later"
            )
        if error:
            self.failed += 1
            self._spawn(self._to_client(peer, cp.Final(req.request_id, "error", error)))
            return
        try:
            prompt_ids, detok = self._prepare(req, now)
        except (InvalidRequestError, ValueError) as exc:
            self.failed += 1
            self._spawn(self._to_client(peer, cp.Final(req.request_id, "error", str(exc))))
            return
        rid = f"{self.cfg.instance_id}-{next(self._ids)}"
        stream = RequestStream(req.request_id, prompt_ids, req.params, detok, now)
        self.requests[rid] = _Request(peer, rid, stream, req.session_id)
        self.by_client[(peer, req.request_id)] = rid
        self._spawn(self._dispatch(rid))

    def _prepare(self, req: cp.Complete, now: float) -> tuple[list[int], IncrementalDetokenizer]:
        if (req.prompt is None) == (req.token_ids is None):
            raise InvalidRequestError("give exactly one of prompt (text) and token_ids")
        req.params.validate()
        history: list[int] = []
        if req.session_id:
            history = self.sessions.begin_turn(req.session_id, now)
        try:
            if req.prompt is not None:
                new = self.tokenizer.encode(req.prompt, add_special_tokens=not history)
            else:
                new = list(cast(list[int], req.token_ids))
                bad = [t for t in new if not 0 <= t < self.vocab]
                if bad:
                    raise InvalidRequestError(
                        f"token ids outside the vocabulary [0, {self.vocab}): {bad[:5]}"
                    )
            ids = history + new
            if not new:
                raise InvalidRequestError("the prompt is empty")
            if len(ids) >= self.max_model_len:
                raise InvalidRequestError(
                    f"prompt too long: {len(ids)} tokens, the limit is {self.max_model_len - 1}"
                )
        except Exception:
            if req.session_id:
                self.sessions.end_turn(req.session_id, None, now)
            raise
        return ids, IncrementalDetokenizer(self.tokenizer, ids, req.params.stop)

    async def _dispatch(self, rid: str) -> None:
        r = self.requests[rid]
        s = r.stream
        try:
            placement = await self.scheduler.call(
                sp.Place(rid, s.prompt_ids, s.params.max_tokens, r.session_id),
                timeout_s=self.cfg.place_timeout_s,
            )
        except (RpcError, TimeoutError) as exc:
            if rid in self.requests:
                await self._finish(rid, s.end("error", time.monotonic(), f"no placement: {exc}"))
            return
        if rid not in self.requests:  # cancelled while being placed
            await self._release(rid, "all")
            return
        s.legs.append(Leg(placement.instance_id, placement.address))
        if placement.handoff is not None:
            s.legs.append(Leg(placement.handoff.instance_id, placement.handoff.address))
            r.pd = True
        gen = wp.Generate(
            rid,
            s.prompt_ids,
            s.params,
            self.reply_to,
            placement.cache,
            placement.handoff,
            placement.fetch,
        )
        await self._worker(placement.address).send(gen)

    # ----------------------------------------------------------------- workers
    async def _serve_replies(self) -> None:
        while True:
            try:
                chunk = await self.replies.recv()
            except DecodeError as exc:
                log.warning("malformed token chunk dropped", error=str(exc))
                continue
            r = self.requests.get(chunk.request_id)
            if r is None:
                continue  # a late chunk of a request that already ended
            up = r.stream.accept(chunk, time.monotonic())
            if up.text or up.token_ids:
                await self._to_client(
                    r.peer, cp.Chunk(r.stream.client_request_id, up.text, up.token_ids), r.rid
                )
            if up.first_token and r.pd and not r.prefill_released:
                r.prefill_released = True
                self._spawn(self._release(r.rid, "prefill"))
            if up.final is not None:
                await self._finish(r.rid, up.final, abort_legs=up.abort_legs)

    def _worker(self, address: str) -> PushSocket[Any]:
        sock = self.workers.get(address)
        if sock is None:
            sock = self.workers[address] = PushSocket(address, wp.Abort, bind=False)
        return sock

    async def _finish(self, rid: str, final: cp.Final, abort_legs: bool = False) -> None:
        """End a request: tell the client (if still there), stop the workers when the
        gateway ended it early, release the placement, update the session."""
        r = self.requests.pop(rid, None)
        if r is None:
            return
        self.by_client.pop((r.peer, r.stream.client_request_id), None)
        ok = final.finish_reason in ("stop", "length")
        if ok:
            self.served += 1
        else:
            self.failed += final.finish_reason == "error"
        if r.session_id:
            tokens = r.stream.prompt_ids + r.stream.output_ids if ok else None
            self.sessions.end_turn(r.session_id, tokens, time.monotonic())
        if abort_legs or not ok:
            for leg in r.stream.legs:
                with contextlib.suppress(Exception):
                    await self._worker(leg.address).send(wp.Abort(rid))
        if r.stream.legs:
            self._spawn(self._release(rid, "all"))
        await self._to_client(r.peer, final, None)

    async def _release(self, rid: str, phase: str) -> None:
        with contextlib.suppress(RpcError, TimeoutError):
            await self.scheduler.call(sp.Release(rid, phase), timeout_s=self.cfg.place_timeout_s)

    async def _to_client(self, peer: bytes, msg: Any, rid: str | None = None) -> None:
        try:
            await self.clients.send_to(peer, msg)
        except PeerGone:
            # The client went away: end every request it had (their workers stop).
            now = time.monotonic()
            for other in [x for x in self.requests.values() if x.peer == peer]:
                await self._finish(other.rid, other.stream.end("abort", now), True)

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
                    hit = [
                        r
                        for r in self.requests.values()
                        if any(leg.instance_id == iid for leg in r.stream.legs)
                    ]
                    for r in hit:
                        msg = f"instance {iid} is down ({why})"
                        await self._finish(r.rid, r.stream.end("error", now, msg))
                case sp.ClusterShutdown(reason=why):
                    for r in list(self.requests.values()):
                        await self._finish(
                            r.rid, r.stream.end("error", now, f"cluster stopping: {why}")
                        )
                    self._stop.set()

    async def _watchdog(self) -> None:
        period = min(1.0, self.cfg.request_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for r in list(self.requests.values()):
                if now - r.stream.last_activity > self.cfg.request_timeout_s:
                    legs = ", ".join(leg.instance_id for leg in r.stream.legs) or "no worker"
                    msg = f"no answer from {legs} for {self.cfg.request_timeout_s:g} s"
                    await self._finish(r.rid, r.stream.end("error", now, msg))
            self.sessions.expire(now)

    # ----------------------------------------------------------------- control
    async def _admin(self, req: AdminRequest) -> AdminReply:
        if not self.cfg.admin_token or req.token != self.cfg.admin_token:
            return AdminReply(False, error="bad admin token")
        if req.command == "status":
            return AdminReply(
                True,
                {
                    "service": "gateway",
                    "instance_id": self.cfg.instance_id,
                    "pid": os.getpid(),
                    "uptime_s": round(time.time() - self.started_at, 3),
                    "inflight": len(self.requests),
                    "sessions": len(self.sessions.sessions),
                    "served": self.served,
                    "failed": self.failed,
                },
            )
        if req.command == "shutdown":
            asyncio.get_running_loop().call_later(0.05, self._stop.set)
            return AdminReply(True, {"stopping": self.cfg.instance_id})
        return AdminReply(
            False, error=f"the gateway answers status and shutdown, not {req.command!r}"
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        now = time.monotonic()
        for r in list(self.requests.values()):
            await self._finish(r.rid, r.stream.end("error", now, "the gateway is stopping"))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for sock in (self.clients, self.replies, self.scheduler, self.control):
            sock.close()
        if self.events is not None:
            self.events.close()
        for w in self.workers.values():
            w.close()


def build(cfg: GatewayConfig) -> GatewayService:
    from services.worker.model.config import ModelConfig
    from services.worker.model.presets import resolve_model

    folder = resolve_model(cfg.model)
    model = ModelConfig.from_folder(folder)
    return GatewayService(
        cfg, Tokenizer.from_folder(folder), model.max_position_embeddings, model.vocab_size
    )
