"""The "mempool" channel: RPC to a MemPool daemon (ROUTER), from its worker, from peer
daemons (the transfer legs), from the scheduler and from admin tools.

Names follow the MemServe paper: alloc_mem / free_mem / swap_out / swap_in (memory),
insert / match / delete (index), transfer / transfer_with_insert (between instances).
Token ids travel as little-endian int32 bytes (`common.tokens.as_token_bytes`):
decoding them is free, and a 4K-token prompt is 16 KiB. Tiers: 0 = device, 1 = host.

Every request is answered by one reply struct, or by an RPC error reply whose message
says what was refused and whose kind (`common.errors.ErrorKind`) says why: UNKNOWN_ID
(a handle, transfer or tensor), BAD_REQUEST (bad arguments), OUT_OF_MEMORY, REFUSED (not
allowed in the current state, e.g. a second commit), and for a failed transfer the peer's
kind, TIMEOUT or UNAVAILABLE.
"""

from __future__ import annotations

import msgspec
import numpy as np

from common.protocol.admin import AdminReply, AdminRequest

# --------------------------------------------------------------------- requests


class AllocMem(msgspec.Struct, tag=True, frozen=True):
    n: int
    tier: int = 0
    owner: str = ""


class FreeMem(msgspec.Struct, tag=True, frozen=True):
    block_ids: list[int]
    tier: int = 0


class SwapOut(msgspec.Struct, tag=True, frozen=True):
    """Client device blocks -> host blocks (`block_ids`), or demote `n` LRU index blocks."""

    block_ids: list[int] = msgspec.field(default_factory=list)
    n: int = 0


class SwapIn(msgspec.Struct, tag=True, frozen=True):
    block_ids: list[int]


class Insert(msgspec.Struct, tag=True, frozen=True):
    """Index the whole blocks of `tokens`. With `pin_owner`, the indexed path is also pinned
    for that owner (as `Match` would pin it) and `Inserted.handle` names the pin: no
    caller inserts and then matches the same tokens to get one."""

    tokens: bytes
    block_ids: list[int]
    tier: int = 0
    pin_owner: str = ""


class Match(msgspec.Struct, tag=True, frozen=True):
    tokens: bytes
    owner: str = ""
    promote: bool = True
    max_tokens: int = -1  # < 0: no cap


class Release(msgspec.Struct, tag=True, frozen=True):
    handle: int


class Delete(msgspec.Struct, tag=True, frozen=True):
    tokens: bytes


class Transfer(msgspec.Struct, tag=True, frozen=True):
    """Copy local blocks `src_ids` into blocks `dst_ids` of the daemon at `dst`. With no
    `dst_ids` the receiver allocates them, for client `owner` there (a decode worker that
    continues the request and frees them)."""

    dst: str
    src_ids: list[int]
    dst_ids: list[int]
    transport: str = ""  # "" = the best one both sides share
    checksum: bool = False
    timeout_s: float = 30.0
    owner: str = ""


class TransferWithInsert(msgspec.Struct, tag=True, frozen=True):
    """Send the KV of `tokens` (local blocks `src_ids`, one per block of tokens) to the daemon
    at `dst`, which allocates, receives, and only once every byte is in, inserts. With
    `pin_owner`, the receiver also pins the inserted blocks and keeps the partial tail
    block for that owner (a decode worker continuing the request). With `skip_cached`,
    blocks of a prefix the receiver already has cached are not sent at all (its next turn
    only moves the new KV). With `from_index` (and no `src_ids`), the sender itself
    matches `tokens` in its own index, sends the cached prefix and releases that pin at
    the end: one call returns cached KV to another daemon (pd-caching-3's way back)."""

    dst: str
    tokens: bytes
    src_ids: list[int]
    pin_owner: str = ""
    transport: str = ""
    checksum: bool = False
    timeout_s: float = 30.0
    skip_cached: bool = False
    from_index: bool = False


class Grow(msgspec.Struct, tag=True, frozen=True):
    device_blocks: int


