"""Which gateway incarnations are alive (pure): the owners of placement charges.

A gateway says `GatewayAlive(gateway, started_at, interval_s)` every `interval_s`, and
each `Place` names its incarnation too. An incarnation is the pair (gateway id,
started_at). Invariants:

* At most one incarnation per gateway id is current: a later `started_at` replaces the
  known one (`Seen.replaced`: the caller drops its charges, its process is gone); an
  earlier one is stale (`Seen.current` False) and changes nothing, so two gateways
  misconfigured with one id never evict each other back and forth.
* An incarnation silent for `max(misses * interval_s, min_timeout_s)` is dropped by
  `expire` (the caller drops its charges); if it speaks again it is simply new.
* At most `max_gateways` are known: beyond, a new id is not tracked (`current` False),
  so its charges fall back to the scheduler's `charge_ttl_s`.

Every time is the caller's monotonic `now`.
"""

from __future__ import annotations

from dataclasses import dataclass

# Intervals of silence after which a gateway incarnation is dead.
GATEWAY_MISSES = 5
DEFAULT_INTERVAL_S = 1.0
MAX_GATEWAYS = 1024

Incarnation = tuple[str, float]  # (gateway id, started_at)


@dataclass
class _Gateway:
    started_at: float
    last_seen: float
    timeout_s: float


@dataclass(frozen=True)
class Seen:
    current: bool  # the incarnation is the tracked one of its id (its charges are owned)
    replaced: Incarnation | None = None  # an earlier incarnation it replaced


class GatewayTable:
    def __init__(
        self,
        min_timeout_s: float,
        misses: int = GATEWAY_MISSES,
        max_gateways: int = MAX_GATEWAYS,
    ):
        self.min_timeout_s = min_timeout_s
        self.misses = misses
        self.max_gateways = max_gateways
        self.gateways: dict[str, _Gateway] = {}

    def __len__(self) -> int:
        return len(self.gateways)

    def seen(
        self, gateway: str, started_at: float, now: float, interval_s: float | None = None
    ) -> Seen:
        """Record a sign of life of (`gateway`, `started_at`); `interval_s` (from
        `GatewayAlive`) sets how long a silence it survives."""
        g = self.gateways.get(gateway)
        timeout_s = (
            max(self.misses * interval_s, self.min_timeout_s)
            if interval_s is not None and interval_s > 0
            else None
        )
        if g is None:
            if len(self.gateways) >= self.max_gateways:
                return Seen(False)
            self.gateways[gateway] = _Gateway(started_at, now, timeout_s or self._default_timeout())
            return Seen(True)
        if started_at < g.started_at:
            return Seen(False)
        replaced = None
        if started_at > g.started_at:
            replaced = (gateway, g.started_at)
            g.started_at = started_at
            g.timeout_s = timeout_s or self._default_timeout()
        elif timeout_s is not None:
            g.timeout_s = timeout_s
        g.last_seen = now
        return Seen(True, replaced)

    def expire(self, now: float) -> list[Incarnation]:
        """Forget the incarnations silent past their timeout; return them."""
        dead = [(gid, g) for gid, g in self.gateways.items() if now - g.last_seen > g.timeout_s]
        for gid, _ in dead:
            del self.gateways[gid]
        return [(gid, g.started_at) for gid, g in dead]

    def _default_timeout(self) -> float:
        return max(self.misses * DEFAULT_INTERVAL_S, self.min_timeout_s)
