"""A pipeline stage: runs its layer range on the hidden states of a `StageBatch`.

Pure and synchronous (the follower's shell owns the sockets, the leader calls its own
stage inline): `run(batch)` returns the batch for the next hop, or the `StageResult` the
last stage sends back to the leader. Batches of another epoch are refused: a group that
was dissolved and formed again must never write into the new group's KV.
"""

from __future__ import annotations

import msgspec
import torch

from common.protocol.stage import StageBatch, StageResult
from services.worker.kv_cache import KVCache
from services.worker.model.llama import LlamaModel
from services.worker.pipeline.metadata import local_metadata


class StaleBatch(RuntimeError):
    pass


class StageServer:
    def __init__(
        self, model: LlamaModel, cache: KVCache, table: torch.Tensor, *, epoch: int, last: bool
    ):
        """`table[group id]` = this stage's sub-block id; `last`: returns results to the leader."""
        if cache.layout.num_layers != model.num_local_layers:
            raise ValueError(
                f"stage KV holds {cache.layout.num_layers} layers, its model {model.num_local_layers}"
            )
        self.model = model
        self.cache = cache
        self.table = table
        self.epoch = epoch
        self.last = last
        self.batches = 0

    @torch.inference_mode()
    def run(self, batch: StageBatch) -> StageBatch | StageResult:
        if batch.epoch != self.epoch:
            raise StaleBatch(f"batch of epoch {batch.epoch}, this stage serves {self.epoch}")
        device = self.model.device
        meta = local_metadata(batch, self.table, self.cache.layout.block_size, device)
        hidden = self.model(batch.hidden.to(device), meta, self.cache)
        self.batches += 1
        if self.last:
            rows = hidden[batch.return_rows.to(device)].cpu()
            return StageResult(batch.epoch, batch.step, batch.mb, rows)
        return msgspec.structs.replace(batch, hidden=hidden.cpu())
