"""The async Python client of a MemServe gateway (common/protocol/client.py).

    async with GatewayClient("tcp://127.0.0.1:5800") as client:
        async for text in client.generate("Hello", SamplingParams(max_tokens=32)):
            print(text, end="")
        print(client.last_final)            # timings, cached tokens

One DEALER socket; a background task routes the gateway's messages to per-request queues,
so many requests may stream at once. Leaving `generate` early (break, or `aclose()`)
cancels the request at the gateway, which aborts it on the workers. A gateway silent for
`timeout_s` raises `GatewayTimeout`: a call never hangs. After `close()`, waiting calls
raise `GatewayClosed`.

A dead gateway is noticed within a few seconds, not `timeout_s`: while a call waits and
the gateway has sent nothing for `heartbeat_s`, the client pings it (`Ping`, answered by
`Pong`); `HEARTBEAT_MISSES` beats of total silence fail every waiting call with
`GatewayGone`. With `retries=N`, a request that failed that way before its first token
is sent again (up to N times, under a fresh id) once the gateway answers again, e.g.
after its supervisor restarted it on the same address; a request that already streamed
tokens is never retried (its output would repeat): it raises `GatewayGone`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import zmq

from common.codec import DecodeError
from common.errors import MemServeError
from common.protocol import client as cp
from common.sampling import SamplingParams
from common.security import PLAIN, KeyPair, PublicClient
from common.sockets import DealerSocket


class GatewayError(MemServeError):
    """The request failed; `final` says how (its `error`)."""

    def __init__(self, final: cp.Final):
        super().__init__(final.error or final.finish_reason)
        self.final = final


class GatewayTimeout(TimeoutError):
    """The gateway sent nothing for `timeout_s`."""


class GatewayClosed(MemServeError):
    """The client was closed while a call was waiting."""


class GatewayGone(MemServeError):
    """The gateway stopped answering (its process died, or its host is unreachable).
    `streamed`: tokens of the request the caller already got (such a request is never
    retried)."""

    def __init__(self, message: str, streamed: int = 0):
        super().__init__(message)
        self.streamed = streamed


# Beats of silence (no message at all, pings unanswered) after which the gateway is gone.
HEARTBEAT_MISSES = 3


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    final: cp.Final = field(default_factory=lambda: cp.Final("", "stop"))


_CLOSED = object()  # put in every queue by close(): wakes the waiting calls


class _Gone:
    """Put in every queue when the gateway stopped answering: wakes the waiting calls."""

    def __init__(self, message: str):
        self.message = message


class GatewayClient:
    """`heartbeat_s`: how often a waiting call checks on a silent gateway (None: never;
    then only `timeout_s` ends a wait). `retries`: how many times a request that failed
    with `GatewayGone` before its first token is sent again."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 60.0,
        *,
        server_key: str | None = None,
        client_key: KeyPair | None = None,
        heartbeat_s: float | None = 1.0,
        retries: int = 0,
    ):
        """``server_key``: the gateway's published CURVE public key (Z85) when it serves
        CURVE (any non-loopback gateway by default); None talks plain text, as a loopback
        gateway expects. ``client_key``: this client's pair when the gateway admits listed
        clients only (else a throwaway pair per connection)."""
        if heartbeat_s is not None and heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0 or None, got {heartbeat_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.address = address
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.retries = retries
        lock = PLAIN if server_key is None else PublicClient(server_key.encode(), client_key)
        self._sock = DealerSocket(address, cp.ClientReply, security=lock)
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        # Session replies carry no request id: the gateway answers them in order.
        self._session_waiters: list[asyncio.Future[Any]] = []
        self._status_waiters: list[asyncio.Future[cp.StatusReport]] = []  # in order, too
        self._router: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        # When the gateway was last heard from (any message), or when a call began waiting
        # on a client that had none waiting: silence is counted from the later of the two.
        self._heard_at = 0.0
        self._message_at = 0.0  # when the last message came (only the router sets it)
        self._ids = itertools.count()
        self._prefix = f"c{os.getpid()}-{id(self) & 0xFFFFFF:x}"
        self._inflight: set[str] = set()  # the callers' request ids
        self.last_final: cp.Final | None = None  # of the request that ended last

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- sessions
    async def open_session(self) -> str:
        """A new conversation at the gateway: pass its id to each turn."""
        reply = await self._session_call(cp.OpenSession())
        if isinstance(reply, cp.SessionClosed):
            raise MemServeError(reply.error or "the gateway opened no session")
        return cast(str, reply.session_id)

    async def close_session(self, session_id: str) -> None:
        reply = await self._session_call(cp.CloseSession(session_id))
        if reply.error:
            raise MemServeError(reply.error)

    async def _session_call(self, msg: cp.OpenSession | cp.CloseSession) -> Any:
        self._ensure_router()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._begin_wait()
        self._session_waiters.append(fut)
        try:
            await self._sock.send(msg)
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise GatewayTimeout(f"no answer from the gateway at {self.address}") from None
        finally:
            with contextlib.suppress(ValueError):
                self._session_waiters.remove(fut)

    # ---------------------------------------------------------------- status
    async def status(self, timeout_s: float | None = None) -> cp.StatusReport:
        """Whether the cluster can serve, as the gateway knows it (`cp.StatusReport`);
        an answer at all proves the gateway is alive. Raises `GatewayTimeout` after
        `timeout_s` (default: the client's) without one."""
        self._ensure_router()
        fut: asyncio.Future[cp.StatusReport] = asyncio.get_running_loop().create_future()
        self._status_waiters.append(fut)
        try:
            await self._sock.send(cp.Status())
            return await asyncio.wait_for(fut, timeout_s or self.timeout_s)
        except TimeoutError:
            raise GatewayTimeout(f"no status from the gateway at {self.address}") from None
        finally:
            with contextlib.suppress(ValueError):
                self._status_waiters.remove(fut)

    # ---------------------------------------------------------------- requests
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        session_id: str = "",
        request_id: str | None = None,
        *,
        route_key: str = "",
    ) -> AsyncIterator[str]:
        """Stream text chunks; raises `GatewayError` if the request fails (an abort the
        caller did not ask for ends the stream quietly: see `last_final`). The request's
        `Final` (timings, cached tokens) is in `last_final` afterwards."""
        stream = self._stream(prompt, params, session_id, request_id, route_key)
        async with contextlib.aclosing(stream):  # an early exit cancels at once
            async for item in stream:
                if isinstance(item, cp.Chunk):
                    if item.text:
                        yield item.text
                    continue
                self.last_final = item
                if item.text:
                    yield item.text
                if item.finish_reason == "error":
                    raise GatewayError(item)

    async def complete(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        session_id: str = "",
        request_id: str | None = None,
        *,
        route_key: str = "",
    ) -> Completion:
        """The whole answer at once (raises `GatewayError` on failure)."""
        texts: list[str] = []
        ids: list[int] = []
        final: cp.Final | None = None
        stream = self._stream(prompt, params, session_id, request_id, route_key)
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, cp.Chunk):
                    texts.append(item.text)
                    ids.extend(item.token_ids)
                else:
                    final = self.last_final = item
        assert final is not None  # _stream ends with the Final or raises
        if final.finish_reason == "error":
            raise GatewayError(final)
        texts.append(final.text)
        return Completion("".join(texts), ids, final)

    def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        session_id: str = "",
        request_id: str | None = None,
        *,
        route_key: str = "",
    ) -> AsyncGenerator[cp.Chunk | cp.Final, None]:
        """The raw messages: every `Chunk` (text and token ids) as it arrives, then the
        `Final`, which is not raised on error. Closing it early cancels the request.
        `route_key`: a routing hint without session history (`Complete.route_key`)."""
        return self._stream(prompt, params, session_id, request_id, route_key)

    async def _stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None,
        session_id: str,
        request_id: str | None,
        route_key: str = "",
    ) -> AsyncGenerator[cp.Chunk | cp.Final, None]:
        """The request's chunks, then its Final; sent again (under `rid~N`) while the
        gateway is gone before the first token, at most `retries` times."""
        self._ensure_router()
        rid = request_id or f"{self._prefix}-{next(self._ids)}"
        if rid in self._inflight:
            raise ValueError(f"request id {rid!r} is already in flight on this client")
        self._inflight.add(rid)
        streamed = 0
        try:
            gone: GatewayGone | None = None
            for attempt in range(self.retries + 1):
                # A fresh id per attempt: a gateway that only seemed gone may still hold
                # the earlier one (its Cancel is on the way), and would refuse a repeat.
                arid = f"{rid}~{attempt}" if attempt else rid
                if attempt and not await self._answers():
                    continue  # still silent: this try was spent waiting for it
                try:
                    one = self._attempt(arid, prompt, params, session_id, route_key)
                    async with contextlib.aclosing(one):
                        async for msg in one:
                            if isinstance(msg, cp.Chunk) and (msg.token_ids or msg.text):
                                streamed += max(1, len(msg.token_ids))
                            yield msg
                    return
                except GatewayGone as exc:
                    if streamed:
                        raise GatewayGone(
                            f"{exc} after {streamed} tokens of request {rid} were streamed "
                            "(not retried: its output would repeat)",
                            streamed,
                        ) from None
                    gone = exc
            tried = f"; tried {self.retries + 1} times" if self.retries else ""
            raise GatewayGone(f"{gone} (request {rid}{tried})")
        finally:
            self._inflight.discard(rid)

    async def _answers(self) -> bool:
        """Whether the gateway answers a Ping within HEARTBEAT_MISSES beats. A retry waits
        for this, so that a gateway restarting on the same address (the socket reconnects
        by itself) gets one Complete, not one per try queued while it was down."""
        self._ensure_router()
        beat = self.heartbeat_s or 1.0
        since = time.monotonic()
        deadline = since + beat * HEARTBEAT_MISSES
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sock.send(cp.Ping()), beat)
            for _ in range(4):
                await asyncio.sleep(beat / 4)
                if self._message_at > since:
                    return True
        return False

    async def _attempt(
        self,
        rid: str,
        prompt: str | list[int],
        params: SamplingParams | None,
        session_id: str,
        route_key: str = "",
    ) -> AsyncGenerator[cp.Chunk | cp.Final, None]:
        """One try: its chunks, then its Final. Left before the Final: sends Cancel."""
        self._ensure_router()
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._begin_wait()
        self._queues[rid] = queue
        done = False
        try:
            await self._sock.send(
                cp.Complete(
                    rid,
                    prompt=text,
                    token_ids=ids,
                    params=params or SamplingParams(),
                    session_id=session_id,
                    route_key=route_key,
                )
            )
            while True:
                if queue.empty():
                    try:
                        msg = await asyncio.wait_for(queue.get(), self.timeout_s)
                    except TimeoutError:
                        raise GatewayTimeout(
                            f"no message from the gateway at {self.address} for "
                            f"{self.timeout_s:g} s (request {rid})"
                        ) from None
                else:  # the usual case while streaming: no timer to set up
                    msg = queue.get_nowait()
                if msg is _CLOSED:
                    done = True
                    raise GatewayClosed(f"client closed while request {rid} was running")
                if isinstance(msg, _Gone):
                    raise GatewayGone(msg.message)
                if isinstance(msg, cp.Final):
                    done = True
                    yield msg
                    return
                yield msg
        finally:
            self._queues.pop(rid, None)
            if not done and not self._sock.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._sock.send(cp.Cancel(rid)), 1.0)

    async def cancel(self, request_id: str) -> None:
        """Ask the gateway to abort a request; its stream ends with a Final "abort"."""
        await self._sock.send(cp.Cancel(request_id))

    # ---------------------------------------------------------------- routing
    def _ensure_router(self) -> None:
        if self._sock.closed:
            raise GatewayClosed(f"the client of {self.address} is closed")
        loop = asyncio.get_running_loop()
        if self._router is None or self._router.done():
            self._router = loop.create_task(self._route())
        if self.heartbeat_s is not None and (self._watch is None or self._watch.done()):
            self._watch = loop.create_task(self._watch_gateway(self.heartbeat_s))

    def _begin_wait(self) -> None:
        """A call starts waiting: if none was, the gateway's silence counts from now."""
        if not self._queues and not self._session_waiters:
            self._heard_at = time.monotonic()

    async def _watch_gateway(self, beat: float) -> None:
        """While calls wait: ping a gateway silent for a beat; fail every waiting call with
        `GatewayGone` once it was silent for HEARTBEAT_MISSES beats.

        Why an application-level ping rather than ZeroMQ's own heartbeats or a socket
        monitor: a Pong comes from the gateway's event loop, so it also catches a gateway
        that is wedged or stopped (SIGSTOP) with its TCP connection open, and a host or
        network that vanished without closing the connection (no EVENT_DISCONNECTED ever
        comes); ZMTP heartbeats are answered by libzmq's I/O thread, whatever the loop
        does. It needs no socket option, so it is the same with or without CURVE."""
        gone_after = beat * HEARTBEAT_MISSES
        while True:
            await asyncio.sleep(beat / 2)
            if not self._queues and not self._session_waiters:
                continue
            now = time.monotonic()
            silent = now - self._heard_at
            if silent >= gone_after:
                self._heard_at = now  # one verdict per silence
                self._gone(
                    f"gateway {self.address} stopped answering (nothing for {silent:.1f} s, "
                    f"pings unanswered)"
                )
            elif silent >= beat:
                waiting = list(self._queues)[: cp.MAX_PING_IDS]
                with contextlib.suppress(Exception):  # a full queue: the silence tells
                    await asyncio.wait_for(self._sock.send(cp.Ping(waiting)), beat)

    def _gone(self, message: str) -> None:
        for q in self._queues.values():
            q.put_nowait(_Gone(message))
        for fut in self._session_waiters:
            if not fut.done():
                fut.set_exception(GatewayGone(message))

    async def _route(self) -> None:
        while True:
            try:
                msg = await self._sock.recv()
            except DecodeError:
                self._heard_at = self._message_at = time.monotonic()  # someone is there
                continue  # not a reply of ours to route; the request's timeout still runs
            except zmq.ZMQError:
                return  # closed
            self._heard_at = self._message_at = time.monotonic()
            if isinstance(msg, cp.Pong):
                for crid in msg.unknown:
                    queue = self._queues.get(crid)
                    if queue is not None:
                        queue.put_nowait(
                            _Gone(
                                f"gateway {self.address} does not know request {crid} "
                                "(it was restarted, or the connection was re-made)"
                            )
                        )
                continue
            if isinstance(msg, cp.StatusReport):
                if self._status_waiters:
                    waiter = self._status_waiters.pop(0)
                    if not waiter.done():
                        waiter.set_result(msg)
                continue
            if isinstance(msg, cp.SessionOpened | cp.SessionClosed):
                if self._session_waiters:
                    fut = self._session_waiters.pop(0)
                    if not fut.done():
                        fut.set_result(msg)
                continue
            queue = self._queues.get(msg.request_id)
            if queue is not None:
                queue.put_nowait(msg)
            elif isinstance(msg, cp.Final) and not msg.request_id:
                # The gateway could not read something we sent: it cannot say which
                # request, so every waiting one learns of it.
                for q in self._queues.values():
                    q.put_nowait(msg)

    def close(self) -> None:
        """Close the socket; calls still waiting raise `GatewayClosed`."""
        if self._router is not None:
            self._router.cancel()
        if self._watch is not None:
            self._watch.cancel()
        for q in self._queues.values():
            q.put_nowait(_CLOSED)
        for fut in [*self._session_waiters, *self._status_waiters]:
            if not fut.done():
                fut.set_exception(GatewayClosed(f"the client of {self.address} is closed"))
        self._sock.close()
