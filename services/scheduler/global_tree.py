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
  with seq != 0 (we joined late), drops that instance's entries before applying, and
  counts a resync;
- `stored_at` is ordered by store time, so TTL expiry pops from the front only.
Times are the caller's clock; nothing here reads a clock or a socket.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from common.protocol import kv_events as ev
from common.tokens import ROOT_HASH, TOKEN_BYTES, as_token_bytes, block_hashes

_TIER_BITS = {0: 1, 1: 2}


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
        self.resyncs = 0
        self.expired_blocks = 0

    # ------------------------------------------------------------------ events
    def apply(self, batch: ev.KvEventBatch, now: float, instance_id: str | None = None) -> bool:
        """Apply one batch of `instance_id` (default: the batch's own id). Returns whether
        the batch forced a resync (its entries were dropped first)."""
        iid = instance_id or batch.instance_id
        blocks = self._instances.get(iid)
        if blocks is None or blocks.block_size != batch.block_size:
            blocks = self._instances[iid] = _Blocks(batch.block_size)
        expected = 0 if blocks.next_seq is None else blocks.next_seq
        resync = batch.seq != expected
        if resync:
            blocks.clear()
            self.resyncs += 1
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