class SetParams(msgspec.Struct, tag=True, frozen=True):
    """The worker's resident parameter bytes (at attach). With a budget the daemon sets its
    KV capacity to `(budget - nbytes) // block_bytes` (grow only); a report that does not
    fit beside the current KV is refused (REFUSED) and changes nothing. Answered by
    `BudgetReply`."""

    nbytes: int


class Split(msgspec.Struct, tag=True, frozen=True):
    """KunServe split mode: every device block of L layers becomes `g` sub-blocks of L/g
    layers in place (block b -> sub-blocks b*g .. b*g+g-1, no copy); ids, capacity and
    `block_bytes` are in sub-blocks from then on. `g` must divide the layer count (>= 2).
    The device index is emptied first and stays read-only while split. With `grow` and a
    budget, capacity then grows to the most the budget allows beside the current
    parameters (send `SetParams` with what the worker kept first). Refused (nothing
    changed) while already split or while transfers or pins hold device blocks. Answered
    by `SplitState`."""

    g: int
    grow: bool = True


class Merge(msgspec.Struct, tag=True, frozen=True):
    """Back to whole blocks. Refused (REFUSED, nothing changed) unless the capacity and the
    shrink ceiling are whole blocks and every aligned run of sub-blocks is all free or all
    one client's. Answered by `SplitState`."""


class Shrink(msgspec.Struct, tag=True, frozen=True):
    """Lower the device ceiling to `target` (current units): ids >= target are never handed
    out again; the capacity drops once they are all free. `SplitState.pending_shrink`
    lists the live ids still above it (their owners move and free them)."""

    target: int


class ReleaseOwner(msgspec.Struct, tag=True, frozen=True):
    owner: str


class Chown(msgspec.Struct, tag=True, frozen=True):
    """Device client blocks pass to `owner` (with `expect`: only if that client holds them
    all). Answered by `Ok(count)`."""

    block_ids: list[int]
    owner: str
    expect: str = ""


class Evict(msgspec.Struct, tag=True, frozen=True):
    n: int
    tier: int = 0


class Stats(msgspec.Struct, tag=True, frozen=True):
    pass


class CheckIntegrity(msgspec.Struct, tag=True, frozen=True):
    pass


class Info(msgspec.Struct, tag=True, frozen=True):
    """Where the daemon's memory is, so its worker can map the device region."""


# The most blocks one IndexSnapshot reply names (about 9 bytes each on the wire).
SNAPSHOT_MAX_BLOCKS = 1 << 17


class IndexSnapshot(msgspec.Struct, tag=True, frozen=True):
    """What the index holds, in the form of the KV events (common/protocol/kv_events.py),
    so a global scheduler that (re)starts or subscribes late can rebuild its tree for this
    daemon instead of starting blind. Capped, not paged: pages taken at different moments
    would not describe one state. At most `max_blocks` (and never more than
    SNAPSHOT_MAX_BLOCKS) blocks, breadth first from the root, so a capped snapshot still
    names only whole prefixes (a block's ancestors are always in it)."""

    max_blocks: int = SNAPSHOT_MAX_BLOCKS


# Named tensors (parameters, activations): kept in the daemon's tensor region and moved
# between daemons through the same transports as KV. `data` is the raw bytes (uint8 view;
# bfloat16 travels this way too), sent as a zero-copy frame.
class PutTensor(msgspec.Struct, tag=True, frozen=True):
    name: str
    dtype: str
    shape: list[int]
    data: np.ndarray


class GetTensor(msgspec.Struct, tag=True, frozen=True):
    name: str


class DeleteTensor(msgspec.Struct, tag=True, frozen=True):
    name: str


class ListTensors(msgspec.Struct, tag=True, frozen=True):
    pass


class SendTensor(msgspec.Struct, tag=True, frozen=True):
    """Copy the local tensor `name` to the daemon at `dst` (as `dst_name`, default the same)."""

    dst: str
    name: str
    dst_name: str = ""
    transport: str = ""
    checksum: bool = False
    timeout_s: float = 30.0


