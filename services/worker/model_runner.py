"""Turns a scheduled step into tensors, runs the model and returns the last-token logits.

The runner owns the device side: the model and the KV cache. The scheduler and block pool
are CPU bookkeeping only and never touch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.attention import AttentionMetadata, PrefillSpan
from services.worker.decode_graphs import DecodeGraphs
from services.worker.kv_cache import KVCache
from services.worker.model.llama import LlamaModel
from services.worker.request import Request
from services.worker.scheduler import ScheduledChunk


@dataclass
class StepResult:
    # Requests whose every known token is now computed, in the order of `logits` rows.
    sampled_requests: list[Request]
    logits: torch.Tensor  # [len(sampled_requests), vocab]


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache):
        if cache.layout.num_layers != model.num_local_layers:
            raise ValueError(
                f"KV cache holds {cache.layout.num_layers} layers, model stage has {model.num_local_layers}"
            )
        self.model = model
        self.cache = cache
        self.block_size = cache.layout.block_size
        self.device = model.device
        # Decode-only steps replayed from captured graphs (CUDA; set by the engine).
        self.graphs: DecodeGraphs | None = None

    def build_metadata(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[list[ScheduledChunk], list[int], AttentionMetadata]:
        """Orders decodes first and builds token ids and attention metadata for the step."""
        bs = self.block_size
        decodes = [c for c in chunks if c.num_tokens == 1 and c.request.num_computed_tokens > 0]
        prefills = [
            c for c in chunks if not (c.num_tokens == 1 and c.request.num_computed_tokens > 0)
        ]
        ordered = decodes + prefills
        token_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        for c in decodes:
            r = c.request
            pos = r.num_computed_tokens
            token_ids.append(r.token_ids[pos])
            positions.append(pos)
            slot_blocks.append(r.block_ids[pos // bs])
            slot_offsets.append(pos % bs)
        meta_prefills: list[PrefillSpan] = []
        q_start = len(decodes)
        for c in prefills:
            r = c.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + c.num_tokens
            token_ids.extend(r.token_ids[start:end])
            rng = range(start, end)
            positions.extend(rng)
            slot_blocks.extend(r.block_ids[p // bs] for p in rng)
            slot_offsets.extend(p % bs for p in rng)
            nblocks = -(-end // bs)
            meta_prefills.append(
                PrefillSpan(
                    q_start,
                    c.num_tokens,
                    end,
                    torch.tensor(r.block_ids[:nblocks], dtype=torch.long),
                )
            )
            q_start += c.num_tokens
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            num_decodes=len(decodes),
            prefills=meta_prefills,
        )
        if decodes:
            width = max(-(-(c.request.num_computed_tokens + 1) // bs) for c in decodes)
            table = [
                c.request.block_ids[:width] + [0] * (width - min(width, len(c.request.block_ids)))
                for c in decodes
            ]
            meta.decode_block_tables = torch.tensor(table, dtype=torch.long)
            meta.decode_ctx_lens = torch.tensor(
                [c.request.num_computed_tokens + 1 for c in decodes], dtype=torch.long
            )
        if self.device.type != "cpu":
            meta = to_device(meta, self.device)
        return ordered, token_ids, meta

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> StepResult:
        ordered, token_ids, meta = self.build_metadata(chunks)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        rows, sampled = sampled_rows(ordered)
        # Only the sampled rows leave the last layer (all of them in a decode step).
        keep = (
            None
            if len(rows) == len(token_ids)
            else torch.tensor(rows, dtype=torch.long, device=self.device)
        )
        hidden = None
        if self.graphs is not None and keep is None:  # run() declines non-decode steps
            hidden = self.graphs.run(self.model, self.cache, ids, meta)
        if hidden is None:
            hidden = self.model(self.model.embed(ids), meta, self.cache, rows=keep)
        logits = (
            self.model.compute_logits(hidden)
            if rows
            else hidden.new_empty((0, self.model.cfg.vocab_size))
        )
        return StepResult(sampled, logits.float())


def sampled_rows(ordered: list[ScheduledChunk]) -> tuple[list[int], list[Request]]:
    """The rows of a step's flat batch (chunks in `ordered`, the metadata's order) whose
    hidden states give logits: the last token of each chunk that completes its request's
    known tokens; and those requests, in row order."""
    rows: list[int] = []
    sampled: list[Request] = []
    offset = 0
    for c in ordered:
        offset += c.num_tokens
        if c.request.num_computed_tokens + c.num_tokens == c.request.num_tokens:
            rows.append(offset - 1)
            sampled.append(c.request)
    return rows, sampled


def to_device(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    return AttentionMetadata(
        slot_blocks=meta.slot_blocks.to(device, non_blocking=True),
        slot_offsets=meta.slot_offsets.to(device, non_blocking=True),
        positions=meta.positions.to(device, non_blocking=True),
        num_decodes=meta.num_decodes,
        decode_block_tables=mv(meta.decode_block_tables),
        decode_ctx_lens=mv(meta.decode_ctx_lens),
        prefills=[
            PrefillSpan(p.q_start, p.q_len, p.ctx_len, p.block_ids.to(device, non_blocking=True))
            for p in meta.prefills
        ],
    )
