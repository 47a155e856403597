"""Attention metadata in group block ids, and its view on one stage.

The leader builds a step's metadata once (`ModelRunner.build_metadata` over the requests'
group block ids); every stage, the leader included, maps those ids to its own sub-block
ids with its table (`local = table[group]`) before running its layers. Only block ids
differ between stages; positions, offsets and spans are shared.
"""

from __future__ import annotations

import torch

from common.protocol.stage import StageBatch
from services.worker.attention import AttentionMetadata, PrefillSpan
from services.worker.model_runner import to_device

_EMPTY = torch.zeros((0,), dtype=torch.long)


def to_stage_batch(
    meta: AttentionMetadata,
    *,
    epoch: int,
    step: int,
    mb: int,
    return_rows: list[int],
    hidden: torch.Tensor,
    copies: list[tuple[int, int]] | None = None,
) -> StageBatch:
    """`meta` in group ids (as built on the leader), with the hidden states for the next stage."""
    # Tensors travel through host memory (the codec frames CPU tensors; on CUDA this is the
    # host-staged hop, a no-op on CPU).
    meta = _to_host(meta)
    tables = meta.decode_block_tables
    spans = [(p.q_start, p.q_len, p.ctx_len) for p in meta.prefills]
    ids = torch.cat([p.block_ids for p in meta.prefills]) if meta.prefills else _EMPTY
    return StageBatch(
        epoch=epoch,
        step=step,
        mb=mb,
        positions=meta.positions,
        slot_blocks=meta.slot_blocks,
        slot_offsets=meta.slot_offsets,
        num_decodes=meta.num_decodes,
        decode_block_tables=tables if tables is not None else torch.zeros((0, 0), dtype=torch.long),
        decode_ctx_lens=meta.decode_ctx_lens if meta.decode_ctx_lens is not None else _EMPTY,
        prefill_spans=spans,
        prefill_block_ids=ids,
        return_rows=torch.tensor(return_rows, dtype=torch.long),
        hidden=hidden.cpu(),
        copies=list(copies or []),
    )


def _to_host(meta: AttentionMetadata) -> AttentionMetadata:
    if meta.slot_blocks.device.type == "cpu":
        return meta
    return AttentionMetadata(
        slot_blocks=meta.slot_blocks.cpu(),
        slot_offsets=meta.slot_offsets.cpu(),
        positions=meta.positions.cpu(),
        num_decodes=meta.num_decodes,
        decode_block_tables=(
            None if meta.decode_block_tables is None else meta.decode_block_tables.cpu()
        ),
        decode_ctx_lens=None if meta.decode_ctx_lens is None else meta.decode_ctx_lens.cpu(),
        prefills=[
            PrefillSpan(p.q_start, p.q_len, p.ctx_len, p.block_ids.cpu()) for p in meta.prefills
        ],
    )


def local_metadata(
    batch: StageBatch, table: torch.Tensor, block_size: int, device: torch.device | None = None
) -> AttentionMetadata:
    """The batch's metadata with this stage's sub-block ids (`table[group id]`), on
    `device` (the stage's; default: where the batch is)."""
    if device is not None and device.type != "cpu":
        return to_device(local_metadata(batch, table, block_size), device)
    spans: list[PrefillSpan] = []
    start = 0
    for q_start, q_len, ctx_len in batch.prefill_spans:
        n = -(-ctx_len // block_size)
        spans.append(
            PrefillSpan(q_start, q_len, ctx_len, table[batch.prefill_block_ids[start : start + n]])
        )
        start += n
    decodes = batch.num_decodes > 0
    return AttentionMetadata(
        slot_blocks=table[batch.slot_blocks],
        slot_offsets=batch.slot_offsets,
        positions=batch.positions,
        num_decodes=batch.num_decodes,
        decode_block_tables=table[batch.decode_block_tables] if decodes else None,
        decode_ctx_lens=batch.decode_ctx_lens if decodes else None,
        prefills=spans,
    )


def local_copies(copies: list[tuple[int, int]], table: torch.Tensor) -> list[tuple[int, int]]:
    """Group-id copies (src, dst) as this stage's sub-block ids."""
    return [(int(table[s]), int(table[d])) for s, d in copies]


def remap(meta: AttentionMetadata, table: torch.Tensor) -> AttentionMetadata:
    """`meta` (group ids) with this stage's ids: the leader's own view of a step."""
    return AttentionMetadata(
        slot_blocks=table[meta.slot_blocks],
        slot_offsets=meta.slot_offsets,
        positions=meta.positions,
        num_decodes=meta.num_decodes,
        decode_block_tables=(
            None if meta.decode_block_tables is None else table[meta.decode_block_tables]
        ),
        decode_ctx_lens=meta.decode_ctx_lens,
        prefills=[
            PrefillSpan(p.q_start, p.q_len, p.ctx_len, table[p.block_ids]) for p in meta.prefills
        ],
    )
