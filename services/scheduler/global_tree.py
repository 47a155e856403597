"""A global prompt tree: which instance of one role holds which prefix, kept exact by the
MemPool daemons' KV events (common/protocol/kv_events.py).

Blocks are named by chained hashes (common/tokens.py), so one hash names a whole
prefix and the tree needs no tokens:

    request  [ b0 ][ b1 ][ b2 ][ b3 ]      hashes h0 -> h1 -> h2 -> h3 (each covers all before)
    w0 holds  h0    h1    h2                match(w0) = 3 blocks
    w1 holds  h0                    h3      match(w1) = 1 block (h3 without h1, h2 is no prefix)

Per instance, a hash maps to the tiers holding it (bit 0 device, bit 1 host): a block may
be on both tiers of one instance, and stays matched while either holds it.

Invariants:
- an instance's entries are exactly what its stored / removed events since its last
  resync say, minus what the TTL dropped: we may forget blocks, never invent them;
- batches are applied in `seq` order per instance; a gap (lost events), or a first batch
  with seq != 0 (we joined late), drops that instance's entries and counts a resync. Then,
  for an instance whose daemon answers snapshots (`begin_sync` called, no `fallback`
  since), the batch is buffered and `apply` returns True: the caller fetches the daemon's
  `IndexSnapshot` and `load`s it; the buffer replays what came after it. For any other
  instance the batch is applied to the emptied entries (all we can do without a snapshot);
- a batch with seq 0 is a daemon's first (it starts with AllCleared): it needs no resync;
- while an instance syncs (between `begin_sync` or a gap, and `load` or `fallback`), its
  batches are buffered, at most MAX_BUFFERED (the oldest go first; a replay that then
  finds a gap resyncs again), and its old entries stay until `load` replaces them;
- `stored_at` is ordered by store time, so TTL expiry pops from the front only.
Times are the caller's clock; nothing here reads a clock or a socket.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from common.protocol import kv_events as ev
from common.protocol.mempool import IndexSnapshotReply
from common.tokens import ROOT_HASH, TOKEN_BYTES, as_token_bytes, block_hashes

_TIER_BITS = {0: 1, 1: 2}
# Batches kept per instance while its snapshot is fetched.
MAX_BUFFERED = 1024


class PromptHashes:
    """A request's chained block hashes, computed once per block size and shared by every
    tree it is matched against. `max_tokens` caps the blocks hashed (a worker matches at most
    all but the last prompt token)."""

    def __init__(self, token_ids: list[int] | bytes, max_tokens: int | None = None):
        data = as_token_bytes(token_ids)
        if max_tokens is not None:
            data = data[: max(0, max_tokens) * TOKEN_BYTES]
        self.data = data
        self._by_block_size: dict[int, list[int]] = {}

    def get(self, block_size: int) -> list[int]:
        hashes = self._by_block_size.get(block_size)
        if hashes is None:
            hashes = block_hashes(ROOT_HASH, self.data, block_size * TOKEN_BYTES)
            self._by_block_size[block_size] = hashes
        return hashes


@dataclass
class _Blocks:
    """One instance's cached blocks."""

    block_size: int
    next_seq: int | None = None  # None: no batch seen since the last (re)start of tracking
    buffer: deque[ev.KvEventBatch] | None = None  # not None: syncing (see the invariants)
    unconfirmed: int | None = None  # seq of the loaded snapshot, until a batch >= it arrives
    loaded_at: float = 0.0
    tiers: dict[int, int] = field(default_factory=dict)  # hash -> tier bits
    stored_at: OrderedDict[int, float] = field(default_factory=OrderedDict)

    def clear(self) -> None:
        self.tiers.clear()
        self.stored_at.clear()


