"""Engine configuration (the `[engine]` table of a worker's config file)."""

from __future__ import annotations

import msgspec


class EngineConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How one engine runs.

    The KV pool holds `num_kv_blocks` blocks when set, else as many as fit in
    `kv_cache_memory_bytes`. `max_model_len` defaults to the model's context length.

    `preemption_mode`: what happens to a running request the KV pool cannot hold
    (services/worker/scheduler.py): `recompute` drops its KV, `swap` moves it to a host
    tier and back. A worker swaps through its MemPool daemon's host tier (`mempool.
    host_blocks`); a standalone engine into a host buffer of `num_swap_blocks` blocks, else
    as many as fit in `swap_space_bytes` (allocated on the first swap-out).

    `kernels`: run float32 CPU models on this machine's compiled kernels (fused norms,
    rotary, SiLU-and-mul, paged decode attention: services/worker/kernels/); false, or a
    machine where they cannot be built, runs the same model in plain torch.

    `cuda_graphs`: on CUDA, decode-only steps of up to `max_num_seqs` sequences replay
    CUDA graphs captured per batch and block-table size (services/worker/decode_graphs.py);
    false runs every step eagerly (vLLM's `enforce_eager`). No effect on other devices.
    """

    model: str = "tiny"
    dtype: str = (
        "auto"  # auto | float32 | float16 | bfloat16; auto = float32 on CPU, bfloat16 on CUDA
    )
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    preemption_mode: str = "recompute"  # recompute | swap
    num_swap_blocks: int | None = None
    swap_space_bytes: int = 1024 * 1024 * 1024
    kernels: bool = True
    cuda_graphs: bool = True

    def validate(self) -> EngineConfig:
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "kv_cache_memory_bytes",
            "swap_space_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"engine.{name} must be > 0, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"engine.num_kv_blocks must be > 0, got {self.num_kv_blocks}")
        if self.num_swap_blocks is not None and self.num_swap_blocks < 0:
            raise ValueError(f"engine.num_swap_blocks must be >= 0, got {self.num_swap_blocks}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(
                f"engine.preemption_mode must be recompute|swap, got {self.preemption_mode!r}"
            )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"engine.dtype must be auto|float32|float16|bfloat16, got {self.dtype!r}"
            )
        return self
