"""KV block transports of the MemPool daemon: shm (same host), tcp, ucx (optional).

See `base.py` for the interface and the invariants every transport keeps.
"""

from services.mempool.transport.base import (
    ChecksumMismatch,
    CopyRun,
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
