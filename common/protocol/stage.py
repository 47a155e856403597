"""The "stage" channel (KunServe pipeline groups): hidden states around the ring

    leader ──StageBatch──▶ stage 1 ──StageBatch──▶ ... ──▶ stage g-1 ──StageResult──▶ leader

over PUSH -> PULL sockets between the group's workers. One `StageBatch` is one microbatch
of one step: the attention metadata every stage shares (positions, offsets, spans) with
block ids in *group* ids, and the hidden states [T, H] the previous stage produced. Each
stage maps group ids to its own sub-block ids through the table it got at the drop (a
group block is one sub-block on every member), runs its layers and passes the result on.
The last stage returns only the rows whose logits the leader samples (`return_rows`).

Tensors travel as zero-copy frames (common/codec.py). Per hop, order is FIFO: a request's
chunk is written into a stage's KV before that stage sees the request's next chunk.

`copies` (group ids, (src, dst), in order) are KV moves every stage applies to its own
sub-blocks before it runs the batch (a live restore relocating blocks out of the ids it
retires). FIFO per hop makes them safe: every batch sent earlier, the one that last wrote
`src` included, has run on the stage first, and every later batch sees `dst`.
"""

from __future__ import annotations

import msgspec
import torch


class StageBatch(msgspec.Struct, tag=True, frozen=True, array_like=True):
    epoch: int  # the group's epoch: a stage drops batches of any other
    step: int  # the leader's step counter (for matching results and for logs)
    mb: int  # microbatch index in [0, g)
    positions: torch.Tensor  # [T] int64
    slot_blocks: torch.Tensor  # [T] group block receiving each token's K/V
    slot_offsets: torch.Tensor  # [T]
    num_decodes: int
    decode_block_tables: torch.Tensor  # [D, W] group ids ([0, 0] when D == 0)
    decode_ctx_lens: torch.Tensor  # [D]
    prefill_spans: list[tuple[int, int, int]]  # (q_start, q_len, ctx_len) per chunk
    prefill_block_ids: torch.Tensor  # every chunk's group block table, concatenated
    return_rows: torch.Tensor  # [S] rows whose hidden state goes back to the leader
    hidden: torch.Tensor  # [T, H]
    # (src, dst) group blocks, applied before the layers; a trailing default, so a batch
    # from a sender without it decodes (empty costs one byte: array_like keeps it)
    copies: list[tuple[int, int]] = []


class StageResult(msgspec.Struct, tag=True, frozen=True, array_like=True):
    epoch: int
    step: int
    mb: int
    hidden: torch.Tensor  # [S, H]: the rows of `return_rows`
    error: str = ""  # a stage failed this batch: the leader fails the step


StageMessage = StageBatch | StageResult
