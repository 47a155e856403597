"""Which instances exist, as their heartbeats say.

    first heartbeat ──▶ registered (epoch e) ──heartbeats──▶ ... ──silence > timeout──▶ dropped
                              │  a new incarnation took over: restarted ─▶ a new epoch, old state gone
                              └─ healthy=False / drain: stays registered, not eligible

An incarnation is one worker process: (`started_at`, `incarnation` nonce) of its heartbeats.
An id belongs to its registered incarnation while that one is alive (heard from within
`heartbeat_timeout_s`): a heartbeat of another incarnation is refused (ClaimRefusedError),
since accepting it would end the holder's in-flight requests (InstanceDown "restarted")
or hand its placements to whoever sent it. It takes over (a restart) once the holder is
silent past the timeout, or at once when the holder itself reported unhealthy (its
requests failed already) and the newcomer names the very same addresses (so a stranger
cannot take over an unhealthy id to draw its placements elsewhere). Within an incarnation
the addresses (request, control, mempool, events) never change: a heartbeat naming others
is refused too. (Whether a heartbeat comes from whom it says is the sockets' CURVE
authentication; this stops a second process, or a replayed old heartbeat, from taking
over a live id.)

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


class ClaimRefusedError(MemServeError):
    """A heartbeat claimed a live instance's id for another incarnation, or moved a live
    incarnation's addresses. `reason` is one of a small fixed set (a log key)."""

    kind = ErrorKind.REFUSED

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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
    incarnation: str
    epoch: int
    registered_at: float
    last_seen: float
    healthy: bool = True
    load: InstanceLoad = field(default_factory=InstanceLoad)
    charged_tokens: int = 0  # placed and not yet released (see core.py)
    # What the elastic drop planner groups by (fixed within an incarnation; "" / 0: not said).
    model: str = ""
    num_layers: int = 0
    param_bytes: int = 0
    budget_bytes: int = 0

    def addresses(self) -> tuple[str, str, str, str]:
        return (self.address, self.control, self.mempool, self.events)

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
        new id while `max_instances` are registered, ClaimRefusedError for another
        incarnation of a live id or moved addresses (see the module docstring)."""
        if hb.role not in ROLES:
            raise ValueError(f"heartbeat of {hb.instance_id!r}: unknown role {hb.role!r}")
        if not hb.instance_id or hb.block_size <= 0:
            raise ValueError(f"heartbeat of {hb.instance_id!r}: no id or block_size <= 0")
        old = self._instances.get(hb.instance_id)
        addresses = (hb.address, hb.control, hb.mempool, hb.events)
        if old is not None and (old.started_at, old.incarnation) == (hb.started_at, hb.incarnation):
            if old.role != hb.role or old.addresses() != addresses:
                raise ClaimRefusedError(
                    f"heartbeat of {hb.instance_id!r} names other addresses or role than its "
                    f"incarnation registered ({old.role} {old.addresses()})",
                    "moved",
                )
            changed = old.healthy != hb.healthy
            old.last_seen = now
            old.load = hb.load
            old.healthy = hb.healthy
            old.block_bytes = hb.block_bytes
            return Seen(old, new=False, health_changed=changed)
        if old is not None and not self._may_take_over(old, addresses, now):
            raise ClaimRefusedError(
                f"heartbeat of {hb.instance_id!r} from another incarnation (started_at "
                f"{hb.started_at}) while the registered one (started_at {old.started_at}) is "
                f"alive: accepted once it is silent for {self.heartbeat_timeout_s} s",
                "claimed",
            )
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
            hb.incarnation,
            next(self._epochs),
            now,
            now,
            hb.healthy,
            hb.load,
            model=hb.model,
            num_layers=hb.num_layers,
            param_bytes=hb.param_bytes,
            budget_bytes=hb.budget_bytes,
        )
        self._instances[hb.instance_id] = inst
        return Seen(inst, new=True, replaced=old)

    def _may_take_over(self, holder: Instance, addresses: tuple[str, ...], now: float) -> bool:
        """Whether another incarnation may replace `holder` now: it is silent past the
        timeout, or it reported itself unhealthy and the newcomer is at its addresses."""
        if now - holder.last_seen > self.heartbeat_timeout_s:
            return True
        return not holder.healthy and holder.addresses() == addresses

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
