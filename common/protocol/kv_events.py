"""The "kv_events" channel: MemPool daemon (PUB) -> global scheduler (SUB), topic = the
daemon's instance id.

Every change of what an instance has cached is published, so the scheduler keeps exact
global prompt trees instead of guessing (a TTL is only its safety net). Blocks are named
by chained hashes (`common.tokens.chain_hash`): a stored block carries its
parent's hash and the token ids of every block, so the tree can be rebuilt from events.
Batches are numbered per daemon; a gap in `seq` means events were lost (PUB/SUB drops
under pressure or while a subscriber connects) and the subscriber must resync: it asks the
daemon for an `IndexSnapshot` (common/protocol/mempool.py), numbered in the same sequence,
and applies the batches after it. seq 0 is a daemon's first batch (AllCleared).

A batch also names the PUB address it was published on (`events`, as the daemon gives it to
its workers, who name it in their heartbeats): the scheduler takes every daemon's batches on
one SUB socket and attributes each batch by that address, since a worker and its daemon may
be named apart. "" (an older daemon): attributed by `instance_id` alone.
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, tag=True, frozen=True, array_like=True):
    tier: int  # 0 device, 1 host
    parent_hash: int  # 0 for the root
    block_hashes: list[int]
    tokens: bytes  # int32 LE, block_size tokens per block hash


class BlockRemoved(msgspec.Struct, tag=True, frozen=True, array_like=True):
    tier: int
    block_hashes: list[int]


class AllCleared(msgspec.Struct, tag=True, frozen=True, array_like=True):
    """The daemon (re)started or was flushed: forget everything it had."""


KvEvent = BlockStored | BlockRemoved | AllCleared


class KvEventBatch(msgspec.Struct, frozen=True):
    instance_id: str
    seq: int
    block_size: int
    events: list[KvEvent]
    events_address: str = ""  # the PUB address it was published on (see above)
