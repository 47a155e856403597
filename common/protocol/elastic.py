"""The "elastic" channel (KunServe): the scheduler forms and dissolves pipeline groups of
instances by control RPCs to their workers (the worker's control socket, which also
answers `AdminRequest`), and the group's leader talks to its followers the same way.

    memserve admin elastic drop a,b ──▶ scheduler
        Prepare ──▶ every member (parallel)   member pauses: no step, nothing admitted
            ◀── Ready                          (model, layers, budget: checked to agree)
        Commit  ──▶ followers, then the leader
            follower: export requests, drop params, split KV, lease it all, serve stage
            ◀── FollowerCommitted (exported requests, sub-blocks held)
            leader:   same, then adopt every exported request into its PipelineEngine
            ◀── GroupServing
        (any failure or timeout before the leader's commit: Abort ──▶ every member;
         nothing was irreversible, each member resumes as it was)

    memserve admin elastic restore G ──▶ scheduler ── Restore ──▶ leader
        live (default): the group keeps serving; HomeOpen ──▶ the home (rank 1): it takes
        its parameters back beside its stage; batches of requests go home, each by
        HomeTake (whole blocks, its own sub-blocks copied) ──▶ home, MemPool transfers of
        the other members' sub-blocks, HomeAdopt ──▶ home; then, as below, for what is left
        pause: pause, plan homes, copy each request's KV home (MemPool transfers and
        local copies), Dissolve ──▶ each follower (adopt its requests), restore itself
        ◀── Restored

    a member died: Break ──▶ each survivor (group requests fail; restore from disk)

Group member rank i holds layers [i*L/g, (i+1)*L/g); rank 0 is the leader and also keeps
the embedding, final norm and lm_head. `epoch` increases with every group the scheduler
forms; a member refuses a message of another group or epoch than the one it is in.
"""

from __future__ import annotations

import msgspec

from common.sampling import SamplingParams


class Member(msgspec.Struct, frozen=True, omit_defaults=True):
    instance_id: str
    rank: int
    control: str  # the worker's control RPC
    address: str  # the worker's request PULL
    mempool: str  # its MemPool daemon's RPC
    stage: str = ""  # the worker's stage PULL (from its `Ready`), where hidden states arrive


