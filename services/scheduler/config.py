"""Global scheduler configuration: the `[scheduler]` table (env: MEMSERVE_SCHEDULER__KEY).

Routing knobs follow the SGLang router's rule (see `policy.py`): the cluster counts as
imbalanced when max_load - min_load > `balance_abs_threshold_tokens` AND max_load >
`balance_rel_threshold` * min_load; then the least loaded instance wins, else the longest
cached prefix when it covers more than `cache_threshold` of the prompt.

Transfer vs recompute (MemServe): fetch a longer prefix from another instance only when
moving its extra blocks (bytes / `transfer_bytes_per_s`) costs less than computing them,
exec(x, y) = x * (1 - y) / `prefill_tokens_per_s` + `attention_coeff` * x^2 * (1 - y).
"""

from __future__ import annotations

import msgspec

from common.config import SharedFile
from common.metrics import check_address
from common.modes import BASE_MODES

POLICIES = ("locality", "least-load", "round-robin", "session")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


STRATEGIES = ("kunserve", "migrate", "none")


class SchedulerConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    instance_id: str = "scheduler"
    address: str = "tcp://127.0.0.1:0"  # Place / Release from gateways (RPC, bound)
    heartbeat_address: str = "tcp://127.0.0.1:0"  # worker heartbeats (PULL, bound)
    events_address: str = "tcp://127.0.0.1:0"  # InstanceUp / Down / ClusterShutdown (PUB)
    admin_address: str = "tcp://127.0.0.1:0"  # `memserve admin` (RPC); "" turns it off
    # Prometheus /metrics over HTTP (common/metrics.py): host:port, "" = off (loopback by
    # default; elsewhere it exposes counts only).
    metrics_address: str = "127.0.0.1:0"
    admin_allow_remote: bool = False  # the admin socket may bind beyond loopback
    admin_token: str = ""  # from the config file or MEMSERVE_SCHEDULER__ADMIN_TOKEN
    mode: str = "colocated"  # colocated | pd-basic | pd-caching-1 | pd-caching-2 | pd-caching-3
    caching: bool = True  # colocated mode: workers match and insert (P/D modes: per mode)
    policy: str = "locality"  # locality | least-load | round-robin | session
    heartbeat_timeout_s: float = 2.0  # silence after which an instance is dropped
    # Registered instances at most: a heartbeat of a new id beyond it is refused, so a
    # flood of heartbeats cannot grow the scheduler's state (or its connections) unbounded.
    max_instances: int = 256
    tree_ttl_s: float = 600.0  # cached blocks not re-stored for this long are forgotten
    charge_ttl_s: float = 3600.0  # a placement never released (its gateway died) expires
    balance_abs_threshold_tokens: int = 2048
    balance_rel_threshold: float = 1.5
    cache_threshold: float = 0.3  # min matched ratio for locality to prefer the prefix holder
    fetch: bool = True  # consider pulling a longer prefix from another instance
    prefill_tokens_per_s: float = 20000.0
    attention_coeff: float = 1e-9  # seconds per token^2 (the a * x^2 * y attention term)
    transfer_bytes_per_s: float = 2e9
    min_fetch_tokens: int = 64
    # `elastic drop`: how long members may take to answer Prepare (else Abort), and how
    # long a Commit, Restore or Break may take.
    elastic_prepare_timeout_s: float = 2.0
    elastic_timeout_s: float = 10.0
    # A restore runs live (requests go home in batches while the group serves the rest;
    # what is left after half of elastic_timeout_s goes home in one pause) unless false.
    elastic_restore_live: bool = True
    # The elastic controller (monitor.py decides, planner.py picks the groups): drop and
    # restore by itself from the heartbeats' KV signals; `memserve admin elastic on|off`.
    # Defaults are KunServe's public code's (poll 0.1 s, 95% / 50%, 30 samples).
    elastic_auto: bool = False
    elastic_poll_s: float = 0.1  # how often votes are counted and groups checked
    elastic_drop_usage: float = 0.95  # an instance votes at this KV usage (and a full queue)
    elastic_restore_usage: float = 0.5  # a group restores when its KV fits this share of
    # what its members held before the drop
    elastic_window: int = 30  # samples over which a group's demand must be falling
    elastic_debounce: int = 2  # consecutive polls the votes must hold
    elastic_cooldown_s: float = 5.0  # no automatic action this soon after a drop or restore
    elastic_min_group_s: float = 5.0  # a group younger than this never restores by itself
    elastic_max_group: int = 2  # members of one group at most
    # What the controller does when instances vote (their KV is full with a queue):
    # kunserve (drop parameters into groups), migrate (Llumnix-style: move a running
    # request from the fullest voter to the emptiest instance; the KV-centric baseline),
    # none (only count votes).
    elastic_strategy: str = "kunserve"
    # Ablations of the automatic drop and restore (the commanded ones are unaffected):
    # exchange false: the running requests are recomputed in the group instead of keeping
    # their KV (`kunserve-recompute`, Commit.exchange); restore false: a group is never
    # restored by the controller, only by `memserve admin elastic restore`
    # (`kunserve-norestore`).
    elastic_exchange: bool = True
    elastic_restore: bool = True
    log_level: str = "info"

    def validate(self) -> SchedulerConfig:
        if not self.instance_id:
            raise ValueError("scheduler.instance_id must not be empty")
        for key in ("address", "heartbeat_address", "events_address"):
            if not getattr(self, key):
                raise ValueError(f"scheduler.{key} must not be empty")
        check_address("scheduler.metrics_address", self.metrics_address)
        if self.mode not in BASE_MODES:
            raise ValueError(
                f"scheduler.mode must be one of {'|'.join(BASE_MODES)}, got {self.mode!r}"
            )
        if self.policy not in POLICIES:
            raise ValueError(
                f"scheduler.policy must be one of {'|'.join(POLICIES)}, got {self.policy!r}"
            )
        if self.admin_address:
            if not self.admin_token:
                raise ValueError(
                    "scheduler.admin_token is required while the admin socket is on: set it in "
                    "the config file or MEMSERVE_SCHEDULER__ADMIN_TOKEN "
                    '(or admin_address = "" to turn the admin socket off)'
                )
            if not self.admin_allow_remote and not is_loopback(self.admin_address):
                raise ValueError(
                    f"scheduler.admin_address {self.admin_address!r} is not a loopback address; "
                    "set scheduler.admin_allow_remote = true to serve admin beyond this host"
                )
        if self.max_instances < 1:
            raise ValueError(f"scheduler.max_instances must be >= 1, got {self.max_instances}")
        positive = (
            "heartbeat_timeout_s",
            "tree_ttl_s",
            "charge_ttl_s",
            "balance_rel_threshold",
            "prefill_tokens_per_s",
            "transfer_bytes_per_s",
            "elastic_prepare_timeout_s",
            "elastic_timeout_s",
            "elastic_poll_s",
        )
        for key in positive:
            if not getattr(self, key) > 0:
                raise ValueError(f"scheduler.{key} must be > 0, got {getattr(self, key)}")
        for key in ("balance_abs_threshold_tokens", "attention_coeff", "min_fetch_tokens"):
            if getattr(self, key) < 0:
                raise ValueError(f"scheduler.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("elastic_cooldown_s", "elastic_min_group_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"scheduler.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.elastic_restore_usage < self.elastic_drop_usage <= 1:
            raise ValueError(
                "scheduler.elastic_restore_usage < elastic_drop_usage must both be in (0, 1], "
                f"got {self.elastic_restore_usage} and {self.elastic_drop_usage}"
            )
        for key in ("elastic_window", "elastic_debounce"):
            if getattr(self, key) < 1:
                raise ValueError(f"scheduler.{key} must be >= 1, got {getattr(self, key)}")
        if self.elastic_strategy not in STRATEGIES:
            raise ValueError(
                f"scheduler.elastic_strategy must be one of {'|'.join(STRATEGIES)}, "
                f"got {self.elastic_strategy!r}"
            )
        if self.elastic_max_group < 2:
            raise ValueError(
                f"scheduler.elastic_max_group must be >= 2, got {self.elastic_max_group}"
            )
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError(
                f"scheduler.cache_threshold must be in [0, 1], got {self.cache_threshold}"
            )
        return self


class SchedulerSettings(SharedFile, forbid_unknown_fields=True):
    """Root of a scheduler config file: a `[scheduler]` table (env: MEMSERVE_SCHEDULER__KEY)."""

    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)  # type: ignore[assignment]  # typed: this service's table


def is_loopback(address: str) -> bool:
    """Whether a ZeroMQ endpoint is reachable from this host only (ipc / inproc / loopback)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://") :].rpartition(":")[0]
    return host in _LOOPBACK_HOSTS or host.startswith("127.")
