"""One request's gateway stream, read by a task of its own, and how an HTTP response
lets go of it.

When the HTTP client disconnects, Starlette cancels the handler under anyio, whose
cancellation repeats at every await in its scope: a gateway stream closed there could not
send its `Cancel`. The relay's task is cancelled once, plainly, so its stream's `Cancel`
reliably reaches the gateway (and the workers free the request's blocks). `Relay.close()`
never awaits, so any `finally` may call it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from common.protocol import client as cp


class Relay:
    """Reads one gateway stream in a task of its own (see the module's docstring);
    `next()` gives its messages in order, then raises what the stream raised."""

    def __init__(self, stream: AsyncGenerator[cp.Chunk | cp.Final, None]) -> None:
        self._queue: asyncio.Queue[cp.Chunk | cp.Final | BaseException] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(stream))

    async def _pump(self, stream: AsyncGenerator[cp.Chunk | cp.Final, None]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for msg in stream:
                    self._queue.put_nowait(msg)
        except Exception as exc:
            self._queue.put_nowait(exc)

    async def next(self) -> cp.Chunk | cp.Final:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Leaving before the Final cancels the request at the gateway."""
        self._task.cancel()


async def collect(
    first: cp.Chunk | cp.Final, relay: Relay
) -> tuple[list[str], list[int], cp.Final]:
    """A whole answer: its texts, token ids and Final."""
    texts: list[str] = []
    ids: list[int] = []
    item = first
    while isinstance(item, cp.Chunk):
        texts.append(item.text)
        ids.extend(item.token_ids)
        item = await relay.next()
    texts.append(item.text)
    return texts, ids, item


async def disconnected(request: Request) -> None:
    """Returns when the HTTP client disconnects (the body was read already, so the only
    message left to receive is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class RelayedStream(StreamingResponse):
    """Closes its relay when the response ends, however it ends. A client that hung up
    while an event was being sent leaves the event generator suspended at its `yield`
    (Starlette cancels the send, not the generator), and a generator caught in a
    reference cycle is finalized only by a later garbage collection: the request would
    run on to its last token. `relay.close()` does not await, so no cancellation can
    interrupt it."""

    def __init__(self, relay: Relay, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.relay.close()
