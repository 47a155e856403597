"""Which processes a cluster is made of, in start order, and the settings of each (pure).

    stage 0: scheduler
    stage 1: one MemPool daemon per worker          (they need nothing)
    stage 2: workers                                (their daemon's RPC, the scheduler)
    stage 3: gateway                                (the scheduler)
    stage 4: api (OpenAI HTTP; `[api] enabled`)     (the gateway's client address)

Addresses are not fixed in advance: every socket binds port 0 unless the cluster file
names it, and `links` say which endpoint of an earlier process fills which setting once
that process reported ready. A restarted process binds the ports it had (`pinned`), so
the peers that connect to it (ZeroMQ reconnects by itself) find it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.launcher.config import ClusterSettings


@dataclass
class ProcSpec:
    kind: str  # scheduler | mempool | worker | gateway | api
    instance_id: str
    stage: int
    settings: dict[str, Any]
    # setting key -> (instance id, endpoint name) of a process from an earlier stage
    links: dict[str, tuple[str, str]] = field(default_factory=dict)


# Every process serves /metrics on loopback, any port, unless its kind's table says
# otherwise (e.g. metrics_address = "0.0.0.0:0" for a Prometheus on another host; "" = off).
METRICS = "127.0.0.1:0"


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
                "metrics_address": METRICS,
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
                    "metrics_address": METRICS,
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
                    "metrics_address": METRICS,
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
                "metrics_address": METRICS,
                **settings.gateway,
                "model": c.model,
                "admin_token": admin_token,
            },
            {"scheduler": ("scheduler", "rpc"), "scheduler_events": ("scheduler", "events")},
        )
    )
    api = dict(settings.api)
    if api.pop("enabled", True):
        specs.append(
            ProcSpec(
                "api",
                "api",
                4,
                {"address": f"http://{c.host}:0", **api, "model": c.model},
                {"gateway": ("gateway", "clients")},
            )
        )
    return specs


# Per kind: the endpoint a process reports when ready -> the setting that binds it.
REBIND: dict[str, dict[str, str]] = {
    "scheduler": {
        "rpc": "address",
        "heartbeats": "heartbeat_address",
        "events": "events_address",
        "admin": "admin_address",
        "metrics": "metrics_address",
    },
    "mempool": {"rpc": "control_address", "events": "events_address", "metrics": "metrics_address"},
    "worker": {"requests": "address", "control": "control_address", "metrics": "metrics_address"},
    "gateway": {
        "clients": "address",
        "replies": "reply_address",
        "control": "control_address",
        "metrics": "metrics_address",
    },
    "api": {"http": "address"},  # its /metrics is on the same port
}


def pinned(spec: ProcSpec, endpoints: dict[str, str]) -> dict[str, Any]:
    """`spec.settings` with every port-0 address its process bound replaced by the port it
    got (reported in `endpoints`): the host stays as configured (it may be 0.0.0.0 while
    the endpoint advertises another name); fixed ports stay as they are."""
    settings = dict(spec.settings)
    for endpoint, key in REBIND.get(spec.kind, {}).items():
        value, bound = settings.get(key), endpoints.get(endpoint)
        if isinstance(value, str) and value.endswith(":0") and bound:
            port = bound.rsplit(":", 1)[1].split("/", 1)[0]  # (an http URL has a path)
            settings[key] = f"{value[:-2]}:{port}"
    return settings


def stable_endpoints(kind: str, endpoints: dict[str, str]) -> dict[str, str]:
    """The endpoints a restart keeps (others, like a daemon's shm segment, are new)."""
    return {k: v for k, v in endpoints.items() if k in REBIND.get(kind, {})}


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
