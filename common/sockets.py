"""Typed async ZeroMQ sockets, so services never touch raw zmq.

Patterns: ``PushSocket``/``PullSocket`` (pipeline), ``PubSocket``/``SubSocket`` (fan-out by
topic prefix), ``RpcServer``/``RpcClient`` (request/reply over ROUTER/DEALER). Message
bodies are ``common.codec`` frames; tensors travel as zero-copy frames.

Each socket is generic over the message type it carries, given once at construction: a
Struct class or a protocol's union alias (``PullSocket(addr, wp.WorkerRequest, ...)``
is a ``PullSocket[Generate | Continue | Abort]``). The parameter is a ``TypeForm``
(PEP 747), so mypy reads a union alias as a type too: no socket needs a cast or an
annotation, and a socket used with another protocol's messages fails type checking.

Frame layouts::

    push -> pull       [ *codec ]
    pub  -> sub        [ topic | *codec ]

    rpc request        client (DEALER) sends     [ request_id | *codec(Req) ]
                       server (ROUTER) receives  [ peer_id | request_id | *codec(Req) ]
    rpc reply          server (ROUTER) sends     [ peer_id | request_id | kind | *codec ]
                       client (DEALER) receives  [ request_id | kind | *codec ]

    request_id   8 bytes, big-endian counter chosen by the client; echoed unchanged
    kind         b"\\x00": codec frames hold a Rep
                 b"\\x01": codec frames hold an ErrorReply (malformed request, or the
                          handler raised); the client raises RpcError with its message

Invariants:

* Every socket comes from the process-wide ``zmq.asyncio`` context (``get_context()``) with
  linger 0: closing drops unsent messages instead of stalling shutdown.
* A socket belongs to the event loop that first uses it. Sends on one socket go through
  one lock, so concurrent tasks never interleave multipart sends; receives come from one
  task (the caller of ``recv``, ``serve`` or the client's reply router).
* Binding to ``tcp://host:0`` (or ``:*``) picks a free port; ``.address`` is the endpoint
  actually bound (``zmq.LAST_ENDPOINT``), or the one connected to.
* Received tensors alias the received frames (see ``common.codec``). Sent tensors above
  pyzmq's copy threshold (64 KiB) go zero-copy: ZeroMQ reads them after ``send`` returns,
  so never write in place to a tensor that was sent; send a ``.clone()`` of a reused
  buffer.
* Every socket is born locked (``common.security``): by default it is a cluster socket,
  CURVE-encrypted with the process's cluster key, and a peer without the key gets nothing
  through; making one in a process with no key installed raises ``SecurityError``. Only
  the client-facing gateway socket and its clients pass another ``security``.
* Every socket bounds what a peer may make it hold: ``max_message_bytes`` (``zmq.MAXMSGSIZE``)
  is the largest frame it accepts. libzmq checks each frame's size from its header before
  reading it and drops the connection of a peer that announces a bigger one, so the frame
  is never buffered, never delivered, and the socket keeps serving its other peers (a
  ROUTER's dropped peer is just gone; a DEALER or SUB reconnects). The limit is per frame:
  a tensor travels as a frame of its own. Defaults: ``DEFAULT_MAX_MESSAGE_BYTES`` for the
  sockets that receive from peers they did not choose (PULL, SUB, RPC server, ROUTER),
  ``CONTROL_MAX_MESSAGE_BYTES`` for those that receive nothing but subscriptions (PUSH,
  PUB), and none for clients (RPC client, DEALER): they read replies from the server they
  chose to call, whose replies carry what it serves (a MemPool ``GetTensor`` answer is as
  large as the daemon's tensor arena). ``None`` means no limit.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio

from common.codec import DecodeError, Decoder, FrameLike, encode
from common.errors import ErrorKind, MemServeError, error_kind
from common.logging import Throttled, get_logger
from common.security import CLUSTER, SocketSecurity
from common.service import TaskSet

if TYPE_CHECKING:  # annotations only: no runtime dependency on typing_extensions
    from typing_extensions import TypeForm

T = TypeVar("T", bound=msgspec.Struct)
Req = TypeVar("Req", bound=msgspec.Struct)
Rep = TypeVar("Rep", bound=msgspec.Struct)
R = TypeVar("R", bound=msgspec.Struct)

log = get_logger(__name__)
# A peer that floods bad messages must not flood the log: a few lines per kind per 10 s,
# then one "suppressed" count (common/logging.py). Shared by every socket of the process.
warn = Throttled(log, burst=5, interval_s=10.0)

# Messages of the control and serving protocols are token lists and small structs: 16 MiB
# holds a prompt of ~4M tokens as int32 bytes (the msgpack list form is at most 5 bytes a
# token, ~3M tokens), far beyond any context length, and bounds what one frame can pin.
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
# PUSH and PUB sockets receive only subscriptions (topics): a few bytes each.
CONTROL_MAX_MESSAGE_BYTES = 64 << 10

_OK = b"\x00"
_ERROR = b"\x01"
_ID_BYTES = 8


def get_context() -> zmq.asyncio.Context:
    """The process-wide asyncio context (pyzmq makes a fresh one after fork)."""
    return zmq.asyncio.Context.instance()


class ErrorReply(msgspec.Struct, frozen=True):
    """Body of an RPC reply of kind ``b"\\x01"``."""

    message: str
    kind: ErrorKind = ErrorKind.INTERNAL


class RpcError(Exception):
    """The server answered with an error (its `kind` says why), or the client could not
    use the reply (`INTERNAL`)."""

    def __init__(self, message: str, *, address: str, kind: ErrorKind = ErrorKind.INTERNAL) -> None:
        super().__init__(message)
        self.address = address
        self.kind = kind


class RpcClosed(RpcError):
    """The client was closed while the call was pending, or before it was made."""


class RpcTimeout(TimeoutError):
    """No reply arrived in time."""

    def __init__(self, message: str, *, address: str) -> None:
        super().__init__(message)
        self.address = address


_S = TypeVar("_S", bound="_Socket")


class _Socket:
    """A zmq.asyncio socket bound or connected to one address, with serialized sends."""

    def __init__(
        self,
        kind: int,
        address: str,
        *,
        bind: bool,
        max_message_bytes: int | None,
        security: SocketSecurity,
    ) -> None:
        if max_message_bytes is not None and max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0 or None, got {max_message_bytes}")
        self._sock = get_context().socket(kind)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Before bind/connect: the option applies to connections made afterwards.
        self.max_message_bytes = max_message_bytes
        self._sock.setsockopt(
            zmq.MAXMSGSIZE, -1 if max_message_bytes is None else max_message_bytes
        )
        self._send_lock = asyncio.Lock()
        try:
            security.apply(self._sock, bind=bind)
        except BaseException:
            self._sock.close(linger=0)
            raise
        self.security = security
        try:
            if bind:
                self._sock.bind(address)
                self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._sock.connect(address)
                self.address = address
        except zmq.ZMQError as e:
            self._sock.close(linger=0)
            verb = "bind" if bind else "connect"
            raise OSError(e.errno, f"cannot {verb} {address}: {e.strerror}") from None

    @property
    def closed(self) -> bool:
        return bool(self._sock.closed)

    def close(self) -> None:
        """Close now; unsent messages are dropped, pending receives are cancelled."""
        self._sock.close(linger=0)

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def _send(self, frames: Sequence[FrameLike]) -> None:
        async with self._send_lock:
            # copy=False: frames above pyzmq's copy threshold (tensors) are not copied.
            await self._sock.send_multipart(frames, copy=False)

    async def _recv(self) -> list[zmq.Frame]:
        return await self._sock.recv_multipart(copy=False)

    async def poll(self, timeout_s: float) -> bool:
        """Whether a message can be received within ``timeout_s`` seconds."""
        # pyzmq's stubs give the socket's poll the Poller's result type; it is an event mask.
        events: Any = await self._sock.poll(max(0, round(timeout_s * 1000)))
        return bool(events & zmq.POLLIN)


class PushSocket(_Socket, Generic[T]):
    """Sends ``T`` messages to the PULL sockets at the other end, round-robin."""

    def __init__(
        self,
        address: str,
        type_: TypeForm[T],
        *,
        bind: bool,
        max_message_bytes: int | None = CONTROL_MAX_MESSAGE_BYTES,
        security: SocketSecurity = CLUSTER,
    ) -> None:
        super().__init__(
            zmq.PUSH, address, bind=bind, max_message_bytes=max_message_bytes, security=security
        )
        self.type = type_

    async def send(self, msg: T) -> None:
        """Queue ``msg``; waits only while no peer can take it (high-water mark)."""
        await self._send(encode(msg))


class PullSocket(_Socket, Generic[T]):
    """Receives ``T`` messages from PUSH sockets, fair-queued."""

    def __init__(
        self,
        address: str,
        type_: TypeForm[T],
        *,
        bind: bool,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        security: SocketSecurity = CLUSTER,
    ) -> None:
        super().__init__(
            zmq.PULL, address, bind=bind, max_message_bytes=max_message_bytes, security=security
        )
        self._decoder: Decoder[T] = Decoder(type_)

    async def recv(self) -> T:
        """The next message. A malformed one is consumed and raises ``DecodeError``."""
        return self._decoder.decode(await self._recv())


class PubSocket(_Socket, Generic[T]):
    """Publishes ``T`` messages under a topic; never blocks (slow subscribers drop)."""

    def __init__(
        self,
        address: str,
        type_: TypeForm[T],
        *,
        bind: bool,
        max_message_bytes: int | None = CONTROL_MAX_MESSAGE_BYTES,
        security: SocketSecurity = CLUSTER,
    ) -> None:
        super().__init__(
            zmq.PUB, address, bind=bind, max_message_bytes=max_message_bytes, security=security
        )
        self.type = type_

    async def publish(self, topic: bytes, msg: T) -> None:
        await self._send([topic, *encode(msg)])


class SubSocket(_Socket, Generic[T]):
    """Receives ``(topic, T)`` for every subscribed topic prefix (``b""``: all)."""

    def __init__(
        self,
        address: str,
        type_: TypeForm[T],
        *,
        bind: bool,
        topics: Iterable[bytes] = (b"",),
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        security: SocketSecurity = CLUSTER,
    ) -> None:
        super().__init__(
            zmq.SUB, address, bind=bind, max_message_bytes=max_message_bytes, security=security
        )
        self._decoder: Decoder[T] = Decoder(type_)
        for topic in topics:
            self.subscribe(topic)

    def subscribe(self, topic: bytes) -> None:
        self._sock.setsockopt(zmq.SUBSCRIBE, topic)

    def unsubscribe(self, topic: bytes) -> None:
        self._sock.setsockopt(zmq.UNSUBSCRIBE, topic)

    async def recv(self) -> tuple[bytes, T]:
        """The next ``(topic, message)``; a malformed one is consumed and raises
        ``DecodeError``."""
        frames = await self._recv()
        if len(frames) < 2:
            raise DecodeError(f"pub/sub message has {len(frames)} frame(s); need topic + body")
        return frames[0].bytes, self._decoder.decode(frames[1:])


class RpcServer(_Socket, Generic[Req, Rep]):
    """Answers ``Req`` with ``Rep`` on a ROUTER socket; see the module docstring."""

    def __init__(
        self,
        address: str,
        request_type: TypeForm[Req],
        reply_type: TypeForm[Rep],
        *,
        bind: bool = True,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        security: SocketSecurity = CLUSTER,
    ) -> None:
        super().__init__(
            zmq.ROUTER, address, bind=bind, max_message_bytes=max_message_bytes, security=security
        )
        self._decoder: Decoder[Req] = Decoder(request_type)
        self.reply_type = reply_type

    async def serve(self, handler: Callable[[Req], Awaitable[Rep]]) -> None:
        """Handle requests until cancelled or closed, one task per request.

        A malformed request or a handler exception becomes an error reply to that caller;
        the server keeps serving. Returns normally when the server is closed.
        """
        handling = TaskSet(f"rpc server {self.address}")
        try:
            while True:
                try:
                    frames = await self._recv()
                except (asyncio.CancelledError, zmq.ZMQError):
                    if self.closed and not _cancelling():
                        return
                    raise
                handling.spawn(self._handle(frames, handler))
        finally:
            await handling.close()

    async def _handle(
        self, frames: list[zmq.Frame], handler: Callable[[Req], Awaitable[Rep]]
    ) -> None:
        if len(frames) < 2 or len(frames[1].bytes) != _ID_BYTES:
            # Without a request id the client could not match any reply.
            warn.warning("no-id", "rpc request without a request id dropped", address=self.address)
            return
        peer, request_id = frames[0].bytes, frames[1].bytes
        try:
            request = self._decoder.decode(frames[2:])
        except DecodeError as e:
            warn.warning("malformed", "malformed rpc request", address=self.address, error=str(e))
            await self._reply_error(
                peer, request_id, f"malformed request: {e}", ErrorKind.BAD_REQUEST
            )
            return
        try:
            body = encode(await handler(request))
        except Exception as e:
            # A refused request (MemServeError) is routine: no traceback in the log, and its
            # own budget, so a flood of refusals cannot hide a real failure's traceback.
            refused = isinstance(e, MemServeError)
            warn.warning(
                "handler-refused" if refused else "handler-failed",
                "rpc handler failed",
                address=self.address,
                error=str(e),
                exc_info=not refused,
            )
            await self._reply_error(peer, request_id, f"{type(e).__name__}: {e}", error_kind(e))
            return
        await self._reply(peer, request_id, _OK, body)

    async def _reply_error(
        self, peer: bytes, request_id: bytes, message: str, kind: ErrorKind
    ) -> None:
        await self._reply(peer, request_id, _ERROR, encode(ErrorReply(message, kind)))

    async def _reply(
        self, peer: bytes, request_id: bytes, kind: bytes, body: Sequence[FrameLike]
    ) -> None:
        if self.closed:
            return
        try:
            await self._send([peer, request_id, kind, *body])
        except zmq.ZMQError as e:
            warn.warning("not-sent", "rpc reply not sent", address=self.address, error=str(e))


class RpcClient(_Socket, Generic[Req, Rep]):
    """Calls an ``RpcServer``; many calls may be in flight, replies matched by id."""

    def __init__(
        self,
        address: str,
        request_type: TypeForm[Req],
        reply_type: TypeForm[Rep],
        *,
        bind: bool = False,
        max_message_bytes: int | None = None,
        security: SocketSecurity = CLUSTER,
    ) -> None:
        super().__init__(
            zmq.DEALER, address, bind=bind, max_message_bytes=max_message_bytes, security=security
        )
        self.request_type = request_type
        self._decoder: Decoder[Rep] = Decoder(reply_type)
        self._errors = Decoder(ErrorReply)
        self._ids = itertools.count()
        self._pending: dict[bytes, asyncio.Future[Rep]] = {}
        self._router: asyncio.Task[None] | None = None

    async def call(self, request: Req, timeout_s: float = 10.0) -> Rep:
        """Send ``request`` and wait for its reply.

        Raises ``RpcTimeout`` after ``timeout_s`` (the request may still be executed),
        ``RpcError`` for an error reply, ``RpcClosed`` if the client is closed, and
        ``EncodeError`` if the request cannot be encoded.
        """
        if self.closed:
            raise RpcClosed(f"rpc client for {self.address} is closed", address=self.address)
        frames = encode(request)
        if self._router is None:
            self._router = asyncio.create_task(self._route_replies())
        request_id = next(self._ids).to_bytes(_ID_BYTES, "big")
        reply: asyncio.Future[Rep] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        try:
            return await asyncio.wait_for(self._round_trip(request_id, frames, reply), timeout_s)
        except asyncio.TimeoutError:
            raise RpcTimeout(
                f"rpc to {self.address} got no reply within {timeout_s:g} s", address=self.address
            ) from None
        finally:
            self._pending.pop(request_id, None)

    async def call_for(self, request: Req, reply_type: type[R], timeout_s: float = 10.0) -> R:
        """``call`` for a request with one kind of answer among the channel's replies: the
        reply is a ``reply_type``, or the call raises ``RpcError`` (``INTERNAL``: the peer
        speaks another version of the protocol)."""
        reply = await self.call(request, timeout_s)
        if not isinstance(reply, reply_type):
            raise RpcError(
                f"{type(request).__name__} to {self.address} answered with "
                f"{type(reply).__name__}, not {reply_type.__name__}",
                address=self.address,
            )
        return reply

    async def _round_trip(
        self, request_id: bytes, frames: list[bytes | memoryview], reply: asyncio.Future[Rep]
    ) -> Rep:
        await self._send([request_id, *frames])
        return await reply

    async def _route_replies(self) -> None:
        try:
            while True:
                self._dispatch(await self._recv())
        except zmq.ZMQError as e:
            self._fail_pending(f"rpc client for {self.address} stopped receiving: {e}")

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            warn.warning("no-kind", "rpc reply without id and kind dropped", address=self.address)
            return
        request_id, kind = frames[0].bytes, frames[1].bytes
        reply = self._pending.get(request_id)
        if reply is None or reply.done():
            # The call timed out or was cancelled; its reply has nobody to go to.
            log.debug("late rpc reply dropped", address=self.address)
            return
        if kind == _OK:
            try:
                reply.set_result(self._decoder.decode(frames[2:]))
            except DecodeError as e:
                reply.set_exception(
                    RpcError(f"malformed reply from {self.address}: {e}", address=self.address)
                )
        elif kind == _ERROR:
            try:
                err = self._errors.decode(frames[2:])
            except DecodeError as e:
                err = ErrorReply(f"malformed error reply from {self.address}: {e}")
            reply.set_exception(RpcError(err.message, address=self.address, kind=err.kind))
        else:
            reply.set_exception(
                RpcError(f"rpc reply of unknown kind {kind!r}", address=self.address)
            )

    def _fail_pending(self, message: str) -> None:
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(RpcClosed(message, address=self.address))

    def close(self) -> None:
        """Stop routing replies, fail pending calls with ``RpcClosed``, close the socket."""
        if self._router is not None:
            self._router.cancel()
        self._fail_pending(f"rpc client for {self.address} closed")
        super().close()


def _cancelling() -> bool:
    """Whether the current task itself was asked to cancel, as opposed to a zmq future it
    awaited being cancelled by ``close()``. Python 3.10 cannot tell; there, a cancel that
    races with ``close()`` ends ``serve`` normally."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and bool(cancelling())


