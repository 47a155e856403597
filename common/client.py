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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
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


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    final: cp.Final = field(default_factory=lambda: cp.Final("", "stop"))


_CLOSED = object()  # put in every queue by close(): wakes the waiting calls


class GatewayClient:
    def __init__(
        self,
        address: str,
        timeout_s: float = 60.0,
        *,
        server_key: str | None = None,
        client_key: KeyPair | None = None,
    ):
        """``server_key``: the gateway's published CURVE public key (Z85) when it serves
        CURVE (any non-loopback gateway by default); None talks plain text, as a loopback
        gateway expects. ``client_key``: this client's pair when the gateway admits listed
        clients only (else a throwaway pair per connection)."""
        self.address = address
        self.timeout_s = timeout_s
        lock = PLAIN if server_key is None else PublicClient(server_key.encode(), client_key)
        self._sock = DealerSocket(address, cp.ClientReply, security=lock)
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        # Session replies carry no request id: the gateway answers them in order.
        self._session_waiters: list[asyncio.Future[Any]] = []
        self._router: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._prefix = f"c{os.getpid()}-{id(self) & 0xFFFFFF:x}"
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
        self._session_waiters.append(fut)
        try:
            await self._sock.send(msg)
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise GatewayTimeout(f"no answer from the gateway at {self.address}") from None
        finally:
            with contextlib.suppress(ValueError):
                self._session_waiters.remove(fut)

    # ---------------------------------------------------------------- requests
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        session_id: str = "",
        request_id: str | None = None,
    ) -> AsyncIterator[str]:
        """Stream text chunks; raises `GatewayError` if the request fails (an abort the
        caller did not ask for ends the stream quietly: see `last_final`). The request's
        `Final` (timings, cached tokens) is in `last_final` afterwards."""
        stream = self._stream(prompt, params, session_id, request_id)
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
    ) -> Completion:
        """The whole answer at once (raises `GatewayError` on failure)."""
        texts: list[str] = []
        ids: list[int] = []
        final: cp.Final | None = None
        stream = self._stream(prompt, params, session_id, request_id)
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
    ) -> AsyncGenerator[cp.Chunk | cp.Final, None]:
        """The raw messages: every `Chunk` (text and token ids) as it arrives, then the
        `Final`, which is not raised on error. Closing it early cancels the request."""
        return self._stream(prompt, params, session_id, request_id)

    async def _stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None,
        session_id: str,
        request_id: str | None,
    ) -> AsyncGenerator[cp.Chunk | cp.Final, None]:
        """The request's chunks, then its Final. Left before the Final: sends Cancel."""
        self._ensure_router()
        rid = request_id or f"{self._prefix}-{next(self._ids)}"
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already in flight on this client")
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        queue: asyncio.Queue[Any] = asyncio.Queue()
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
                if isinstance(msg, cp.Final):
                    done = True
                    yield msg
                    return
                yield msg
        finally:
            self._queues.pop(rid, None)
            if not done and not self._sock.closed:
                with contextlib.suppress(Exception):
                    await self._sock.send(cp.Cancel(rid))

    async def cancel(self, request_id: str) -> None:
        """Ask the gateway to abort a request; its stream ends with a Final "abort"."""
        await self._sock.send(cp.Cancel(request_id))

    # ---------------------------------------------------------------- routing
    def _ensure_router(self) -> None:
        if self._sock.closed:
            raise GatewayClosed(f"the client of {self.address} is closed")
        if self._router is None or self._router.done():
            self._router = asyncio.get_running_loop().create_task(self._route())

    async def _route(self) -> None:
        while True:
            try:
                msg = await self._sock.recv()
            except DecodeError:
                continue  # not a reply of ours to route; the request's timeout still runs
            except zmq.ZMQError:
                return  # closed
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
        for q in self._queues.values():
            q.put_nowait(_CLOSED)
        for fut in self._session_waiters:
            if not fut.done():
                fut.set_exception(GatewayClosed(f"the client of {self.address} is closed"))
        self._sock.close()