# Peer legs of a transfer (sending daemon -> receiving daemon).
class PrepareReceive(msgspec.Struct, tag=True, frozen=True):
    """The receiver allocates (or takes the given `dst_ids`) and names the transfer. With
    `skip_tokens`, it first matches them in its index (pinning the hit until the commit)
    and allocates only for the blocks after the hit (`Prepared.skip` says how many)."""

    num_blocks: int
    dst_ids: list[int] = msgspec.field(default_factory=list)  # given: plain transfer
    transports: list[str] = msgspec.field(default_factory=list)  # the sender's, preferred first
    sender_host: str = ""
    block_bytes: int = 0
    timeout_s: float = 30.0
    owner: str = ""  # client owner of allocated blocks after a plain transfer
    skip_tokens: bytes = b""


class PrepareTensor(msgspec.Struct, tag=True, frozen=True):
    """The receiver reserves pages of its tensor region for a tensor about to arrive."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    transports: list[str] = msgspec.field(default_factory=list)
    sender_host: str = ""
    timeout_s: float = 30.0


class CommitReceive(msgspec.Struct, tag=True, frozen=True):
    transfer_id: int
    tokens: bytes = b""  # non-empty: insert once complete
    pin_owner: str = ""
    checksum: int = -1  # < 0: not checked


class AbortReceive(msgspec.Struct, tag=True, frozen=True):
    transfer_id: int


MempoolRequest = (
    AdminRequest
    | AllocMem
    | FreeMem
    | SwapOut
    | SwapIn
    | Insert
    | Match
    | Release
    | Delete
    | Transfer
    | TransferWithInsert
    | Grow
    | SetParams
    | Split
    | Merge
    | Shrink
    | ReleaseOwner
    | Chown
    | Evict
    | Stats
    | CheckIntegrity
    | Info
    | IndexSnapshot
    | PutTensor
    | GetTensor
    | DeleteTensor
    | ListTensors
    | SendTensor
    | PrepareReceive
    | PrepareTensor
    | CommitReceive
    | AbortReceive
)

# ----------------------------------------------------------------------- replies


class Ok(msgspec.Struct, tag=True, frozen=True):
    count: int = 0  # blocks affected, where that means something


class Blocks(msgspec.Struct, tag=True, frozen=True):
    block_ids: list[int]


class Matched(msgspec.Struct, tag=True, frozen=True):
    handle: int
    num_tokens: int
    block_ids: list[int]
    tiers: list[int]


class Inserted(msgspec.Struct, tag=True, frozen=True):
    num_indexed_tokens: int
    index_block_ids: list[int]  # with pin_owner: the pinned (device) prefix of them
    freed_block_ids: list[int]
    handle: int = 0  # with pin_owner: release it when done


class Transferred(msgspec.Struct, tag=True, frozen=True):
    """`dst_ids`: the blocks the bytes went to. After transfer_with_insert the receiver
    may already have cached some of them under other blocks (then it freed the received
    copies): `index_block_ids` are the blocks that hold the prompt there, pinned by
    `handle` when `pin_owner` was given, and `tail_ids` the partial tail kept for it."""

    dst_ids: list[int]
    nbytes: int
    seconds: float
    transport: str
    num_indexed_tokens: int = 0
    index_block_ids: list[int] = msgspec.field(default_factory=list)
    handle: int = 0
    tail_ids: list[int] = msgspec.field(default_factory=list)
    skipped_blocks: int = 0  # skip_cached: blocks the receiver had and were not sent


class Prepared(msgspec.Struct, tag=True, frozen=True):
    transfer_id: int
    dst_ids: list[int]
    transport: str
    endpoint: dict[str, str]
    skip: int = 0  # leading source blocks the receiver already has: not sent


class Committed(msgspec.Struct, tag=True, frozen=True):
    nbytes: int
    num_indexed_tokens: int = 0
    index_block_ids: list[int] = msgspec.field(default_factory=list)
    handle: int = 0
    tail_ids: list[int] = msgspec.field(default_factory=list)


class StatsReply(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    capacity: dict[str, int]
    free: dict[str, int]
    client: dict[str, int]
    index: dict[str, int]
    pinned: dict[str, int]
    match_calls: int
    match_hits: int
    matched_tokens: int
    queried_tokens: int
    evicted_blocks: int
    demoted_blocks: int
    promoted_blocks: int
    bytes_sent: int
    bytes_received: int
    transfers_failed: int
    pending_transfers: int
    # A fresh id per daemon process: a worker that sees it change knows its daemon was
    # restarted (its leases and region mapping are gone). "" from older daemons.
    incarnation: str = ""
    budget_bytes: int = 0  # the instance's memory budget; 0: none (older daemons too)
    param_bytes: int = 0  # resident parameter bytes (the worker's report, else an estimate)
    split: int = 1  # device sub-blocks per whole block (KunServe split mode); 1: unsplit
    block_bytes: int = 0  # bytes of one device block now (a sub-block while split)


class BudgetReply(msgspec.Struct, tag=True, frozen=True):
    """How the instance's memory is split: parameters + KV device tier <= budget."""

    budget_bytes: int  # 0: no budget
    param_bytes: int
    device_blocks: int  # KV capacity after the call
    block_bytes: int


