"""SGLang's own `RadixCache` (sglang/srt/mem_cache/radix_cache.py), loaded from its file.

The file imports sglang internals (allocators, metrics, KV events, the runtime context) that
pull in the whole engine. The radix tree uses none of them on the path we measure, so this
loader executes the unchanged file against small stand-ins for exactly the names it imports:
the parameter/result dataclasses (the fields the tree touches), a disabled KV-event recorder
(SGLang's default: `enable_kv_cache_events=False`, every `record_*` returns at once), no
metrics collector (`enable_metrics=False`), and SGLang's real `evict_policy.py` when it sits
next to the file. torch is real (the tree keeps its values as tensors).

Where the file comes from, first hit wins: the `path` argument, `$MEMSERVE_SGLANG_RADIX`, an
installed `sglang` package (`make bench-baselines`: `pip install --no-deps sglang==0.5.23`;
the package is located, never imported). `load()` returns None when none is there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, NamedTuple

SGLANG_VERSION = "0.5.23"
_REL = Path("srt/mem_cache/radix_cache.py")


def find(path: str | None = None) -> Path | None:
    """The radix_cache.py to load, or None."""
    for candidate in (path, os.environ.get("MEMSERVE_SGLANG_RADIX")):
        if candidate:
            p = Path(candidate)
            return p if p.is_file() else None
    try:
        spec = importlib.util.find_spec("sglang")  # locates the package, runs none of it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        p = Path(root) / _REL
        if p.is_file():
            return p
    return None


def version_of(radix_file: Path) -> str | None:
    """The sglang version the file belongs to (its package's `_version.py`), if known."""
    stamp = radix_file.parents[2] / "_version.py"
    if stamp.is_file():
        m = re.search(r"__version__\s*=.*?['\"]([^'\"]+)['\"]", stamp.read_text())
        if m:
            return m.group(1)
    return None


# ----------------------------------------------------------------- stand-ins
@dataclasses.dataclass
class CacheInitParams:
    disable: bool
    req_to_token_pool: Any
    token_to_kv_pool_allocator: Any
    page_size: int
    is_eagle: bool = False
    eviction_policy: str = "lru"
    eviction_policy_config: dict[str, Any] | None = None
    enable_metrics: bool = False
    enable_kv_cache_events: bool = False
    dynamo_kv_event_format: bool = False
    kv_event_lora_names: Any = None


@dataclasses.dataclass
class MatchPrefixParams:
    key: Any
    cow_mamba: bool = False
    req: Any = None


@dataclasses.dataclass
class InsertParams:
    key: Any = None
    value: Any = None
    prev_prefix_len: int = 0
    inserted_len: int = 0
    priority: int = 0


@dataclasses.dataclass
class InsertResult:
    prefix_len: int
    total_len: int = 0
    last_device_node: Any = None


@dataclasses.dataclass
class EvictParams:
    num_tokens: int = 0


@dataclasses.dataclass
class EvictResult:
    num_tokens_evicted: int = 0


@dataclasses.dataclass
class IncLockRefResult:
    delta: int = 0


@dataclasses.dataclass
class DecLockRefParams:
    pass


@dataclasses.dataclass
class DecLockRefResult:
    delta: int = 0


class MatchResult(NamedTuple):
    device_prefix_len: int
    last_device_node: Any
    last_host_node: Any
    best_match_node: Any
    host_hit_length: int = 0


class BasePrefixCache:
    metrics_collector = None

    def init_metrics_collector(self) -> None:
        pass

    def update_eviction_metrics(self, num_evicted: int, start_time: float) -> None:
        pass


class KVCacheEventRecorder:
    """SGLang's recorder with events off: every `record_*` is a no-op."""

    def __init__(self, *, enabled: bool, **_: Any):
        assert not enabled, "the stand-in records no KV events"
        self.enabled = False

    def record_store(self, node: Any, medium: Any = None, **_: Any) -> None:
        pass

    def record_remove(self, node: Any, medium: Any = None) -> None:
        pass

    def record_all_cleared(self) -> None:
        pass


class LoRANameTable:
    pass


class _LRUStrategy:
    def get_priority(self, node: Any) -> float:
        return float(node.last_access_time)


def split_node_hash_value(child_hash_value: Any, split_len: int, page_size: int) -> Any:
    if child_hash_value is None:
        return None, None
    pages = split_len if page_size == 1 else split_len // page_size
    return child_hash_value[:pages], child_hash_value[pages:]


def ceil_align(x: int, y: int) -> int:
    return -(-x // y) * y


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _eviction_strategies(radix_file: Path) -> Any:
    """SGLang's own LRU strategy from evict_policy.py next to the file, else the stand-in."""
    policy = radix_file.with_name("evict_policy.py")
    if policy.is_file():
        spec = importlib.util.spec_from_file_location("_memserve_sglang_evict_policy", policy)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.LRUStrategy
    return _LRUStrategy


def load(path: str | None = None) -> types.ModuleType | None:
    """The radix_cache module, executed against the stand-ins; None when absent."""
    radix_file = find(path)
    if radix_file is None:
        return None
    lru = _eviction_strategies(radix_file)
    pkg = "sglang.srt.mem_cache"
    stubs = {
        f"{pkg}.cache_init_params": _module(
            f"{pkg}.cache_init_params", CacheInitParams=CacheInitParams
        ),
        f"{pkg}.base_prefix_cache": _module(
            f"{pkg}.base_prefix_cache",
            BasePrefixCache=BasePrefixCache,
            DecLockRefParams=DecLockRefParams,
            DecLockRefResult=DecLockRefResult,
            EvictParams=EvictParams,
            EvictResult=EvictResult,
            IncLockRefResult=IncLockRefResult,
            InsertParams=InsertParams,
            InsertResult=InsertResult,
            MatchPrefixParams=MatchPrefixParams,
            MatchResult=MatchResult,
        ),
        f"{pkg}.events": _module(
            f"{pkg}.events", KVCacheEventRecorder=KVCacheEventRecorder, LoRANameTable=LoRANameTable
        ),
        f"{pkg}.utils": _module(
            f"{pkg}.utils",
            get_eviction_strategy=lambda policy, config=None: lru(),
            split_node_hash_value=split_node_hash_value,
        ),
        "sglang.srt.utils.common": _module("sglang.srt.utils.common", ceil_align=ceil_align),
    }
    # The stand-ins are visible only while the file runs, so a real sglang is never shadowed.
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("_memserve_sglang_radix_cache", radix_file)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    mod.SOURCE = str(radix_file)  # type: ignore[attr-defined]
    mod.VERSION = version_of(radix_file)  # type: ignore[attr-defined]
    return mod
