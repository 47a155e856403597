"""Decode steps replayed from captured CUDA graphs (the CUDA-graph runner of vLLM and SGLang).

A decode-only step of a small model is hundreds of short kernels, each launched from
Python: on a GPU the launches, not the arithmetic, set its time. The runner records the
model's decode forward once per bucket (batch size B, block-table width W) as a CUDA graph
over static input buffers, and replays it: one launch per step.

A step of D decodes whose longest block table is n blocks wide runs in the smallest
bucket with B >= D and W >= n (none: the step runs eagerly). Its inputs are copied into
the static buffers; table columns past n hold block 0, masked by the context lengths as
in an eager step. Rows D..B-1 repeat row 0 (token, position, slot, table, context
length), so they compute and write row 0's K/V into row 0's slot: the cache ends as the
unpadded step leaves it, with no scratch block reserved (bit for bit where the kernels
give identical rows identical results, as the CPU's do; a GPU GEMM that splits K
differently per tile may differ in the last bits, and which duplicate write lands is
unspecified). Their outputs are dropped. The graphs' memory pool keeps the largest
bucket's intermediates (the padded gather of B x W blocks) for the engine's life.

Invariants:
- A graph reads the parameters, the KV cache and the static buffers at the addresses they
  had when it was captured. `run` compares a fingerprint of those addresses (the model's
  parameters, the cache tensor) with the one the graphs were captured under and drops
  every graph when it changed (a KunServe drop or restore, an arena move, another cache):
  the next steps capture anew.
- The returned hidden states are rows of the graph's output buffer, valid until the next
  `run` (the runner turns them into logits at once).
- Graphs are captured on first use of a bucket; the capture itself runs the step once
  (its warm-up), which the replay then repeats with the same inputs and the same writes.
  A capture that raises leaves that bucket to eager steps (logged once; tried again
  after the next fingerprint change).

The bucketing, padding and recapture logic is the same whatever records the step:
`CudaGraphCapture` on CUDA, `eager_capture` (the step run as is, over the static buffers)
where CUDA is absent, which is how the CPU test suite checks the padding against the
plain step.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from services.worker.attention import AttentionMetadata
from services.worker.kv_cache import KVCache
from services.worker.model.llama import LlamaModel

log = logging.getLogger(__name__)

Step = Callable[[], torch.Tensor]


class Capture(Protocol):
    """Records a step (a closure over static buffers) and returns what replays it."""

    def __call__(self, step: Step) -> Step: ...


def eager_capture(step: Step) -> Step:
    """No recording: each replay runs the step as written (CPU test suite, debugging)."""
    return step


class CudaGraphCapture:
    """torch.cuda.CUDAGraph capture sharing one memory pool across buckets (graphs replay
    one at a time, so their intermediates may share memory)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def reset(self) -> None:
        """A fresh pool for the next captures, once every graph is dropped: torch keeps a
        pool whose graphs are all gone but whose blocks are not (the cuBLAS workspace of
        the capture stream) at a use count of 0, and asserts on capturing into it again."""
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, step: Step) -> Step:
        # Warm-up on a side stream first, as torch requires: lazy initialisations and the
        # allocator's first blocks stay out of the graph.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (a KV transfer, a parameter restore)
        # does not break this capture; only this thread's unsafe calls would.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 beyond (vLLM's spacing), ending at
    max_batch: padding wastes at most a few rows where it matters."""
    sizes = {1, 2, 4, 8}
    sizes.update(range(16, 65, 8))
    sizes.update(range(80, max_batch + 1, 16))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


def width_buckets(max_blocks: int) -> list[int]:
    """Powers of two, ending at max_blocks: a step gathers at most twice its longest table."""
    widths = []
    w = 1
    while w < max_blocks:
        widths.append(w)
        w *= 2
    return [*widths, max_blocks]


def _smallest_at_least(sizes: Sequence[int], n: int) -> int | None:
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    """Captured decode steps of one full model (embedding through last layer) over one
    KV cache; see the module docstring."""

    def __init__(
        self,
        model: LlamaModel,
        max_batch: int,
        max_blocks: int,
        capture: Capture,
    ):
        if not holds_whole_model(model):
            raise ValueError("decode graphs need a model holding every layer and its embedding")
        if max_batch <= 0 or max_blocks <= 0:
            raise ValueError(f"max_batch {max_batch} and max_blocks {max_blocks} must be > 0")
        self.batch_sizes = batch_buckets(max_batch)
        self.widths = width_buckets(max_blocks)
        self.capture = capture
        dev = model.device
        b = self.batch_sizes[-1]

        def buffer() -> torch.Tensor:
            return torch.zeros(b, dtype=torch.long, device=dev)

        self.ids, self.positions = buffer(), buffer()
        self.slot_blocks, self.slot_offsets = buffer(), buffer()
        self.ctx_lens = torch.ones(b, dtype=torch.long, device=dev)
        self.tables = {w: torch.zeros(b, w, dtype=torch.long, device=dev) for w in self.widths}
        self._graphs: dict[tuple[int, int], Step] = {}
        self._failed: set[tuple[int, int]] = set()  # buckets whose capture raised: eager
        self._fingerprint: tuple[int, ...] = ()
        # The modules and parameters the fingerprint reads, held (not just their ids) so
        # that a replaced module's id cannot come back as another's. Walking
        # model.parameters() anew every step cost ~0.75 ms on a 30-layer model.
        self._holders: tuple[object, ...] = ()
        self._params: list[torch.Tensor] = []
        self.captures = 0  # graphs recorded so far (recaptures included)
        self.replays = 0  # steps served by a graph
        self.misses = 0  # decode-only steps no bucket fits (run eagerly)

    def bucket(self, decodes: int, width: int) -> tuple[int, int] | None:
        """(B, W) for a step of `decodes` rows whose longest table is `width` blocks."""
        b = _smallest_at_least(self.batch_sizes, decodes)
        w = _smallest_at_least(self.widths, width)
        return None if b is None or w is None or decodes <= 0 else (b, w)

    def run(
        self, model: LlamaModel, cache: KVCache, ids: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """Hidden states [D, hidden] of a decode-only step (what `model(embed(ids), meta,
        cache)` returns), or None when no bucket fits it (the caller runs it eagerly)."""
        table, lens = meta.decode_block_tables, meta.decode_ctx_lens
        d = meta.num_decodes
        if meta.prefills or table is None or lens is None or d != ids.shape[0]:
            return None
        if not holds_whole_model(model):  # a stage after a KunServe drop: eager
            return None
        key = self.bucket(d, table.shape[1])
        if key is None:
            self.misses += 1
            return None
        fingerprint = self._addresses(model, cache)
        if fingerprint != self._fingerprint:
            self._graphs.clear()
            self._failed.clear()
            reset = getattr(self.capture, "reset", None)
            if reset is not None:
                reset()
            self._fingerprint = fingerprint
        if key in self._failed:
            self.misses += 1
            return None
        b, w = key
        self._fill(b, w, ids, meta)
        replay = self._graphs.get(key)
        if replay is None:
            try:
                replay = self.capture(self._step(model, cache, b, w))
            except RuntimeError as exc:
                # The step itself is sound (it runs eagerly next): a failed capture costs
                # this bucket its graph, never a request.
                log.warning("decode graph (batch %d, width %d) not captured: %s", b, w, exc)
                self._failed.add(key)
                self.misses += 1
                return None
            self._graphs[key] = replay
            self.captures += 1
        self.replays += 1
        return replay()[:d]

    def _addresses(self, model: LlamaModel, cache: KVCache) -> tuple[int, ...]:
        """Where a captured graph reads its parameters and KV cache. Parameter objects
        are kept for a module's life (a load, restore or arena move rebinds their data);
        new modules (a restore of dropped layers) make the list be gathered again."""
        holders = (model, model.embed_tokens, model.norm, model.lm_head, *model.layers)
        if len(holders) != len(self._holders) or any(
            a is not b for a, b in zip(holders, self._holders, strict=True)
        ):
            self._holders = holders
            self._params = list(model.parameters())
        return (cache.tensor.data_ptr(), *(p.data_ptr() for p in self._params))

    def _fill(self, b: int, w: int, ids: torch.Tensor, meta: AttentionMetadata) -> None:
        """The step's inputs into rows [0, b) of the static buffers, rows past D repeating
        row 0, table columns past its width holding block 0."""
        assert meta.decode_block_tables is not None and meta.decode_ctx_lens is not None
        d = meta.num_decodes
        dev = ids.device
        rows = torch.zeros(b, dtype=torch.long, device=dev)
        rows[:d] = torch.arange(d, device=dev)
        self.ids[:b].copy_(ids[rows])
        self.positions[:b].copy_(meta.positions[rows])
        self.slot_blocks[:b].copy_(meta.slot_blocks[rows])
        self.slot_offsets[:b].copy_(meta.slot_offsets[rows])
        self.ctx_lens[:b].copy_(meta.decode_ctx_lens[rows])
        table = self.tables[w]
        n = meta.decode_block_tables.shape[1]
        table[:b, :n].copy_(meta.decode_block_tables[rows])
        table[:b, n:].zero_()

    def _step(self, model: LlamaModel, cache: KVCache, b: int, w: int) -> Step:
        """The decode forward of bucket (b, w) over the static buffers."""

        def step() -> torch.Tensor:
            meta = AttentionMetadata(
                slot_blocks=self.slot_blocks[:b],
                slot_offsets=self.slot_offsets[:b],
                positions=self.positions[:b],
                num_decodes=b,
                decode_block_tables=self.tables[w][:b],
                decode_ctx_lens=self.ctx_lens[:b],
            )
            return model(model.embed(self.ids[:b]), meta, cache)

        return step


def holds_whole_model(model: LlamaModel) -> bool:
    """Embedding through the last layer: what a captured step runs."""
    return model.has_embed and model.is_first and model.is_last
