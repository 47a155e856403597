"""Transport names -> implementations; `ucx` only where the ucxx bindings import."""

from __future__ import annotations

import functools
import importlib
from typing import Any

from services.mempool.region import Region
from services.mempool.transport.base import Receiver, Sender

# name -> (module, receiver class, sender class); modules import lazily so that importing
# the package never pulls in ucxx (slow, and prints UCX warnings).
_TRANSPORTS: dict[str, tuple[str, str, str]] = {
    "shm": ("services.mempool.transport.shm", "ShmReceiver", "ShmSender"),
    "tcp": ("services.mempool.transport.tcp", "TcpReceiver", "TcpSender"),
    "ucx": ("services.mempool.transport.ucx", "UcxReceiver", "UcxSender"),
}


def available_transports() -> list[str]:
    """Transports usable in this process, in preference order for same-host peers."""
    return ["shm", "tcp", "ucx"] if _ucx_imports() else ["shm", "tcp"]


@functools.cache
def _ucx_imports() -> bool:
    try:
        importlib.import_module("ucxx")
    except Exception:  # a broken CUDA/UCX install raises more than ImportError
        return False
    return True


def transport_classes(name: str) -> tuple[type[Receiver], type[Sender]]:
    if name not in _TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}; known: {', '.join(_TRANSPORTS)}")
    if name not in available_transports():
        raise ValueError(f"transport {name!r} is not available here (ucxx does not import)")
    module_name, receiver_name, sender_name = _TRANSPORTS[name]
    module = importlib.import_module(module_name)
    receiver: type[Receiver] = getattr(module, receiver_name)
    sender: type[Sender] = getattr(module, sender_name)
    return receiver, sender


def make_transport(
    name: str,
    region: Region,
    *,
    receiver_options: dict[str, Any] | None = None,
    sender_options: dict[str, Any] | None = None,
) -> tuple[Receiver, Sender]:
    """A receiver over the daemon's `region` and a sender for `name` (not yet started)."""
    receiver_cls, sender_cls = transport_classes(name)
    return receiver_cls(region, **(receiver_options or {})), sender_cls(**(sender_options or {}))
