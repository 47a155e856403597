"""The instance arena (kunserve-plan.md §4.4): one byte buffer of B bytes that holds both
the KV blocks and the model's parameters, so memory a parameter drop frees becomes KV.

    offset 0                          kv_bytes        param_bottom                  size
    [ KV block 0 | block 1 | ... ]    ......free......[ param n | ... | param 1 | param 0 ]

KV grows up from the bottom, parameters are packed down from the top. On a GPU the buffer
is the daemon's device region mapped by CUDA IPC (`place_in_region`): one cudaMalloc, one
IPC handle, and the worker's parameters are views into it, so a drop that frees parameter
bytes frees bytes the daemon can hand out as KV blocks (a torch allocation freed by a drop
would go back to torch's caching allocator, where the daemon's KV cannot use it). On CPU
the buffer is any uint8 tensor (the tests use a plain one).

Lifecycle (the worker pauses its pipeline around each step; nothing here is thread-safe):

    arena = ParamArena(buffer, kv_bytes=capacity * block_bytes)
    arena.place(model)                      # parameters copied in, `param.data` rebound
    model.drop_layers(keep, ...)            # dropped params emptied: the arena forgets them
    arena.compact(model)                    # kept params moved to the top; returns the new
                                            # param_bottom: KV may now grow up to it
    arena.set_kv_bytes(...)                 # the KV the daemon now hands out
    ... restore: the caller shrinks KV to <= arena.reserve_for(arena.restore_bytes(model))
    arena.set_kv_bytes(...); arena.restore(model, folder)

Invariants (`check_integrity`): every parameter of the model is a view into the buffer at
the offset recorded for it; recorded ranges are aligned, disjoint, inside
[max(kv_bytes, param_bottom), size); nothing else is recorded. Each parameter occupies
`align_up(nbytes)` bytes; `footprint` (= size - param_bottom) is what the instance's budget
must count as parameter memory (== `param_bytes` when every tensor is a multiple of
`align`, as in the presets).

Compaction costs one copy of each kept tensor that moves (on a GPU one device memcpy of
about the kept parameter bytes); moves go up, the highest tensor first, so a tensor's
destination never holds a tensor not yet moved; a tensor whose own source and destination
overlap is moved in chunks through a bounded scratch buffer (torch refuses overlapping
copies).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from services.worker.model.llama import LlamaModel

DEFAULT_ALIGN = 256  # cudaMalloc's base alignment; enough for any dtype and vector load
DEFAULT_SCRATCH_BYTES = 64 * 1024 * 1024


class ArenaError(ValueError):
    """A placement that does not fit, or a request that would break the arena's layout."""