class SplitState(msgspec.Struct, tag=True, frozen=True):
    """The device tier's split mode after a `Split`, `Merge` or `Shrink`: sizes in current
    units (sub-blocks while split). `pending_shrink`: live ids at or above the ceiling of a
    shrink not yet done (empty when none)."""

    split: int
    block_bytes: int
    capacity_blocks: int
    max_blocks: int
    budget_bytes: int
    param_bytes: int
    pending_shrink: list[int] = msgspec.field(default_factory=list)


class IntegrityReply(msgspec.Struct, tag=True, frozen=True):
    ok: bool
    message: str = ""


class InfoReply(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    block_size: int
    block_bytes: int  # one device block now: a sub-block of 1/split of the layers while split
    device_kind: str  # "shm" (CPU) or "cuda"
    device_name: str  # shm segment name, or the CUDA IPC handle in hex
    device_max_blocks: int
    device_blocks: int
    host_blocks: int
    events: str  # address of the KV-event PUB socket
    transports: list[str]
    incarnation: str = ""  # as in StatsReply
    budget_bytes: int = 0  # as in StatsReply
    param_bytes: int = 0  # as in StatsReply
    split: int = 1  # as in StatsReply


class IndexRun(msgspec.Struct, frozen=True, array_like=True):
    """Chained block hashes (`common.tokens.block_hashes`) of one run of blocks on `tier`,
    in prefix order: the same hashes a `BlockStored` event carries."""

    tier: int
    block_hashes: list[int]


class IndexSnapshotReply(msgspec.Struct, tag=True, frozen=True):
    """The index after the KV-event batch `seq` of this daemon (that batch is published
    right after the snapshot is taken, possibly with no events, so a subscriber that sees
    it knows its subscription was live): a subscriber loads `runs`, then applies the
    batches numbered after `seq`. `truncated`: the index held more than the cap; the
    deepest blocks were left out (forgetting is safe, the worker's own match is the truth)."""

    instance_id: str
    seq: int
    block_size: int
    runs: list[IndexRun]
    truncated: bool = False
    events_address: str = ""


class TensorInfo(msgspec.Struct, frozen=True):
    name: str
    dtype: str
    shape: list[int]
    nbytes: int


class TensorData(msgspec.Struct, tag=True, frozen=True):
    name: str
    dtype: str
    shape: list[int]
    data: np.ndarray


class TensorList(msgspec.Struct, tag=True, frozen=True):
    tensors: list[TensorInfo]
    free_bytes: int


MempoolReply = (
    AdminReply
    | Ok
    | Blocks
    | Matched
    | Inserted
    | Transferred
    | Prepared
    | Committed
    | StatsReply
    | BudgetReply
    | SplitState
    | IntegrityReply
    | InfoReply
    | IndexSnapshotReply
    | TensorData
    | TensorList
)
