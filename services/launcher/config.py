"""The cluster file of `memserve up` (deploy/local.toml): a `[cluster]` table for the shape,
plus `[scheduler]`, `[gateway]`, `[worker]` (and `[worker.engine]`), `[mempool]` and `[api]` tables
passed as they are to every process of that kind (each process validates its own).

Environment: MEMSERVE_CLUSTER__MODE=pd-basic, MEMSERVE_WORKER__ENGINE__NUM_THREADS=2, ...
"""

from __future__ import annotations

from typing import Any

import msgspec

from common.config import load_config
from common.kv_geometry import KVGeometry
from common.modes import BASE_MODES, MODES
from services.mempool.config import MempoolConfig

DEFAULT_RUN_DIR = ".memserve/run"


class ClusterConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    mode: str = "pd-caching-3"
    caching: bool = True  # colocated mode: context caching on or off
    policy: str = "locality"
    model: str = "tiny"
    # Instances per role. None: 1 of each role the mode uses, 0 of the others. Other roles
    # may run too (an admin can switch the scheduler's mode at run time).
    prefill: int | None = None
    decode: int | None = None
    colocated: int | None = None
    admin_token: str = ""  # "" = a fresh random token per run, printed at start
    # The cluster key (common/security.py): a key file (0600), or the secret itself from
    # MEMSERVE_CLUSTER__SECRET_KEY. Neither: a key made in run_dir for this local cluster.
    key_file: str | None = None
    secret_key: str | None = None
    host: str = "127.0.0.1"  # where every socket binds
    run_dir: str = DEFAULT_RUN_DIR  # one log file per process (and the local cluster key)
    ready_timeout_s: float = 180.0
    stop_timeout_s: float = 15.0
    # A child that crashes (non-zero exit or a signal) is started again on the endpoints it
    # had, after a backoff doubling from restart_backoff_s up to restart_backoff_max_s (back
    # to the start once it stayed up restart_stable_s). False: a crashed scheduler or
    # gateway ends the cluster, a crashed worker or daemon stays down.
    restart: bool = True
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    restart_stable_s: float = 30.0

    def validate(self) -> ClusterConfig:
        if self.mode not in BASE_MODES:
            raise ValueError(
                f"cluster.mode must be one of {'|'.join(BASE_MODES)}, got {self.mode!r}"
            )
        counts = self.counts()
        for role, n in counts.items():
            if not 0 <= n <= 64:
                raise ValueError(f"cluster.{role} must be in [0, 64], got {n}")
        for role in MODES[self.mode].roles:
            if counts[role] == 0:
                raise ValueError(f"cluster.mode {self.mode} needs cluster.{role} >= 1")
        if self.ready_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("cluster.ready_timeout_s and stop_timeout_s must be > 0")
        if not 0 < self.restart_backoff_s <= self.restart_backoff_max_s:
            raise ValueError(
                "cluster.restart_backoff_s must be > 0 and <= cluster.restart_backoff_max_s"
            )
        if self.restart_stable_s <= 0:
            raise ValueError("cluster.restart_stable_s must be > 0")
        return self

    def counts(self) -> dict[str, int]:
        pd = MODES[self.mode].disaggregated
        return {
            "prefill": int(pd) if self.prefill is None else self.prefill,
            "decode": int(pd) if self.decode is None else self.decode,
            "colocated": int(not pd) if self.colocated is None else self.colocated,
        }

    def roles(self) -> list[str]:
        return [role for role, n in self.counts().items() for _ in range(n)]


class ClusterSettings(msgspec.Struct, forbid_unknown_fields=True):
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    scheduler: dict[str, Any] = msgspec.field(default_factory=dict)
    gateway: dict[str, Any] = msgspec.field(default_factory=dict)
    worker: dict[str, Any] = msgspec.field(default_factory=dict)
    mempool: dict[str, Any] = msgspec.field(default_factory=dict)
    # The OpenAI HTTP API process: `enabled = false` leaves it out; the rest is its
    # `[api]` table (services/api/config.py).
    api: dict[str, Any] = msgspec.field(default_factory=dict)


def kv_capacity(settings: ClusterSettings) -> tuple[KVGeometry, int]:
    """Each instance's KV block geometry and device blocks, as its daemon will size them
    (the same `MempoolConfig` methods the daemon calls)."""
    cfg = msgspec.convert({**settings.mempool, "model": settings.cluster.model}, MempoolConfig)
    geometry = cfg.geometry()
    return geometry, cfg.device_block_count(geometry.block_bytes)


def load(path: str | None, overrides: dict[str, Any] | None = None) -> ClusterSettings:
    settings = load_config(ClusterSettings, path, overrides=overrides)
    settings.cluster.validate()
    return settings
