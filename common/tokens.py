"""Token ids as the index sees them: little-endian int32 bytes, `block_size` tokens a block.

Comparing and slicing bytes runs at C speed, so a 4K-token prompt is matched with a few
memcmp calls instead of 4K Python comparisons. Callers on the hot path pass an int32
numpy array (or these bytes) so the conversion is free; a list of ints costs one pass.

Block hashes chain: hash(block i) covers every token of blocks 0..i, so one 64-bit hash
names a whole prefix. They are deterministic across processes (fixed constants, never
Python's salted `hash`), which lets the global scheduler rebuild a daemon's tree from KV
events. The chain is built so a whole prompt hashes in a few numpy passes, not one Python
call per block:

    s(child) = unmix(parent) * P^m + sum_k w_k * P^(m-1-k)   (mod 2^64; P odd, so invertible)
    hash     = mix(s)                                        mix: splitmix64's finalizer

where w_0..w_{m-1} are the block's 64-bit words (token pairs, an odd block zero-padded) and
mix is a bijection, so the state is the parent hash unmixed. Unrolled over a prompt, the
state at word e is P^e * (unmix(parent) * P + sum_{j<=e} w_j * P^-j): one cumulative sum
over the words, read at each block's last word. `chain_hash` (one block) and `block_hashes` (many) agree exactly. The hash names
blocks for routing; it is not collision-resistant against a chosen prompt, and nothing trusts
it for correctness (the daemon compares token bytes on every match).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TOKEN_BYTES = 4
ROOT_HASH = 0

TokenLike = bytes | np.ndarray | Sequence[int]

_M64 = (1 << 64) - 1
_K1, _K2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_P = 0x9E3779B97F4A7C15  # odd, so P^-1 exists mod 2^64
_Q = pow(_P, -1, 1 << 64)
_K1_INV, _K2_INV = pow(_K1, -1, 1 << 64), pow(_K2, -1, 1 << 64)
_U = {n: np.uint64(n) for n in (27, 30, 31)}
_UK1, _UK2 = np.uint64(_K1), np.uint64(_K2)


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


# ------------------------------------------------------------------- the mixer
def _unmix_int(h: int) -> int:
    z = h ^ (h >> 31) ^ (h >> 62)
    z = (z * _K2_INV) & _M64
    z ^= (z >> 27) ^ (z >> 54)
    z = (z * _K1_INV) & _M64
    return z ^ (z >> 30) ^ (z >> 60)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on a uint64 array (wraps mod 2^64)."""
    z ^= z >> _U[30]
    z *= _UK1
    z ^= z >> _U[27]
    z *= _UK2
    z ^= z >> _U[31]
    return z


class _Powers:
    """P^i and P^-i (mod 2^64) as uint64 arrays, grown by doubling on demand."""

    def __init__(self) -> None:
        self.p = np.ones(1, dtype=np.uint64)
        self.q = np.ones(1, dtype=np.uint64)

    def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        while len(self.p) < n:  # [x^0 .. x^m) then the same times x^m
            m = len(self.p)
            self.p = np.concatenate([self.p, self.p * np.uint64(pow(_P, m, 1 << 64))])
            self.q = np.concatenate([self.q, self.q * np.uint64(pow(_Q, m, 1 << 64))])
        return self.p[:n], self.q[:n]


_powers = _Powers()


def _words(data: bytes, block_bytes: int) -> tuple[np.ndarray, int]:
    """(every whole block's 64-bit words in order, words per block)."""
    n = len(data) // block_bytes
    if block_bytes % 8 == 0:
        return np.frombuffer(data, dtype="<u8", count=n * block_bytes // 8), block_bytes // 8
    per = block_bytes // TOKEN_BYTES
    padded = np.zeros((n, per + 1), dtype="<u4")
    padded[:, :per] = np.frombuffer(data, dtype="<u4", count=n * per).reshape(n, per)
    return padded.view("<u8").reshape(-1), (per + 1) // 2


def _hash_blocks(parent: int, data: bytes, block_bytes: int) -> np.ndarray:
    words, m = _words(data, block_bytes)
    p_pow, q_pow = _powers.upto(len(words))
    state = np.cumsum(words * q_pow, dtype=np.uint64)[m - 1 :: m]
    state += np.uint64((_unmix_int(parent) * _P) & _M64)
    state *= p_pow[m - 1 :: m]
    return _mix(state)


def block_hashes(parent: int, data: bytes, block_bytes: int) -> list[int]:
    """The chained hash of every whole block of `data`, the first chained to `parent`."""
    if len(data) < block_bytes:
        return []
    hashes = _hash_blocks(parent, data, block_bytes)
    if hashes.all():
        return hashes.tolist()
    # A hash of 0 (odds 2^-64 a block) would name the root: step block by block, where
    # `chain_hash` turns it into 1, so the chain stays the same as one-block-at-a-time.
    out = []
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        parent = chain_hash(parent, data[start : start + block_bytes])
        out.append(parent)
    return out


def chain_hash(parent: int, block: bytes) -> int:
    """The hash of one block chained to its parent's hash (never 0: that names the root)."""
    return int(_hash_blocks(parent, block, len(block))[0]) or 1
