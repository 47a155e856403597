"""Token ids as the index sees them: little-endian int32 bytes, `block_size` tokens a block.

Comparing and slicing bytes runs at C speed, so a 4K-token prompt is matched with a few
memcmp calls instead of 4K Python comparisons. Callers on the hot path pass an int32
numpy array (or these bytes) so the conversion is free; a list of ints costs one pass.

Block hashes chain: hash(block i) covers every token of blocks 0..i, so one 64-bit hash
names a whole prefix. They are deterministic across processes (blake2b, not Python's
salted `hash`), which lets the global scheduler rebuild a daemon's tree from KV events.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

TOKEN_BYTES = 4
ROOT_HASH = 0

TokenLike = bytes | np.ndarray | Sequence[int]


def as_token_bytes(tokens: TokenLike) -> bytes:
    if isinstance(tokens, bytes):
        if len(tokens) % TOKEN_BYTES:
            raise ValueError(f"token bytes of length {len(tokens)} are not whole int32 tokens")
        return tokens
    arr = np.asarray(tokens, dtype="<i4")
    if arr.ndim != 1:
        raise ValueError("tokens must be one-dimensional")
    return arr.tobytes()


def token_ids(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<i4").tolist()


def chain_hash(parent: int, block: bytes) -> int:
    digest = hashlib.blake2b(parent.to_bytes(8, "little") + block, digest_size=8).digest()
    # Never 0: that value names the root.
    return int.from_bytes(digest, "little") or 1


def block_hashes(parent: int, data: bytes, block_bytes: int) -> list[int]:
    hashes = []
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        parent = chain_hash(parent, data[start : start + block_bytes])
        hashes.append(parent)
    return hashes
