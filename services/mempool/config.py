"""MemPool daemon configuration: the `[mempool]` table of a config file (or a file of its own).

Sizes: a block holds `block_size` tokens of K and V for `num_layers` layers of the model
(all layers unless set), so `block_bytes` follows from the model's config.json. The device
tier holds `device_blocks` blocks (or as many as fit in `device_memory_bytes`); the region
reserves `device_max_blocks` so the pool can grow at run time without remapping.

Limits on what peers can make the daemon hold: the control socket accepts frames up to
`rpc_max_message_bytes()`; the tcp and ucx data-plane receivers admit
`data_max_connections` connections (`data_max_connections_per_host` from one host) and
close one that does not complete the data-plane handshake (transport/handshake.py) within
`data_header_timeout_s`; an authenticated tcp connection that sends no frame for
`data_idle_timeout_s` is closed too (ucx: its endpoint is aborted).

Memory budget (KunServe, budget.py): `budget_bytes` > 0 gives the instance one budget B
that its worker's resident parameters and the device tier share (invariant M:
params + KV capacity <= B). The region then reserves `B // block_bytes` blocks and starts
with `(B - P) // block_bytes`, P the whole model's parameter bytes from config.json (an
upper bound: a pipeline stage holds fewer); the worker's `SetParams` at attach corrects P
and grows the capacity. `device_blocks`, `device_memory_bytes` and `device_max_blocks`
are then not used. 0 (the default): no budget, the device tier is sized as above.
"""

from __future__ import annotations

import socket
from typing import Any

import msgspec

from common.kv_geometry import KVGeometry
from common.metrics import check_address
from common.sockets import DEFAULT_MAX_MESSAGE_BYTES
from services.mempool.budget import MemoryBudget


class MempoolConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    instance_id: str = "mempool-0"
    model: str = "tiny"
    dtype: str = "float32"
    block_size: int = 16
    # Where the device tier lives: "cpu" (a shared-memory segment) or "cuda[:N]" (device
    # memory the worker maps by CUDA IPC; needs the `cuda` extra and a GPU).
    device: str = "cpu"
    num_layers: int | None = None
    device_blocks: int | None = None
    device_memory_bytes: int = 256 * 1024 * 1024
    device_max_blocks: int | None = None
    budget_bytes: int = 0  # > 0: params + KV device tier <= this (see above); 0: no budget
    # Commit and map the device blocks at start rather than at first touch (region.py).
    prefault: bool = True
    host_blocks: int = 0
    host_memory_bytes: int = 0
    # Named tensors (parameters, activations): a lazily committed shared-memory arena.
    tensor_memory_bytes: int = 256 * 1024 * 1024
    control_address: str = "tcp://127.0.0.1:0"
    events_address: str = "tcp://127.0.0.1:0"
    # Prometheus /metrics over HTTP (common/metrics.py): host:port, "" = off (loopback by
    # default; elsewhere it exposes counts only).
    metrics_address: str = "127.0.0.1:0"
    # Where same-host peers are recognised (shm transfers); other hosts use tcp or ucx.
    host_id: str = msgspec.field(default_factory=socket.gethostname)
    transports: list[str] = msgspec.field(default_factory=lambda: ["shm", "tcp"])
    data_host: str = "127.0.0.1"  # address the tcp/ucx/gloo/nccl receivers listen on
    transfer_timeout_s: float = 30.0
    # tcp data plane: connections over a limit are closed at once; each one holds a thread.
    data_max_connections: int = 64
    data_max_connections_per_host: int = 16
    # A sender writes a frame header as soon as it connects or finishes the previous frame;
    # a connection silent for longer is closed (the sender reconnects when it next sends).
    data_header_timeout_s: float = 5.0
    # An authenticated connection idle between transfers this long is closed; the sender
    # reconnects (and shakes hands again) when it next sends.
    data_idle_timeout_s: float = 30.0
    ttl_s: float | None = None
    admin_token: str = ""  # `status` / `shutdown` over the RPC socket need it
    log_level: str = "info"

    def validate(self) -> MempoolConfig:
        if self.block_size <= 0:
            raise ValueError(f"mempool.block_size must be > 0, got {self.block_size}")
        if self.device_blocks is not None and self.device_blocks <= 0:
            raise ValueError(f"mempool.device_blocks must be > 0, got {self.device_blocks}")
        if self.budget_bytes < 0:
            raise ValueError(f"mempool.budget_bytes must be >= 0, got {self.budget_bytes}")
        if self.host_blocks < 0 or self.host_memory_bytes < 0 or self.tensor_memory_bytes < 0:
            raise ValueError("mempool host tier and tensor sizes must be >= 0")
        if not self.transports:
            raise ValueError("mempool.transports must name at least one transport")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"mempool.dtype must be float32|float16|bfloat16, got {self.dtype!r}")
        if self.data_max_connections < 1 or self.data_max_connections_per_host < 1:
            raise ValueError("mempool.data_max_connections{,_per_host} must be >= 1")
        if self.data_header_timeout_s <= 0:
            raise ValueError(
                f"mempool.data_header_timeout_s must be > 0, got {self.data_header_timeout_s}"
            )
        if self.data_idle_timeout_s <= 0:
            raise ValueError(
                f"mempool.data_idle_timeout_s must be > 0, got {self.data_idle_timeout_s}"
            )
        check_address("mempool.metrics_address", self.metrics_address)
        kind, _, index = self.device.partition(":")
        if self.device != "cpu" and (kind != "cuda" or (index and not index.isdigit())):
            raise ValueError(
                f"mempool.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        return self

    def geometry(self) -> KVGeometry:
        """This daemon's KV block geometry, from the model's config.json alone."""
        return KVGeometry.for_model_name(self.model, self.block_size, self.dtype, self.num_layers)

    def device_block_count(self, block_bytes: int) -> int:
        """Blocks of the device tier at start: `device_blocks`, else as many as fit."""
        return self.device_blocks or max(1, self.device_memory_bytes // block_bytes)

    def memory_budget(self, block_bytes: int, param_bytes: int) -> MemoryBudget | None:
        """The instance's budget with `param_bytes` of parameters expected (None without
        one); refused if that leaves no room for one KV block."""
        if not self.budget_bytes:
            return None
        budget = MemoryBudget(self.budget_bytes, param_bytes, block_bytes)
        if budget.kv_capacity_blocks() < 1:
            raise ValueError(
                f"mempool.budget_bytes = {self.budget_bytes:,} leaves no room for one KV block "
                f"({block_bytes:,} bytes) beside {param_bytes:,} parameter bytes"
            )
        return budget

    def rpc_max_message_bytes(self) -> int:
        """The largest frame the control socket accepts: a `PutTensor` carries its tensor as
        one frame, which can be as large as the tensor arena; other requests (token lists)
        fit the sockets' default."""
        return max(DEFAULT_MAX_MESSAGE_BYTES, self.tensor_memory_bytes)

    def tcp_receiver_options(self) -> dict[str, Any]:
        """The `TcpReceiver` settings of this config (its connection limits)."""
        return {
            "max_connections": self.data_max_connections,
            "max_connections_per_host": self.data_max_connections_per_host,
            "header_timeout_s": self.data_header_timeout_s,
            "between_frames_timeout_s": self.data_idle_timeout_s,
        }