class RouterSocket(_Socket, Generic[T]):
    """The server end of a streaming channel: receives ``(peer, T)`` from DEALER clients and
    sends any number of messages back to one peer.

    With ``ROUTER_MANDATORY``, sending to a peer that has gone away raises ``PeerGone``
    instead of dropping the message silently: that is how a server learns a client left.
    Sends never wait: a peer that has left ``sndhwm`` messages unread is treated as gone
    too (``PeerGone``), rather than stalling the server and every other peer behind it.
    """

    def __init__(
        self,
        address: str,
        type_: TypeForm[T],
        *,
        bind: bool = True,
        sndhwm: int = 10_000,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        security: SocketSecurity = CLUSTER,
    ) -> None:
        super().__init__(
            zmq.ROUTER, address, bind=bind, max_message_bytes=max_message_bytes, security=security
        )
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)  # per peer; applies to every connection
        self._decoder: Decoder[T] = Decoder(type_)

    async def recv(self) -> tuple[bytes, T]:
        """The next ``(peer, message)``; a malformed message raises ``MalformedFrom``."""
        frames = await self._recv()
        peer = frames[0].bytes
        try:
            return peer, self._decoder.decode(frames[1:])
        except DecodeError as e:
            raise MalformedFrom(peer, str(e)) from None

    async def send_to(self, peer: bytes, msg: msgspec.Struct) -> None:
        """Queue ``msg`` for ``peer``; raises ``PeerGone`` if it left or is not reading."""
        frames = [peer, *encode(msg)]
        try:
            async with self._send_lock:
                await self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise PeerGone(peer, "is not reading (its queue is full)") from None
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                raise PeerGone(peer) from None
            raise


class DealerSocket(_Socket, Generic[T]):
    """The client end of a ``RouterSocket``: sends messages, receives ``T`` replies."""

    def __init__(
        self,
        address: str,
        type_: TypeForm[T],
        *,
        bind: bool = False,
        max_message_bytes: int | None = None,
        security: SocketSecurity = CLUSTER,
    ) -> None:
        super().__init__(
            zmq.DEALER, address, bind=bind, max_message_bytes=max_message_bytes, security=security
        )
        self._decoder: Decoder[T] = Decoder(type_)

    async def send(self, msg: msgspec.Struct) -> None:
        await self._send(encode(msg))

    async def recv(self) -> T:
        return self._decoder.decode(await self._recv())


class PeerGone(Exception):
    """A ROUTER send found no connection to that peer (the client went away), or a peer
    that stopped reading."""

    def __init__(self, peer: bytes, why: str = "is gone") -> None:
        super().__init__(f"peer {peer.hex()} {why}")
        self.peer = peer


class MalformedFrom(DecodeError):
    """A malformed message, with the peer that sent it (so it can be told)."""

    def __init__(self, peer: bytes, message: str) -> None:
        super().__init__(message)
        self.peer = peer
