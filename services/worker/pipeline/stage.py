"""A pipeline stage: runs its layer range on the hidden states of a `StageBatch`.

Pure and synchronous (the follower's shell owns the sockets, the leader calls its own
stage inline): `run(batch)` returns the batch for the next hop, or the `StageResult` the
last stage sends back to the leader. Batches of another epoch are refused: a group that
was dissolved and formed again must never write into the new group's KV.

A stage runs a fixed layer range (`layers`, default: every layer its model holds), so a
model may hold more than it serves: during a live restore the follower's model loads its
missing layers in another thread while this stage keeps running its own (see
`LlamaModel`'s concurrency invariant). A batch's `copies` move KV between this stage's
sub-blocks before the layers run (blocks leaving a retired id).
"""

from __future__ import annotations

import time

import msgspec
import torch

from common.protocol.stage import StageBatch, StageResult
from services.worker.kv_cache import KVCache
from services.worker.model.llama import LlamaModel
from services.worker.pipeline.metadata import local_copies, local_metadata
from services.worker.pipeline.views import copy_sub_blocks


class StaleBatch(RuntimeError):
    pass


class StageServer:
    def __init__(
        self,
        model: LlamaModel,
        cache: KVCache,
        table: torch.Tensor,
        *,
        epoch: int,
        last: bool,
        layers: range | None = None,
    ):
        """`table[group id]` = this stage's sub-block id; `last`: returns results to the
        leader; `layers`: the layers this stage runs (default: the model's held range),
        KV cache layer i holding layer `layers.start + i`."""
        if layers is None:
            layers = range(model.first_layer, model.last_layer)
        if not model.first_layer <= layers.start < layers.stop <= model.last_layer:
            raise ValueError(
                f"stage layers {layers!r} outside the model's [{model.first_layer}, "
                f"{model.last_layer})"
            )
        if cache.layout.num_layers != len(layers):
            raise ValueError(
                f"stage KV holds {cache.layout.num_layers} layers, the stage runs {len(layers)}"
            )
        self.model = model
        self.layers = layers
        self.cache = cache
        self.table = table
        self.epoch = epoch
        self.last = last
        self.batches = 0
        self.busy_s = 0.0  # time spent running batches (the rest is this stage's bubble)
        self.started = time.monotonic()

    def busy(self) -> dict[str, float]:
        """Batches run, seconds busy and seconds since the stage started (bubble ratio =
        1 - busy / elapsed)."""
        return {
            "batches": self.batches,
            "busy_s": self.busy_s,
            "elapsed_s": time.monotonic() - self.started,
        }

    @torch.inference_mode()
    def run(self, batch: StageBatch) -> StageBatch | StageResult:
        if batch.epoch != self.epoch:
            raise StaleBatch(f"batch of epoch {batch.epoch}, this stage serves {self.epoch}")
        t0 = time.perf_counter()
        try:
            return self._run(batch)
        finally:
            self.busy_s += time.perf_counter() - t0

    def _run(self, batch: StageBatch) -> StageBatch | StageResult:
        device = self.model.device
        if batch.copies:
            copy_sub_blocks(self.cache, local_copies(batch.copies, self.table))
        meta = local_metadata(batch, self.table, self.cache.layout.block_size, device)
        # The last stage returns the sampled rows only: its last layer runs just those.
        keep = batch.return_rows.to(device) if self.last else None
        hidden = self.model(
            batch.hidden.to(device), meta, self.cache, layers=self.layers, rows=keep
        )
        self.batches += 1
        if self.last:
            return StageResult(batch.epoch, batch.step, batch.mb, hidden.cpu())
        return msgspec.structs.replace(batch, hidden=hidden.cpu())
