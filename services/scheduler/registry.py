"""Which instances exist, as their heartbeats say.

    first heartbeat ──▶ registered (epoch e) ──heartbeats──▶ ... ──silence > timeout──▶ dropped
                              │  started_at changed: restarted ─▶ a new epoch, old state gone
                              └─ healthy=False / drain: stays registered, not eligible

Invariants:
- one `Instance` per id; its `epoch` is unique over the registry's life, so anything
  recorded against an incarnation (load charges, tree entries) can tell it is stale;
- an instance is eligible for placements iff registered, healthy and not drained;
- draining is the operator's word about an id: it outlives restarts and drops, until undrain;
- `charged_tokens` belongs to one incarnation: a restarted or dropped instance starts at 0;
- at most `max_instances` ids are registered: a heartbeat of a new id beyond that is
  refused (RegistryFullError), while registered ids keep refreshing and restarting.
Times are the caller's monotonic clock; nothing here reads a clock or a socket.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from common.errors import ErrorKind, MemServeError
from common.modes import ROLES
from common.protocol.scheduler import Heartbeat, InstanceLoad


class UnknownInstanceError(MemServeError, LookupError):
    """An admin command named an instance the registry does not know."""


class RegistryFullError(MemServeError):
    """A heartbeat of a new instance came while `max_instances` are registered."""

    kind = ErrorKind.REFUSED


@dataclass
class Instance:
    instance_id: str
    role: str
    address: str
    mempool: str
    events: str
    control: str
    block_size: int
    block_bytes: int
    started_at: float
    epoch: int
    registered_at: float
    last_seen: float
    healthy: bool = True
    load: InstanceLoad = field(default_factory=InstanceLoad)
    charged_tokens: int = 0  # placed and not yet released (see core.py)

    @property
    def kv_usage(self) -> float:
        total = self.load.kv_total_blocks
        return self.load.kv_used_blocks / total if total > 0 else 0.0


@dataclass(frozen=True)
class Seen:
    """What one heartbeat changed."""

    instance: Instance
    new: bool  # first heartbeat of this incarnation (registered or restarted)
    replaced: Instance | None = None  # the previous incarnation, when the worker restarted
    health_changed: bool = False  # healthy flipped on an already registered instance


class Registry:
    def __init__(self, heartbeat_timeout_s: float, max_instances: int = 256):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_instances = max_instances
        self._instances: dict[str, Instance] = {}
        self._drained: set[str] = set()
        self._epochs = itertools.count(1)

    def heartbeat(self, hb: Heartbeat, now: float) -> Seen:
        """Register or refresh `hb.instance_id`. Raises ValueError for a heartbeat that
        cannot describe an instance (unknown role, no block size), RegistryFullError for a
        new id while `max_instances` are registered."""
        if hb.role not in ROLES:
            raise ValueError(f"heartbeat of {hb.instance_id!r}: unknown role {hb.role!r}")
        if not hb.instance_id or hb.block_size <= 0:
            raise ValueError(f"heartbeat of {hb.instance_id!r}: no id or block_size <= 0")
        old = self._instances.get(hb.instance_id)
        if old is not None and old.started_at == hb.started_at and old.role == hb.role:
            changed = old.healthy != hb.healthy
            old.last_seen = now
            old.load = hb.load
            old.healthy = hb.healthy
            # Addresses may move while the process lives (a re-bound socket): follow them.
            old.address, old.mempool, old.control = hb.address, hb.mempool, hb.control
            old.block_bytes = hb.block_bytes
            return Seen(old, new=False, health_changed=changed)
        if old is None and len(self._instances) >= self.max_instances:
            raise RegistryFullError(
                f"heartbeat of {hb.instance_id!r}: {self.max_instances} instances registered "
                "already (scheduler.max_instances)"
            )
        inst = Instance(
            hb.instance_id,
            hb.role,
            hb.address,
            hb.mempool,
            hb.events,
            hb.control,
            hb.block_size,
            hb.block_bytes,
            hb.started_at,
            next(self._epochs),
            now,
            now,
            hb.healthy,
            hb.load,
        )
        self._instances[hb.instance_id] = inst
        return Seen(inst, new=True, replaced=old)

    def expire(self, now: float) -> list[Instance]:
        """Drop and return every instance silent for longer than the heartbeat timeout."""
        deadline = now - self.heartbeat_timeout_s
        gone = [i for i in self._instances.values() if i.last_seen < deadline]
        for inst in gone:
            del self._instances[inst.instance_id]
        return gone

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def instances(self) -> list[Instance]:
        return sorted(self._instances.values(), key=lambda i: i.instance_id)

    def is_drained(self, instance_id: str) -> bool:
        return instance_id in self._drained

    def is_eligible(self, inst: Instance) -> bool:
        return inst.healthy and inst.instance_id not in self._drained

    def eligible(self, role: str) -> list[Instance]:
        """Instances of `role` that may take new placements, sorted by id."""
        return [i for i in self.instances() if i.role == role and self.is_eligible(i)]

    def drain(self, instance_id: str) -> Instance:
        inst = self._known(instance_id)
        self._drained.add(instance_id)
        return inst

    def undrain(self, instance_id: str) -> Instance | None:
        """Undrain a registered or a gone instance; UnknownInstanceError when the id was
        never drained and is not registered (a typo)."""
        if instance_id not in self._drained:
            self._known(instance_id)
        self._drained.discard(instance_id)
        return self._instances.get(instance_id)

    def _known(self, instance_id: str) -> Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            known = ", ".join(self._instances) or "none"
            raise UnknownInstanceError(
                f"no registered instance {instance_id!r} (registered: {known})"
            )
        return inst

    def state(self, inst: Instance) -> str:
        if not inst.healthy:
            return "unhealthy"
        return "drained" if inst.instance_id in self._drained else "up"