class RequestState(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """A request leaving one engine for another: everything needed to go on with it and
    give the client exactly the tokens it would have had. Without KV (`block_ids` empty)
    the adopting engine recomputes prompt + outputs (preemption semantics, same tokens);
    with KV, `block_ids` are blocks the adopting worker owns holding the K/V of the first
    `num_computed_tokens` tokens. `output_offset` is the number of output tokens already
    streamed to `reply_to`."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    reply_to: str
    generator_state: bytes = b""  # torch.Generator.get_state() of a sampled request
    num_cached_tokens: int = 0
    output_offset: int = 0
    block_ids: list[int] = msgspec.field(default_factory=list)
    num_computed_tokens: int = 0


class Prepare(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Scheduler -> member: stop stepping and admitting (requests that arrive are queued),
    answer `Ready`. A member that hears neither `Commit` nor `Abort` within `timeout_s`
    resumes by itself."""

    token: str
    group_id: str
    epoch: int
    members: list[Member]
    timeout_s: float = 5.0


class Ready(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    instance_id: str
    model: str
    num_layers: int
    param_bytes: int
    budget_bytes: int
    block_bytes: int  # of one full (all-layer) KV block
    stage: str  # the stage PULL this worker bound for the group


class Commit(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Scheduler -> member: form the group (members with their `stage` addresses). The
    leader's commit carries what each follower answered."""

    token: str
    group_id: str
    epoch: int
    members: list[Member]
    followers: list[FollowerCommitted] = msgspec.field(default_factory=list)
    # Requests running at the drop keep their KV (live exchange); False: recomputed.
    exchange: bool = True


class FollowerCommitted(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    instance_id: str
    # What it was serving, for the leader to adopt; with the exchange, a request's
    # `block_ids` are full blocks at this member that still hold its KV.
    requests: list[RequestState]
    num_blocks: int  # sub-blocks it holds for the group
    param_bytes: int  # resident after the drop
    freed_bytes: int  # parameters it dropped
    # Every sub-block it holds (its requests' KV and the rest), from which the leader
    # builds the group's tables; and its KV capacity in full blocks before the drop:
    # what it takes back at the restore.
    table: list[int] = msgspec.field(default_factory=list)
    capacity_blocks: int = 0


class StageTable(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Leader -> follower at the commit: its sub-block of each group block (`table[k]`);
    the follower serves its layer range on the ring from then on."""

    token: str
    group_id: str
    epoch: int
    table: list[int]


class GroupServing(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    group_id: str
    num_blocks: int  # group blocks (one sub-block on every member each)
    block_size: int
    adopted: int  # requests taken over from the members
    param_bytes: int
    freed_bytes: int
    exchanging: int = 0  # of them, requests whose KV moves now (live exchange)


class Abort(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    token: str
    group_id: str
    epoch: int


class Restore(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Scheduler -> leader: hand every request home and dissolve the group. `live`: while
    the group keeps serving, in batches (services/worker/live_restore.py); what is left
    at `live_timeout_s` (or whatever does not fit) goes home in one pause."""

    token: str
    group_id: str
    epoch: int
    live: bool = False
    live_timeout_s: float = 5.0


class Restored(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    group_id: str
    moved: int  # requests whose KV went home
    recomputed: int  # requests sent home without KV (no room): recomputed there
    moved_bytes: int
    pause_s: float  # from the leader's last group step to the members serving alone
    live: bool = False  # a live restore ran (`moved_live` of `moved` went home in batches)
    moved_live: int = 0
    batches: int = 0
    stall_max_s: float = 0.0  # longest time a batch's requests waited (parked -> adopted)
    duration_s: float = 0.0  # from the Restore to the Restored
    fallback: str = ""  # why (part of) a live restore paused instead
    home: str = ""  # the live restore's home (instance id)
    home_requests: list[tuple[str, int]] = msgspec.field(default_factory=list)  # (id, tokens)


class CopyLocal(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Leader -> follower at restore: copy sub-blocks inside this member's KV, (src, dst)
    in order (one round of the move home; the rounds' MemPool transfers are the leader's)."""

    token: str
    group_id: str
    epoch: int
    copies: list[tuple[int, int]]


class HomeOpen(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Leader -> the home of a live restore (rank 1): no group block uses this member's
    sub-blocks at or above its pre-drop capacity, nor whole blocks [0, home_blocks). Give
    the ones above back, shrink, take the full parameters back (from local disk, beside
    the stage it keeps serving) and run requests alone on whole blocks [0, home_blocks).
    Sent again with a larger `home_blocks` (the group shrank and moved up): the home's
    region grows to it."""

    token: str
    group_id: str
    epoch: int
    home_blocks: int


class HomeTake(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Leader -> home: these requests (parked: no batch of theirs in flight; `block_ids`
    are group blocks) come home. Reserve whole blocks for each, copy this member's own
    sub-blocks into them; the reply lists them (the other members' sub-blocks follow as
    MemPool transfers, then `HomeAdopt`)."""

    token: str
    group_id: str
    epoch: int
    requests: list[RequestState]


class HomeBlocks(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    instance_id: str
    blocks: list[list[int]]  # whole blocks per request of the HomeTake, in order
    free: int = 0  # whole blocks still free at the home after these


class HomeAdopt(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Leader -> home: adopt `requests` (their `block_ids` are the whole blocks the
    HomeTake reserved, now holding their KV); `release` gives reserved blocks back (a
    batch that failed on the way)."""

    token: str
    group_id: str
    epoch: int
    requests: list[RequestState] = msgspec.field(default_factory=list)
    release: list[int] = msgspec.field(default_factory=list)


class Dissolve(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Leader -> follower at restore (after the KV moves): keep the sub-blocks of `keep`
    (whole blocks, in full-block ids), give back the rest, merge, reload the dropped
    parameters, and adopt `requests` (their `block_ids` are among `keep`)."""

    token: str
    group_id: str
    epoch: int
    keep: list[int] = msgspec.field(default_factory=list)
    requests: list[RequestState] = msgspec.field(default_factory=list)


class Break(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Scheduler -> surviving member: the group is broken (`reason`: a member died). The
    leader fails the group's requests; every survivor restores its parameters from local
    disk, gives the group's KV back and serves alone."""

    token: str
    group_id: str
    epoch: int
    reason: str


class Done(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """A member's answer to `Abort`, `StageTable`, `CopyLocal`, `HomeOpen`, `HomeAdopt`,
    `Dissolve` and `Break`."""

    instance_id: str
    param_bytes: int = 0


class Refused(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """The member refuses (bad token, unknown or stale group, wrong state); nothing changed."""

    error: str


ElasticRequest = (
    Prepare
    | Commit
    | Abort
    | StageTable
    | Restore
    | CopyLocal
    | HomeOpen
    | HomeTake
    | HomeAdopt
    | Dissolve
    | Break
)
ElasticReply = Ready | FollowerCommitted | GroupServing | Restored | HomeBlocks | Done | Refused
