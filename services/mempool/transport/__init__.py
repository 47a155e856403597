"""KV block transports of the MemPool daemon: shm (same host), tcp, ucx (optional).

See `base.py` for the interface and the invariants every transport keeps.

Authentication: tcp, ucx and gloo (nccl) connections start with the mutual HMAC handshake
of `handshake.py` (both ends prove the cluster key before a region byte moves). shm and
cuda-ipc need none of their own: they are same-host only, the peer learns the segment's
name / IPC handle only from a `Prepared` reply on the CURVE-authenticated control plane,
and shm segments are created owner-only (file permissions), so only a member process of
the same user can map them.
"""

from services.mempool.transport.base import (
    ChecksumMismatch,
    CopyRun,
    PeerNotMember,
    Receiver,
    Sender,
    TransferError,
    TransferRejected,
    TransferTimeout,
    coalesce,
)
from services.mempool.transport.registry import (
    available_transports,
    make_transport,
    transport_classes,
)

__all__ = [
    "ChecksumMismatch",
    "CopyRun",
    "PeerNotMember",
    "Receiver",
    "Sender",
    "TransferError",
    "TransferRejected",
    "TransferTimeout",
    "available_transports",
    "coalesce",
    "make_transport",
    "transport_classes",
]