class GlobalPromptTree:
    def __init__(self, role: str, ttl_s: float):
        self.role = role
        self.ttl_s = ttl_s
        self._instances: dict[str, _Blocks] = {}
        self._snapshots: set[str] = set()  # instances whose daemons answer IndexSnapshot
        self.resyncs = 0
        self.expired_blocks = 0

    # ------------------------------------------------------------------ events
    def apply(self, batch: ev.KvEventBatch, now: float, instance_id: str | None = None) -> bool:
        """Apply one batch of `instance_id` (default: the batch's own id). Returns whether
        the batch forced a resync (its entries were dropped first); for an instance that
        syncs by snapshot, True means: fetch one and `load` it."""
        iid = instance_id or batch.instance_id
        blocks = self._instances.get(iid)
        if blocks is not None and blocks.buffer is not None:
            blocks.buffer.append(batch)
            return False
        if blocks is None or blocks.block_size != batch.block_size:
            blocks = self._instances[iid] = _Blocks(batch.block_size)
        if blocks.unconfirmed is not None and batch.seq >= blocks.unconfirmed:
            blocks.unconfirmed = None  # the subscription was live when the snapshot was taken
            if batch.seq + 1 == blocks.next_seq:
                return False  # the snapshot's own batch: already in it
        expected = 0 if blocks.next_seq is None else blocks.next_seq
        resync = batch.seq not in (expected, 0)
        if resync:
            blocks.clear()
            self.resyncs += 1
            if iid in self._snapshots:
                blocks.next_seq = None
                blocks.buffer = deque([batch], maxlen=MAX_BUFFERED)
                return True
        blocks.next_seq = batch.seq + 1
        for event in batch.events:
            match event:
                case ev.BlockStored(tier=tier, block_hashes=hashes):
                    bit = _TIER_BITS.get(tier, 0)
                    for h in hashes if bit else ():  # an unknown tier is nothing we can use
                        blocks.tiers[h] = blocks.tiers.get(h, 0) | bit
                        blocks.stored_at[h] = now
                        blocks.stored_at.move_to_end(h)
                case ev.BlockRemoved(tier=tier, block_hashes=hashes):
                    bit = _TIER_BITS.get(tier, 0)
                    for h in hashes:
                        left = blocks.tiers.get(h, 0) & ~bit
                        if left:
                            blocks.tiers[h] = left
                        elif blocks.tiers.pop(h, None) is not None:
                            del blocks.stored_at[h]
                case ev.AllCleared():
                    blocks.clear()
        return resync

    def remove_instance(self, instance_id: str) -> None:
        self._instances.pop(instance_id, None)
        self._snapshots.discard(instance_id)

    # --------------------------------------------------------------- snapshots
    def begin_sync(self, instance_id: str, block_size: int) -> None:
        """The caller fetches `instance_id`'s snapshot: buffer its batches until `load` or
        `fallback` (its entries, if any, stay meanwhile)."""
        self._snapshots.add(instance_id)
        blocks = self._instances.get(instance_id)
        if blocks is None:
            blocks = self._instances[instance_id] = _Blocks(block_size)
        if blocks.buffer is None:
            blocks.buffer = deque(maxlen=MAX_BUFFERED)

    def syncing(self, instance_id: str) -> bool:
        blocks = self._instances.get(instance_id)
        return blocks is not None and blocks.buffer is not None

    def load(self, instance_id: str, snap: IndexSnapshotReply, now: float) -> bool:
        """Replace `instance_id`'s entries by `snap`, then replay the buffered batches
        numbered after it. Returns True when the replay found a gap (fetch again); a
        snapshot for an instance not syncing any more (dropped meanwhile) is ignored."""
        old = self._instances.get(instance_id)
        if old is None or old.buffer is None:
            return False
        blocks = self._instances[instance_id] = _Blocks(snap.block_size, next_seq=snap.seq + 1)
        blocks.unconfirmed, blocks.loaded_at = snap.seq, now
        for run in snap.runs:
            bit = _TIER_BITS.get(run.tier, 0)
            for h in run.block_hashes if bit else ():
                blocks.tiers[h] = blocks.tiers.get(h, 0) | bit
                blocks.stored_at[h] = now
        return self._replay(instance_id, old.buffer, snap.seq, now)

    def fallback(self, instance_id: str, now: float) -> None:
        """No snapshot to be had from `instance_id`'s daemon: replay its buffer and resync
        by dropping entries from now on."""
        self._snapshots.discard(instance_id)
        blocks = self._instances.get(instance_id)
        if blocks is None or blocks.buffer is None:
            return
        buffered, blocks.buffer = blocks.buffer, None
        self._replay(instance_id, buffered, -1, now)

    def _replay(
        self, instance_id: str, buffered: deque[ev.KvEventBatch], after: int, now: float
    ) -> bool:
        """Apply the buffered batches numbered after `after` (and any daemon's first,
        seq 0: a restart since). True when one of them started a new sync."""
        again = False
        for batch in buffered:
            if batch.seq <= after and batch.seq != 0:
                blocks = self._instances[instance_id]
                if batch.seq == after and blocks.buffer is None:
                    blocks.unconfirmed = None  # the snapshot's own batch came: confirmed
                continue
            again = self.apply(batch, now, instance_id) or again
        return again

    def unconfirmed(self, now: float, after_s: float) -> list[str]:
        """Instances whose loaded snapshot's batch has not come within `after_s`: the
        subscription may have missed what followed it (a SUB socket joins asynchronously)."""
        return sorted(
            iid
            for iid, b in self._instances.items()
            if b.unconfirmed is not None and b.buffer is None and now - b.loaded_at >= after_s
        )

    def expire(self, now: float) -> int:
        """Forget blocks not (re-)stored within the TTL; returns how many."""
        deadline = now - self.ttl_s
        dropped = 0
        for blocks in self._instances.values():
            stored_at = blocks.stored_at
            while stored_at:
                h, at = next(iter(stored_at.items()))
                if at >= deadline:
                    break
                del stored_at[h]
                del blocks.tiers[h]
                dropped += 1
        self.expired_blocks += dropped
        return dropped

    # ----------------------------------------------------------------- queries
    def match(self, prompt: PromptHashes, instance_id: str) -> int:
        """Tokens of the longest prefix of `prompt` that `instance_id` holds (whole blocks)."""
        blocks = self._instances.get(instance_id)
        if blocks is None or not blocks.tiers:
            return 0
        held = blocks.tiers
        n = 0
        for h in prompt.get(blocks.block_size):
            if h not in held:
                break
            n += 1
        return n * blocks.block_size

    def match_all(self, prompt: PromptHashes) -> dict[str, int]:
        """`match` for every instance that holds at least the first block."""
        out = {}
        for iid in self._instances:
            n = self.match(prompt, iid)
            if n:
                out[iid] = n
        return out

    def num_blocks(self, instance_id: str) -> int:
        blocks = self._instances.get(instance_id)
        return len(blocks.tiers) if blocks is not None else 0

    def tiers(self, instance_id: str, block_hash: int) -> set[int]:
        """The tiers (0 device, 1 host) of `instance_id` holding `block_hash`."""
        blocks = self._instances.get(instance_id)
        bits = blocks.tiers.get(block_hash, 0) if blocks is not None else 0
        return {tier for tier, bit in _TIER_BITS.items() if bits & bit}

    def instances(self) -> list[str]:
        return sorted(self._instances)
