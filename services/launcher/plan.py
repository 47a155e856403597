"""Which processes a cluster is made of, in start order, and the settings of each (pure).

    stage 0: scheduler
    stage 1: one MemPool daemon per worker          (they need nothing)
    stage 2: workers                                (their daemon's RPC, the scheduler)
    stage 3: gateway                                (the scheduler)

Addresses are not fixed in advance: every socket binds port 0 unless the cluster file
names it, and `links` say which endpoint of an earlier process fills which setting once
that process reported ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.launcher.config import ClusterSettings


@dataclass
class ProcSpec:
    kind: str  # scheduler | mempool | worker | gateway
    instance_id: str
    stage: int
    settings: dict[str, Any]
    # setting key -> (instance id, endpoint name) of a process from an earlier stage
    links: dict[str, tuple[str, str]] = field(default_factory=dict)


def any_port(host: str) -> str:
    return f"tcp://{host}:0"


def plan(settings: ClusterSettings, admin_token: str) -> list[ProcSpec]:
    c = settings.cluster
    host = any_port(c.host)
    specs = [
        ProcSpec(
            "scheduler",
            "scheduler",
            0,
            {
                "address": host,
                "heartbeat_address": host,
                "events_address": host,
                "admin_address": host,
                **settings.scheduler,
                "mode": c.mode,
                "caching": c.caching,
                "policy": c.policy,
                "admin_token": admin_token,
            },
        )
    ]
    counters: dict[str, int] = {}
    for role in c.roles():
        i = counters[role] = counters.get(role, -1) + 1
        wid = f"{role}-{i}"
        kv = f"{wid}-mempool"
        specs.append(
            ProcSpec(
                "mempool",
                kv,
                1,
                {
                    "control_address": host,
                    "events_address": host,
                    "data_host": c.host,
                    **settings.mempool,
                    "model": c.model,
                    "admin_token": admin_token,
                },
            )
        )
        worker = dict(settings.worker)
        engine = {**worker.pop("engine", {}), "model": c.model}
        specs.append(
            ProcSpec(
                "worker",
                wid,
                2,
                {
                    "address": host,
                    "control_address": host,
                    **worker,
                    "role": role,
                    "admin_token": admin_token,
                    "engine": engine,
                },
                {"mempool": (kv, "rpc"), "scheduler": ("scheduler", "heartbeats")},
            )
        )
    specs.append(
        ProcSpec(
            "gateway",
            "gateway",
            3,
            {
                "address": any_port(c.host),
                "reply_address": host,
                "control_address": host,
                **settings.gateway,
                "model": c.model,
                "admin_token": admin_token,
            },
            {"scheduler": ("scheduler", "rpc"), "scheduler_events": ("scheduler", "events")},
        )
    )
    return specs


def env_for(kind: str, settings: dict[str, Any]) -> dict[str, str]:
    """MEMSERVE_<KIND>__<KEY>[__<SUBKEY>] variables that set `settings` in the child."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}__{k.upper()}", v)
        else:
            out[prefix] = _toml_value(value)

    walk(f"MEMSERVE_{kind.upper()}", settings)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value  # str-typed keys take the text verbatim
    if isinstance(value, list):
        return "[" + ", ".join(_quoted(v) for v in value) + "]"
    return str(value)


def _quoted(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return _toml_value(value)
