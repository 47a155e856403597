"""One region's data plane: the configured transports that move that region's memory
between daemons (the KV device tier has one, the tensor region another).

    peer's Sender ══ bytes ══▶ Receiver (listening on data_host) ──▶ region
    region ──▶ Sender ══ bytes ══▶ peer's Receiver

Per transport one `Receiver` and one `Sender`, shared by every transfer. Which transport
a transfer uses: the sender offers its own (or the one the caller named), preferred first,
and the receiver takes the first it also has (`choose`); shm and cuda-ipc only within a host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.errors import ErrorKind, MemServeError, error_kind
from common.logging import get_logger
from common.sockets import RpcClosed, RpcError
from services.mempool.pool import MemPoolError
from services.mempool.region import Region
from services.mempool.transport import (
    Receiver,
    Sender,
    TransferError,
    available_transports,
    make_transport,
)

log = get_logger(__name__)

_SAME_HOST_ONLY = ("shm", "cuda-ipc")


class DataPlane:
    def __init__(
        self,
        region: Region,
        transports: list[str],
        data_host: str,
        host_id: str,
        tcp_options: Mapping[str, Any] | None = None,
    ):
        self.region = region
        self.host_id = host_id
        self.transports = _make_transports(region, transports, data_host, tcp_options or {})
        self.endpoints: dict[str, dict[str, str]] = {}  # per transport, once started

    async def start(self) -> None:
        for name, (receiver, _) in self.transports.items():
            self.endpoints[name] = await receiver.start()

    async def close(self) -> None:
        for receiver, sender in self.transports.values():
            await receiver.close()
            await sender.close()

    def endpoint(self, transport: str) -> dict[str, str]:
        """What a sender needs for one transfer over `transport`: the endpoint from start,
        with the fields that follow the region's geometry read now (split mode changes
        the block size in place; a sender must never use a stale one)."""
        return {**self.endpoints[transport], **self.receiver(transport).geometry()}

    def receiver(self, transport: str) -> Receiver:
        return self.transports[transport][0]

    def sender(self, transport: str) -> Sender:
        return self.transports[transport][1]

    def offer(self, transport: str) -> list[str]:
        """The sender's offer: the named transport, or every enabled one ("")."""
        if not transport:
            return list(self.transports)
        if transport not in self.transports:
            raise MemPoolError(
                f"transport {transport!r} is not enabled here; enabled: {list(self.transports)}",
                kind=ErrorKind.BAD_REQUEST,
            )
        return [transport]

    def choose(self, offered: list[str], sender_host: str) -> str:
        """The receiver's pick: the first offered transport it has and can use with a
        sender on `sender_host`."""
        for name in offered:
            if name not in self.transports:
                continue
            if name in _SAME_HOST_ONLY and sender_host != self.host_id:
                continue
            return name
        raise MemPoolError(
            f"no common transport: sender offers {offered}, receiver has {list(self.transports)}",
            kind=ErrorKind.REFUSED,
        )


def _make_transports(
    region: Region, configured: list[str], data_host: str, tcp_options: Mapping[str, Any]
) -> dict[str, tuple[Receiver, Sender]]:
    """The configured transports that can move `region`'s memory here (host memory: shm,
    tcp, ucx, gloo; a CUDA device tier: nccl), receiving on `data_host`; the tcp receiver
    also takes `tcp_options` (its connection limits)."""
    memory = "host" if region.on_host else "cuda"
    usable = available_transports(memory)
    names = [t for t in configured if t in usable]
    missing = sorted(set(configured) - set(names))
    if missing:
        log.warning("transports not available here", memory=memory, missing=missing)
    if not names:
        raise ValueError(
            f"none of mempool.transports {configured} can move {memory} memory "
            f"here (usable: {usable or 'none'})"
        )
    options: dict[str, dict[str, Any]] = {
        "tcp": {**tcp_options, "host": data_host},
        "ucx": {"advertise_host": data_host, **ucx_limits(tcp_options)},
        "gloo": {"advertise_host": data_host},
        "nccl": {"advertise_host": data_host},
    }
    return {
        name: make_transport(name, region, receiver_options=options.get(name)) for name in names
    }


def ucx_limits(tcp_options: Mapping[str, Any]) -> dict[str, Any]:
    """The ucx receiver gets the tcp receiver's listener-wide connection limit and
    deadlines (not the per-host one: ucxx does not tell a listener who connected)."""
    names = {
        "max_connections": "max_connections",
        "header_timeout_s": "handshake_timeout_s",
        "between_frames_timeout_s": "idle_timeout_s",
    }
    return {names[k]: v for k, v in tcp_options.items() if k in names}


def failure_kind(exc: BaseException) -> ErrorKind:
    """The kind of a transfer that failed with `exc`: a peer's refusal keeps the peer's
    kind; a peer or data plane that stopped answering in time is TIMEOUT; one that is gone
    or broke the connection is UNAVAILABLE."""
    if isinstance(exc, MemServeError):
        return exc.kind
    if isinstance(exc, RpcClosed):
        return ErrorKind.UNAVAILABLE
    if isinstance(exc, RpcError):
        return exc.kind
    if isinstance(exc, TimeoutError):  # RpcTimeout, TransferTimeout
        return ErrorKind.TIMEOUT
    if isinstance(exc, TransferError | ConnectionError):
        return ErrorKind.UNAVAILABLE
    return error_kind(exc)
