"""The "migrate" channel: live migration of one running request, with its KV, from one
instance to another (Llumnix-style; the KV-centric baseline KunServe compares with). Every
message goes to a worker's control socket (RPC), beside `AdminRequest` and the elastic
channel.

    memserve admin migrate RID DST ──▶ scheduler ──Migrate──▶ source worker
      source, while the request keeps decoding (at most `max_stages` live stages):
        Reserve(n) ──▶ destination: lease n blocks from its daemon, held aside ◀── Reserved
        MemPool Transfer (source daemon ─▶ destination daemon) of the full blocks not yet copied
      stop: pause between steps, Reserve the rest, Transfer the remaining blocks
        Arrive(state) ──▶ destination: adopt it with the blocks copied ◀── Arrived
      source: the request leaves its engine (its stream ends silently), resume
      ◀── Migrated (stages, blocks, bytes, pause)
    any failure: Cancel ──▶ destination (frees what it holds for the request); the request
    goes on at the source as if nothing happened ◀── MigrateRefused

A destination frees blocks reserved for a request that hears nothing more within
`Reserve.hold_s` (a source that died mid-migration).
"""

from __future__ import annotations

import msgspec

from common.protocol.elastic import RequestState


class Destination(msgspec.Struct, frozen=True, omit_defaults=True):
    instance_id: str
    control: str  # its worker's control RPC
    address: str  # its worker's request PULL
    mempool: str  # its MemPool daemon's RPC (where the KV goes)


class Migrate(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Scheduler -> source worker: move `request_id` to `dst` while it runs."""

    token: str
    request_id: str
    dst: Destination
    max_stages: int = 3  # live stages before the stop-and-copy one
    threshold_blocks: int = 2  # stop once at most this many blocks are left to copy
    timeout_s: float = 10.0  # for each call to the destination and each transfer


class Reserve(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Source -> destination: lease `n` more blocks for an incoming request, held aside
    (not in the destination engine's pool) until `Arrive` or `Cancel`, or for `hold_s`
    after the last `Reserve`."""

    token: str
    request_id: str
    n: int
    hold_s: float = 30.0


class Arrive(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Source -> destination: adopt the request; `state.block_ids` are reserved blocks
    holding the K/V of its first `num_computed_tokens` tokens (the rest reserved is freed)."""

    token: str
    state: RequestState
    # Wall clock (time.time()) after which the destination refuses: the source gives up
    # waiting soon after and resumes the request itself, so a late Arrive must not start
    # a second copy of it. 0 = no deadline. Assumes loosely synchronized clocks.
    deadline: float = 0.0


class Cancel(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Source -> destination: the migration failed; free what is reserved for it."""

    token: str
    request_id: str


class Migrated(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    request_id: str
    src: str
    dst: str
    stages: int  # transfers in all, the stop-and-copy one included
    live_stages: int  # of them while the request kept decoding
    blocks: int  # blocks copied (a block copied twice counts twice)
    bytes: int
    pause_s: float  # from the pause to the source resuming without the request
    total_s: float
    num_computed_tokens: int  # tokens whose KV arrived
    output_tokens: int  # output tokens the request had at the hand-over


class Reserved(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    block_ids: list[int]


class Arrived(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    instance_id: str


class Cancelled(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    freed: int


class MigrateRefused(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Refused or failed; nothing changed for the request (it runs where it ran)."""

    error: str


MigrateRequest = Migrate | Reserve | Arrive | Cancel
MigrateReply = Migrated | Reserved | Arrived | Cancelled | MigrateRefused
