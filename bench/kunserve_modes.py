"""The KunServe evaluation's modes (arXiv 2412.18169, §6): each one a colocated cluster
with the same memory budget per instance, named as `memserve bench serve --modes` takes
them beside the caching modes of common/modes.py.

| mode                | preemption | scheduler `[scheduler]` keys                        |
| ------------------- | ---------- | --------------------------------------------------- |
| dp-recompute        | recompute  | elastic_auto = false (vLLM)                         |
| dp-swap             | swap       | elastic_auto = false (InferCept-like swap to host)  |
| dp-migrate          | recompute  | elastic_auto, elastic_strategy = migrate (Llumnix)  |
| kunserve            | recompute  | elastic_auto, strategy kunserve (live exchange, restore) |
| kunserve-recompute  | recompute  | ... elastic_exchange = false                        |
| kunserve-norestore  | recompute  | ... elastic_restore = false                         |

Equal memory: every instance gets `[mempool] budget_bytes` = the budget; the baselines
never drop, so their KV is the budget less the parameters; KunServe starts the same and
lends the parameters it drops. `dp-swap` sets `[worker.engine] preemption_mode = "swap"`
and gives each daemon a host tier (`SWAP_HOST_FACTOR` x the budget's KV, host DRAM being
plentiful, as InferCept assumes) for preempted requests' KV. Pure: no processes, no
sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 1 << 20


@dataclass(frozen=True)
class ElasticMode:
    name: str
    about: str
    strategy: str = ""  # "" = the controller off (it still counts votes)
    exchange: bool = True
    restore: bool = True
    preemption: str = "recompute"

    def scheduler(self) -> dict[str, Any]:
        if not self.strategy:
            return {"elastic_auto": False}
        return {
            "elastic_auto": True,
            "elastic_strategy": self.strategy,
            "elastic_exchange": self.exchange,
            "elastic_restore": self.restore,
        }


KUNSERVE_MODES: dict[str, ElasticMode] = {
    m.name: m
    for m in (
        ElasticMode("dp-recompute", "data parallel, preemption by recompute (vLLM)"),
        ElasticMode("dp-swap", "data parallel, preemption by swap (InferCept)", preemption="swap"),
        ElasticMode("dp-migrate", "data parallel, requests migrate (Llumnix)", strategy="migrate"),
        ElasticMode("kunserve", "parameter drop, live KV exchange, restore", strategy="kunserve"),
        ElasticMode(
            "kunserve-recompute", "KunServe recomputing instead of exchanging", "kunserve", False
        ),
        ElasticMode(
            "kunserve-norestore", "KunServe never restoring by itself", "kunserve", restore=False
        ),
    )
}

# What every KunServe-mode cluster adds to the scheduler and workers: heartbeats often
# enough for the controller's samples, and a drop threshold that holds under preemption
# (usage saws below full while instances preempt: 0.95 holds only part of the time, see
# tests/test_kunserve_auto.py). Baselines get the same (their controller only counts).
SCHEDULER_DEFAULTS: dict[str, Any] = {"elastic_drop_usage": 0.8}
WORKER_DEFAULTS: dict[str, Any] = {"heartbeat_interval_s": 0.1}
SWAP_HOST_FACTOR = 4  # dp-swap: host tier = 4 x the device KV of the budget


def is_kunserve_mode(name: str) -> bool:
    return name in KUNSERVE_MODES


def budget_bytes(model: str, budget_mib: float | None, kv_mib: float) -> tuple[int, int]:
    """(budget, parameter bytes) per instance for `model`: `budget_mib` MiB, or the
    parameters + `kv_mib` when None. ValueError naming the figures when the budget does
    not hold the parameters and one KV block."""
    from bench.elastic_cluster import param_bytes
    from services.mempool.config import MempoolConfig

    params = param_bytes(model)
    budget = int(budget_mib * MIB) if budget_mib is not None else params + int(kv_mib * MIB)
    block = MempoolConfig(model=model).geometry().block_bytes
    if budget < params + block:
        raise ValueError(
            f"--budget-mib {budget / MIB:g}: model {model}'s parameters take "
            f"{params / MIB:.1f} MiB; the budget must hold them and at least one KV block "
            f"({block / 1024:g} KiB): give at least {(params + block) / MIB:.1f}"
        )
    return budget, params


def overrides(
    mode: ElasticMode,
    budget: int,
    extra: dict[str, dict[str, Any]] | None = None,
    *,
    param_bytes: int = 0,
) -> dict[str, dict[str, Any]]:
    """The scheduler, worker and mempool tables of a cluster in `mode` (the cluster table
    is the caller's); `extra` (--cluster-set) overrides them key by key, last.
    `param_bytes`: the model's, to size dp-swap's host tier from the budget's KV."""
    worker: dict[str, Any] = dict(WORKER_DEFAULTS)
    mempool: dict[str, Any] = {"budget_bytes": budget}
    if mode.preemption != "recompute":
        worker["engine"] = {"preemption_mode": mode.preemption}
        mempool["host_memory_bytes"] = SWAP_HOST_FACTOR * max(budget - param_bytes, 0)
    out = {
        "scheduler": {**SCHEDULER_DEFAULTS, **mode.scheduler()},
        "worker": worker,
        "mempool": mempool,
    }
    return merged(out, extra or {})


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra`'s keys set, tables merged key by key (a copy)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def parse_cluster_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """`SECTION.KEY=VALUE` items (e.g. scheduler.elastic_window=10) as nested tables;
    values are read as TOML values when they parse (numbers, true/false, "strings"),
    else kept as strings. ValueError naming the bad item."""
    import tomllib

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ValueError(f"--cluster-set {item!r}: expected SECTION.KEY=VALUE")
        if section not in ("scheduler", "gateway", "worker", "mempool"):
            raise ValueError(
                f"--cluster-set {item!r}: unknown section {section!r}; "
                "known: scheduler, gateway, worker, mempool"
            )
        try:
            value: Any = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        table = out.setdefault(section, {})
        *parents, leaf = name.split(".")
        for p in parents:  # worker.engine.num_threads
            table = table.setdefault(p, {})
        table[leaf] = value
    return out