@dataclass
class _Slot:
    param: nn.Parameter
    offset: int
    nbytes: int


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ParamArena:
    """Parameters of one model packed at the top of `buffer`; see the module docstring."""

    def __init__(
        self,
        buffer: torch.Tensor,
        *,
        kv_bytes: int = 0,
        align: int = DEFAULT_ALIGN,
        scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
    ) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise ArenaError("the arena needs a contiguous 1-D uint8 tensor")
        if align <= 0 or align & (align - 1) or align < 16:
            raise ArenaError(f"align must be a power of two >= 16, got {align}")
        if buffer.data_ptr() % 16:
            raise ArenaError("the arena's base address must be 16-byte aligned")
        if not 0 <= kv_bytes <= buffer.numel():
            raise ArenaError(f"kv_bytes {kv_bytes:,} outside [0, {buffer.numel():,}]")
        if scratch_bytes < 1:
            raise ArenaError("scratch_bytes must be >= 1")
        self.buffer = buffer
        self.size = buffer.numel()
        self.align = align
        self.scratch_bytes = scratch_bytes
        self.kv_bytes = kv_bytes
        self._slots: list[_Slot] = []  # sorted by offset, highest first

    # -- layout --------------------------------------------------------------------------

    @property
    def param_bottom(self) -> int:
        """Lowest parameter offset (`size` when the arena holds none): KV may grow to it."""
        return self._slots[-1].offset if self._slots else self.size

    @property
    def param_bytes(self) -> int:
        """Bytes of the placed tensors (== `model.param_bytes()` of the placed model)."""
        return sum(s.nbytes for s in self._slots)

    @property
    def footprint(self) -> int:
        """Bytes the parameters occupy, padding included: what the budget counts."""
        return self.size - self.param_bottom

    def aligned(self, nbytes: int) -> int:
        """The bytes a tensor of `nbytes` occupies."""
        return -(-nbytes // self.align) * self.align

    def kv_limit_blocks(self, block_bytes: int) -> int:
        """The most KV blocks of `block_bytes` below the parameters."""
        return self.param_bottom // block_bytes

    def set_kv_bytes(self, kv_bytes: int) -> None:
        """Record that KV now uses [0, kv_bytes); refused if that reaches the parameters."""
        if not 0 <= kv_bytes <= self.param_bottom:
            raise ArenaError(
                f"KV of {kv_bytes:,} bytes would overlap the parameters at {self.param_bottom:,}"
            )
        self.kv_bytes = kv_bytes

    def view(self, offset: int, nbytes: int, like: torch.Tensor) -> torch.Tensor:
        """The arena bytes [offset, offset + nbytes) as a tensor of `like`'s dtype/shape."""
        return self.buffer[offset : offset + nbytes].view(like.dtype).view(like.shape)

    # -- place / compact / restore ---------------------------------------------------------

    def place(self, model: LlamaModel) -> int:
        """Move every parameter of `model` not yet in the arena below the current ones
        (the top of the arena for a fresh one), rebind `param.data` to the arena views, and
        return the bytes placed. Refused, with nothing changed, if they do not fit above
        `kv_bytes`. The model's own tensors are freed (unless referenced elsewhere)."""
        placed = {id(s.param) for s in self._slots}
        new = [p for p in model.parameters() if id(p) not in placed]
        need = sum(self.aligned(_nbytes(p)) for p in new)
        room = self.param_bottom - self.kv_bytes
        if need > room:
            raise ArenaError(
                f"{need:,} parameter bytes ({len(new)} tensors, {self.align}-byte aligned) do "
                f"not fit: {room:,} bytes free between KV ({self.kv_bytes:,}) and the "
                f"parameters ({self.param_bottom:,}) of a {self.size:,}-byte arena"
            )
        top = self.param_bottom
        with torch.no_grad():
            for p in new:
                n = _nbytes(p)
                top = self._align_down(top - n)
                view = self.view(top, n, p.data)
                view.copy_(p.data)
                p.data = view
                self._slots.append(_Slot(p, top, n))
        _release(self.buffer.device)
        return sum(_nbytes(p) for p in new)

    def compact(self, model: LlamaModel) -> int:
        """After `model.drop_layers(...)`: forget the parameters the model no longer holds,
        move the kept ones up so they are contiguous at the top again, rebind them, and
        return the new `param_bottom`."""
        held = {id(p) for p in model.parameters()}
        unknown = held - {id(s.param) for s in self._slots}
        if unknown:
            raise ArenaError(f"{len(unknown)} parameters of the model are not in the arena")
        self._slots = [s for s in self._slots if id(s.param) in held]
        top = self.size
        with torch.no_grad():
            for s in self._slots:  # highest first: every move goes up (see module docstring)
                dst = self._align_down(top - s.nbytes)
                assert dst >= s.offset, "compaction moves down: slots out of order"
                if dst != s.offset:
                    self._move_up(s.offset, dst, s.nbytes)
                    s.param.data = self.view(dst, s.nbytes, s.param.data)
                    s.offset = dst
                top = dst
        _release(self.buffer.device)  # the scratch, and the copies done before KV grows
        return self.param_bottom

    def restore_bytes(self, model: LlamaModel) -> int:
        """The arena bytes `restore` will place: the missing parameters of the whole model,
        each aligned (shapes from a meta-device twin; nothing is allocated)."""
        whole = LlamaModel(model.cfg, dtype=model.dtype, device="meta", max_positions=1)
        held = set(_global_names(model))
        return sum(self.aligned(_nbytes(p)) for n, p in whole.named_parameters() if n not in held)

    def reserve_for(self, nbytes: int) -> int:
        """The `param_bottom` after `nbytes` more arena bytes of parameters: the caller
        shrinks KV to at most this first (`set_kv_bytes`). Refused if the arena is too small
        even with no KV at all."""
        bottom = self.param_bottom - nbytes
        if bottom < 0:
            raise ArenaError(
                f"{nbytes:,} more parameter bytes do not fit below the parameters at "
                f"{self.param_bottom:,} (arena of {self.size:,} bytes)"
            )
        return bottom

    def restore(self, model: LlamaModel, folder: Path) -> int:
        """Back to the whole model: build the missing modules on the host
        (`model.restore_layers(folder, build_on=cpu)`), copy them into the arena below the
        kept parameters, rebind. Returns the parameter bytes loaded. Refused, with nothing
        changed, unless `restore_bytes(model)` fits between KV and the parameters."""
        need = self.restore_bytes(model)
        if need > self.param_bottom - self.kv_bytes:
            raise ArenaError(
                f"restore needs {need:,} arena bytes but only "
                f"{self.param_bottom - self.kv_bytes:,} are free above KV ({self.kv_bytes:,}): "
                "shrink KV to reserve_for(restore_bytes(model)) first"
            )
        loaded = model.restore_layers(folder, build_on=torch.device("cpu"))
        placed = self.place(model)
        assert placed == loaded, (placed, loaded)
        return loaded

    # -- checks ------------------------------------------------------------------------------

    def check_integrity(self, model: LlamaModel) -> None:
        """Raise AssertionError unless the invariants of the module docstring hold."""
        base = self.buffer.data_ptr()
        slots = {id(s.param): s for s in self._slots}
        params = list(model.parameters())
        assert {id(p) for p in params} == set(slots), "arena and model disagree on parameters"
        for p in params:
            s = slots[id(p)]
            assert p.data_ptr() == base + s.offset, f"parameter not at its slot {s.offset}"
            assert _nbytes(p) == s.nbytes and p.is_contiguous(), "parameter size changed"
            assert p.device == self.buffer.device
        end = self.size
        for s in self._slots:  # highest first
            assert s.offset % self.align == 0, f"slot {s.offset} is not aligned"
            assert s.offset + s.nbytes <= end, f"slot {s.offset} overlaps the one above"
            end = s.offset
        assert self.kv_bytes <= self.param_bottom, "parameters overlap the KV range"

    # -- internals ---------------------------------------------------------------------------

    def _align_down(self, offset: int) -> int:
        return offset // self.align * self.align

    def _move_up(self, src: int, dst: int, n: int) -> None:
        """Copy arena bytes [src, src+n) to [dst, dst+n), dst > src; the ranges may overlap.
        Overlapping: chunks from the top down, each staged through a scratch tensor (a
        chunk's destination is then either its own bytes or bytes already moved)."""
        buf = self.buffer
        if dst - src >= n:
            buf[dst : dst + n].copy_(buf[src : src + n])
            return
        chunk = min(n, self.scratch_bytes)
        scratch = torch.empty(chunk, dtype=torch.uint8, device=buf.device)
        end = n
        while end > 0:
            start = max(0, end - chunk)
            size = end - start
            scratch[:size].copy_(buf[src + start : src + end])
            buf[dst + start : dst + end].copy_(scratch[:size])
            end = start


def place_in_region(
    model: LlamaModel, region_tensor: torch.Tensor, kv_bytes: int, *, align: int = DEFAULT_ALIGN
) -> ParamArena:
    """The worker's attach on a GPU with a budget: put `model`'s parameters at the top of
    the daemon's region (`CudaRegion.tensor()`, mapped over the whole budget B: attach with
    `nbytes=InfoReply.budget_bytes`), KV using [0, kv_bytes). Report `arena.footprint` as
    the resident parameter bytes (`SetParams`): it is what the budget must count."""
    if region_tensor.device.type != model.device.type:
        raise ArenaError(f"region on {region_tensor.device}, model on {model.device}")
    arena = ParamArena(region_tensor, kv_bytes=kv_bytes, align=align)
    arena.place(model)
    return arena


def _global_names(model: LlamaModel) -> list[str]:
    """Parameter names with layer indices in the whole model (`layers[i]` is layer
    `first_layer + i`), as a whole model would name them."""
    out = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "layers":
            parts[1] = str(model.first_layer + int(parts[1]))
        out.append(".".join(parts))
    return out


def _release(device: torch.device) -> None:
    """Finish the copies and hand replaced tensors back. CUDA: synchronize, because the
    daemon (another process) hands the freed range out as KV as soon as we report it, and
    its writers do not order after our stream; then empty torch's caching allocator, which
    keeps freed blocks (the model's old tensors, compaction scratch) until asked. The
    arena's memory is the daemon's and is never freed here."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
