"""The "scheduler" channel: workers -> scheduler heartbeats (PUSH -> PULL), gateway ->
scheduler placement (RPC), and scheduler -> gateway instance events (PUB, topic
`INSTANCE_TOPIC`).

Load is counted in tokens and KV blocks. The scheduler charges a request's cost to the
instances it picks at the moment of placement and takes the charge back on `Release`, so
two placements in a row never see the same idle instance (the heartbeat's own load figures
describe what the worker has already admitted, which lags placement).
"""

from __future__ import annotations

import msgspec

from common.protocol.worker import Fetch, HandOff

INSTANCE_TOPIC = b"instances"


class InstanceLoad(msgspec.Struct, frozen=True, omit_defaults=True):
    waiting_requests: int = 0
    running_requests: int = 0
    waiting_tokens: int = 0  # prompt tokens not yet computed
    running_tokens: int = 0  # tokens whose KV the running requests hold
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    # The elastic controller's signals (services/worker/load.py), in the engine's blocks
    # (a group leader's: group blocks; a follower reports 0s, its leader speaks for it):
    used_blocks: int = 0  # held by running requests
    waiting_blocks: int = 0  # the waiting queue's remaining tokens need
    capacity_blocks: int = 0  # usable: evictable cached blocks count as free


class Heartbeat(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Sent every `heartbeat_interval_s` by each worker. The first one registers the
    instance; `started_at` changes when the worker restarted (its old state is dropped).
    An incarnation is (`started_at`, `incarnation`): `incarnation` is a random nonce each
    worker process draws at start ("" from an older worker), so another process cannot
    claim a live id by guessing a start time (services/scheduler/registry.py says when a
    new incarnation may take over an id, and that addresses never move within one)."""

    instance_id: str
    role: str  # prefill | decode | colocated
    address: str  # the worker's request PULL
    mempool: str  # its MemPool daemon's RPC address
    events: str  # its MemPool daemon's KV-event PUB address
    control: str  # the worker's control RPC (admin status)
    block_size: int
    block_bytes: int  # bytes of one KV block (what a transfer of it costs)
    started_at: float
    load: InstanceLoad = msgspec.field(default_factory=InstanceLoad)
    healthy: bool = True  # False: the worker lost its daemon; do not place here
    incarnation: str = ""  # random per worker process (see above)
    # What the elastic drop planner needs to know before any Prepare (services/scheduler/
    # planner.py): instances group only with the same model, layers and budget.
    model: str = ""
    num_layers: int = 0
    param_bytes: int = 0  # one full copy of the parameters
    budget_bytes: int = 0  # its daemon's memory budget (0: none)


class Place(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Gateway -> scheduler: where should this request run?"""

    request_id: str
    token_ids: list[int]
    max_tokens: int
    session_id: str = ""
    # The placing gateway's incarnation ("" / 0: not said, as from an older gateway): its
    # charges are dropped when it falls silent (see `GatewayAlive`) or restarts.
    gateway: str = ""
    gateway_started_at: float = 0.0
    # Instances not to place on: the gateway found them unreachable (a re-placement).
    avoid: list[str] = msgspec.field(default_factory=list)


class Release(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Gateway -> scheduler: take back a placement's load charge. `phase="prefill"`: only
    the prefill side's (the first token arrived); `"all"`: the request ended."""

    request_id: str
    phase: str = "all"


class GatewayAlive(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Gateway -> scheduler, every `interval_s`: this incarnation (id + `started_at`) is
    alive. A gateway silent for a few intervals is dead, and so is an incarnation whose
    gateway id reappears with a later `started_at`: its placements' charges are dropped."""

    gateway: str
    started_at: float
    interval_s: float = 1.0


SchedulerRequest = Place | Release | GatewayAlive


class Placement(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Where a request goes: `Generate` to `address` with these `cache` / `handoff` /
    `fetch` values. `cached_tokens` is what the global trees expect the first instance to
    find cached (the worker's own `match` is the truth)."""

    request_id: str
    instance_id: str
    address: str
    mode: str
    policy: str
    cache: bool = True
    handoff: HandOff | None = None
    fetch: Fetch | None = None
    cached_tokens: int = 0


class Released(msgspec.Struct, tag=True, frozen=True):
    charged: bool  # False: nothing was charged under that id (already released, unknown)


class GatewayKnown(msgspec.Struct, tag=True, frozen=True):
    """The answer to `GatewayAlive`. `current`: False when a later incarnation of that id
    is known (this one is stale: its charges were dropped). `instances`: per role, the
    instances that may take placements now (healthy, not drained); `needs`: the roles the
    current mode places on (each needs at least one for the cluster to serve)."""

    current: bool = True
    instances: dict[str, int] = msgspec.field(default_factory=dict)
    needs: list[str] = msgspec.field(default_factory=list)


SchedulerReply = Placement | Released | GatewayKnown


class InstanceUp(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    role: str


class InstanceDown(msgspec.Struct, tag=True, frozen=True):
    """The instance missed its heartbeats (or reported itself unhealthy): fail every request
    that has a leg on it, now, rather than wait for a timeout."""

    instance_id: str
    reason: str


class ClusterShutdown(msgspec.Struct, tag=True, frozen=True):
    """The admin asked the cluster to stop: gateways finish with an error and exit."""

    reason: str = "admin shutdown"


InstanceEvent = InstanceUp | InstanceDown | ClusterShutdown
