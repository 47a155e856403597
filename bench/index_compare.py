"""Our prompt tree next to SGLang's `RadixCache`, same shapes, same run, interleaved.

The tree holds the `bench mempool` workload (10,000 prompts of 512 tokens whose first 256
tokens are one of the shared documents); then, per repeat, each system in turn (who goes
first alternates):

    match 4K     a 4K prompt whose every block is cached; ours: `MemPool.match` (pins the
                 path, returns the block ids and tiers); SGLang: `match_prefix` +
                 `inc_lock_ref` + `path_device_indices` (the same: pinned ids)
    insert 4K    a new prompt sharing a document prefix, with fresh blocks; ours:
    insert 16K   `MemPool.insert` (validates and takes over the caller's blocks); SGLang:
                 `insert` (page size 1; its KV events are off, its default, so it hashes
                 nothing). Removed again untimed, so the tree stays put.
    evict 4,096  least recently used leaves; ours: `MemPool.evict` (frees the blocks into
                 the allocator, records removed events); SGLang: `evict` (its allocator's
                 `free_segment` is a stand-in that does nothing). The evicted prompts are
                 inserted again untimed.

Then match and insert again, each system's calls back to back (its caches warm): the
interleaved figures are the goal's, and SGLang's insert (a few tensor copies and no
per-block Python work) gains most from running warm.

Our insert defers the block hashes of its KV events to `drain_events` (the daemon drains
after every request), so that cost is timed too: 'drain after insert', right after each
insert. SGLang's figures for the same step are absent: with events off it never hashes.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.baselines import sglang_radix

BLOCK_SIZE = 16
EVICT_TOKENS = 4096
# The goals for ours, p50 in microseconds.
GOALS_US = {
    "match 4K": 14.0,
    "insert 4K": 50.0,
    "insert 16K": 100.0,
    "evict 4,096 tokens": 12_000.0,
}


class _Ours:
    def __init__(self, cached: list[np.ndarray], spare_tokens: int):
        from services.mempool.pool import MemPool

        blocks = sum(len(p) for p in cached) // BLOCK_SIZE + spare_tokens // BLOCK_SIZE + 64
        self.pool = MemPool(BLOCK_SIZE, blocks)
        for p in cached:
            self.insert_untimed(p.tobytes())

    def insert_untimed(self, data: bytes) -> None:
        self.pool.insert(data, self.pool.alloc_mem(len(data) // 4 // BLOCK_SIZE))
        self.pool.drain_events()

    def match(self, data: bytes) -> float:
        t = time.perf_counter()
        m = self.pool.match(data)
        dt = time.perf_counter() - t
        assert m.num_tokens == len(data) // 4, "the probe is not fully cached"
        self.pool.release(m.handle)
        return dt

    def insert(self, data: bytes) -> tuple[float, float]:
        ids = self.pool.alloc_mem(len(data) // 4 // BLOCK_SIZE)
        t0 = time.perf_counter()
        self.pool.insert(data, ids)
        t1 = time.perf_counter()
        self.pool.drain_events()
        t2 = time.perf_counter()
        self.pool.delete(data)
        self.pool.drain_events()
        return t1 - t0, t2 - t1

    def evict(self, tokens: int) -> float:
        t = time.perf_counter()
        done = self.pool.evict(tokens // BLOCK_SIZE)
        dt = time.perf_counter() - t
        assert done == tokens // BLOCK_SIZE
        self.pool.drain_events()
        return dt


class _SglangAllocator:
    """What `RadixCache.evict` calls on its KV allocator: nothing to free here."""

    device = "cpu"

    def free_segment(self, values: Any, start_pos: int = 0) -> None:
        pass


class _Sglang:
    def __init__(self, mod: Any, cached: list[np.ndarray]):
        import torch

        self.mod, self.torch = mod, torch
        self.cache = mod.RadixCache.create_simulated(mock_allocator=_SglangAllocator())
        self.next_index = 0
        for p in cached:
            self.insert_untimed(p)

    def key(self, tokens: np.ndarray) -> Any:
        return self.mod.RadixKey(array("q", tokens.tolist()))

    def values(self, n: int) -> Any:
        v = self.torch.arange(self.next_index, self.next_index + n, dtype=self.torch.int64)
        self.next_index += n
        return v

    def insert_untimed(self, tokens: np.ndarray) -> None:
        ip = sglang_radix.InsertParams(key=self.key(tokens), value=self.values(len(tokens)))
        self.cache.insert(ip)

    def match(self, key: Any) -> float:
        cache = self.cache
        t = time.perf_counter()
        r = cache.match_prefix(sglang_radix.MatchPrefixParams(key=key))
        cache.inc_lock_ref(r.last_device_node)
        ids = cache.path_device_indices(r.last_device_node)
        dt = time.perf_counter() - t
        assert len(ids) == len(key), "the probe is not fully cached"
        cache.dec_lock_ref(r.last_device_node)
        return dt

    def insert(self, tokens: np.ndarray) -> float:
        params = sglang_radix.InsertParams(key=self.key(tokens), value=self.values(len(tokens)))
        t = time.perf_counter()
        r = self.cache.insert(params)
        dt = time.perf_counter() - t
        self.cache._delete_leaf(r.last_device_node)  # untimed: the tree stays as it was
        return dt

    def evict(self, tokens: int) -> float:
        t = time.perf_counter()
        r = self.cache.evict(sglang_radix.EvictParams(num_tokens=tokens))
        dt = time.perf_counter() - t
        assert r.num_tokens_evicted >= tokens
        return dt


def _p50_us(seconds: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in seconds)
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "n": len(us),
    }


def run(cached: list[np.ndarray], repeats: int, sglang_path: str | None = None) -> dict[str, Any]:
    """The four figures for ours and (when its file is found) SGLang, p50/p99 in us."""
    mod = sglang_radix.load(sglang_path)
    rng = np.random.default_rng(11)
    doc = cached[0][:256]

    def prompt(length: int, lo: int) -> np.ndarray:
        return np.concatenate(
            [doc, rng.integers(lo, lo + 40_000, size=length - 256, dtype=np.int32)]
        )

    full4k = prompt(4096, 200_000)
    news = {4096: prompt(4096, 300_000), 16384: prompt(16384, 400_000)}
    ours = _Ours(cached, spare_tokens=4096 + 2 * 16384 + 2 * EVICT_TOKENS)
    ours.insert_untimed(full4k.tobytes())
    sgl = None
    if mod is not None:
        sgl = _Sglang(mod, cached)
        sgl.insert_untimed(full4k)
    times: dict[str, dict[str, list[float]]] = {"ours": {}, "sglang": {}}

    def add(system: str, name: str, seconds: float) -> None:
        times[system].setdefault(name, []).append(seconds)

    def both(r: int, mine: Callable[[], None], theirs: Callable[[], None]) -> None:
        """One repeat of each; who goes first alternates, so neither always runs warm."""
        for step in (mine, theirs) if r % 2 == 0 or sgl is None else (theirs, mine):
            if step is mine or sgl is not None:
                step()

    full_bytes, full_key = full4k.tobytes(), sgl.key(full4k) if sgl else None
    for r in range(repeats):
        both(
            r,
            lambda: add("ours", "match 4K", ours.match(full_bytes)),
            lambda: add("sglang", "match 4K", sgl.match(full_key)),  # type: ignore[union-attr]
        )
    for length, tokens in news.items():
        label = f"{length // 1024}K"
        data = tokens.tobytes()

        def insert_ours(label: str = label, data: bytes = data) -> None:
            ins, drain = ours.insert(data)
            add("ours", f"insert {label}", ins)
            add("ours", f"drain after insert {label}", drain)

        def insert_theirs(label: str = label, tokens: np.ndarray = tokens) -> None:
            add("sglang", f"insert {label}", sgl.insert(tokens))  # type: ignore[union-attr]

        for r in range(repeats):
            both(r, insert_ours, insert_theirs)
    cursor = 0
    for r in range(max(10, repeats // 4)):
        both(
            r,
            lambda: add("ours", "evict 4,096 tokens", ours.evict(EVICT_TOKENS)),
            lambda: add("sglang", "evict 4,096 tokens", sgl.evict(EVICT_TOKENS)),  # type: ignore[union-attr]
        )
        # The least recently used prompts went; put them back (now the most recent).
        for p in cached[cursor : cursor + EVICT_TOKENS // 256]:
            ours.insert_untimed(p.tobytes())
            if sgl:
                sgl.insert_untimed(p)
        cursor += EVICT_TOKENS // 256
    # Back to back: one system's calls in a row, caches warm for it. The interleaved figures
    # above are the goal's; these show how much of a figure is the other system's doing.
    b2b: dict[str, dict[str, list[float]]] = {"ours": {}, "sglang": {}}
    b2b["ours"]["match 4K"] = [ours.match(full_bytes) for _ in range(repeats)]
    if sgl:
        b2b["sglang"]["match 4K"] = [sgl.match(full_key) for _ in range(repeats)]
    for length, tokens in news.items():
        label, data = f"insert {length // 1024}K", tokens.tobytes()
        b2b["ours"][label] = [ours.insert(data)[0] for _ in range(repeats)]
        if sgl:
            b2b["sglang"][label] = [sgl.insert(tokens) for _ in range(repeats)]
    ours.pool.check_integrity(deep=False)
    result: dict[str, Any] = {
        "back_to_back": {
            system: {k: _p50_us(v) for k, v in figures.items()} for system, figures in b2b.items()
        },
        "ours": {k: _p50_us(v) for k, v in times["ours"].items()},
        "sglang": {k: _p50_us(v) for k, v in times["sglang"].items()},
        "goals_p50_us": GOALS_US,
        "sglang_source": getattr(mod, "SOURCE", None),
        "sglang_version": getattr(mod, "VERSION", None),
    }
    return result


def rows(result: dict[str, Any]) -> list[list[str]]:
    from bench.report import fmt

    out = []
    b2b = result["back_to_back"]
    for name, ours in result["ours"].items():
        sgl = result["sglang"].get(name)
        goal = GOALS_US.get(name)
        ours_b2b, sgl_b2b = b2b["ours"].get(name), b2b["sglang"].get(name)
        out.append(
            [
                name,
                fmt(ours["p50_us"]),
                fmt(sgl["p50_us"]) if sgl else "-",
                fmt(goal) if goal is not None else "-",
                ("yes" if ours["p50_us"] <= goal else "no") if goal is not None else "",
                fmt(ours_b2b["p50_us"]) if ours_b2b else "-",
                fmt(sgl_b2b["p50_us"]) if sgl_b2b else "-",
            ]
        )
    return out


HEADERS = [
    "op (p50 us, interleaved)",
    "ours",
    "SGLang RadixCache",
    "goal",
    "met",
    "ours back-to-back",
    "SGLang back-to-back",
]


def absent_line() -> str:
    return (
        f"SGLang RadixCache: not found (pass --sglang-radix PATH/radix_cache.py, set "
        f"MEMSERVE_SGLANG_RADIX, or `make bench-baselines` installs sglang=={sglang_radix.SGLANG_VERSION} "
        "--no-deps); its column is empty"
    )
