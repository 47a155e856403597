"""Shared builders for the scheduler tests: heartbeats, KV event batches built from real
chained hashes (what a MemPool daemon publishes), prompts."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random

from common.protocol import kv_events as ev
from common.protocol.scheduler import Heartbeat, InstanceLoad
from common.tokens import ROOT_HASH, as_token_bytes, block_hashes

BLOCK_SIZE = 16


def heartbeat(
    instance_id: str,
    role: str = "colocated",
    *,
    started_at: float = 1.0,
    healthy: bool = True,
    events: str = "",
    mempool: str = "",
    control: str = "",
    block_bytes: int = 1024,
    load: InstanceLoad | None = None,
    incarnation: str = "",
    address: str = "",
) -> Heartbeat:
    return Heartbeat(
        instance_id,
        role,
        address=address or f"tcp://127.0.0.1:9/{instance_id}",
        mempool=mempool or f"tcp://127.0.0.1:8/{instance_id}",
        events=events,
        control=control,
        block_size=BLOCK_SIZE,
        block_bytes=block_bytes,
        started_at=started_at,
        load=load or InstanceLoad(),
        healthy=healthy,
        incarnation=incarnation,
    )


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 30000) for _ in range(n)]


def stored(
    tokens: list[int], tier: int = 0, parent_tokens: list[int] | None = None
) -> ev.BlockStored:
    """BlockStored for the whole blocks of `tokens`, hung below the whole blocks of
    `parent_tokens` (a prefix of tokens already stored), as the daemon's tree records it."""
    bb = BLOCK_SIZE * 4
    parent = ROOT_HASH
    skip = 0
    if parent_tokens:
        hashes = block_hashes(ROOT_HASH, as_token_bytes(parent_tokens), bb)
        parent, skip = hashes[-1], len(hashes) * BLOCK_SIZE
    whole = len(tokens) // BLOCK_SIZE * BLOCK_SIZE
    data = as_token_bytes(tokens[skip:whole])
    return ev.BlockStored(
        tier, parent_hash=parent, block_hashes=block_hashes(parent, data, bb), tokens=data
    )


def removed(tokens: list[int], first_block: int = 0, tier: int = 0) -> ev.BlockRemoved:
    """BlockRemoved for the whole blocks of `tokens` from block `first_block` on."""
    hashes = block_hashes(ROOT_HASH, as_token_bytes(tokens), BLOCK_SIZE * 4)
    return ev.BlockRemoved(tier, hashes[first_block:])


def batch(instance_id: str, seq: int, *events: ev.KvEvent) -> ev.KvEventBatch:
    return ev.KvEventBatch(instance_id, seq, block_size=BLOCK_SIZE, events=list(events))


async def cli(argv: list[str]) -> tuple[int, str, str]:
    """Run `memserve ARGV` in a thread (it runs its own event loop): exit code, stdout,
    stderr."""
    from services.cli import build_parser

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        args = build_parser().parse_args(argv)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = args.func(args)
        return code, out.getvalue(), err.getvalue()

    return await asyncio.to_thread(run)
