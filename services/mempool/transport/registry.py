"""Transport names -> implementations, and which of them can move which memory here.

Host regions (shm segments, host tier, tensor arena): shm, tcp, ucx (where ucxx imports),
gloo (torch.distributed). Device regions (`CudaRegion`), where cupy sees a GPU: cuda-ipc
(same host) and nccl (where torch has NCCL). Modules import lazily, so importing the package pulls in neither ucxx (slow,
prints UCX warnings) nor torch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any

from services.mempool.region import Region
from services.mempool.transport.base import Receiver, Sender

# name -> (module, receiver class, sender class)
_TRANSPORTS: dict[str, tuple[str, str, str]] = {
    "shm": ("services.mempool.transport.shm", "ShmReceiver", "ShmSender"),
    "tcp": ("services.mempool.transport.tcp", "TcpReceiver", "TcpSender"),
    "ucx": ("services.mempool.transport.ucx", "UcxReceiver", "UcxSender"),
    "gloo": ("services.mempool.transport.collective", "GlooReceiver", "GlooSender"),
    "nccl": ("services.mempool.transport.collective", "NcclReceiver", "NcclSender"),
    "cuda-ipc": ("services.mempool.transport.cuda_ipc", "CudaIpcReceiver", "CudaIpcSender"),
}
_DEVICE_TRANSPORTS = ("cuda-ipc", "nccl")


def available_transports(memory: str = "host") -> list[str]:
    """Transports usable in this process for `memory` ("host" or "cuda"), in preference
    order for same-host peers."""
    if memory == "cuda":
        from services.mempool.cuda_region import cuda_available

        if not cuda_available():
            return []
        return ["cuda-ipc", "nccl"] if _nccl_usable() else ["cuda-ipc"]
    if memory != "host":
        raise ValueError(f"memory is 'host' or 'cuda', not {memory!r}")
    names = ["shm", "tcp"]
    if _ucx_imports():
        names.append("ucx")
    if importlib.util.find_spec("torch") is not None:
        names.append("gloo")  # torch's Linux and macOS builds always carry gloo
    return names


@functools.cache
def _ucx_imports() -> bool:
    try:
        importlib.import_module("ucxx")
    except Exception:  # a broken CUDA/UCX install raises more than ImportError
        return False
    return True


@functools.cache
def _nccl_usable() -> bool:
    from services.mempool.cuda_region import cuda_available

    if not cuda_available():
        return False
    try:
        import torch.distributed as dist

        return bool(dist.is_available() and dist.is_nccl_available())
    except Exception:
        return False


def transport_classes(name: str, memory: str = "host") -> tuple[type[Receiver], type[Sender]]:
    if name not in _TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}; known: {', '.join(_TRANSPORTS)}")
    if name not in available_transports(memory):
        if memory == "host" and name in _DEVICE_TRANSPORTS:
            why = "it moves device memory only"
        elif memory == "cuda":
            why = (
                "a CUDA region moves over cuda-ipc or nccl"
                if name not in _DEVICE_TRANSPORTS
                else "no CUDA/NCCL"
            )
        else:
            why = "its library does not import"
        raise ValueError(f"transport {name!r} is not available for {memory} memory here ({why})")
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
    receiver_cls, sender_cls = transport_classes(name, "host" if region.on_host else "cuda")
    return receiver_cls(region, **(receiver_options or {})), sender_cls(**(sender_options or {}))
