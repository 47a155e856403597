"""Raw ZeroMQ sockets for tests that must send what the typed sockets never would
(malformed frames, floods), locked like any cluster socket unless told otherwise: a test
that wants its bad input to reach the code under test must first get past CURVE."""

from __future__ import annotations

import zmq
import zmq.asyncio

from common.security import CLUSTER, SocketSecurity
from common.sockets import get_context


def raw_socket(
    kind: int, security: SocketSecurity = CLUSTER, *, bind: bool = False
) -> zmq.asyncio.Socket:
    sock = get_context().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    security.apply(sock, bind=bind)
    return sock
