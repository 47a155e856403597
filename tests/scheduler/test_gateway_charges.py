"""No phantom load from a dead gateway: charges placed by a gateway incarnation are taken
back when it falls silent or a later incarnation of its id appears; a stale (earlier)
incarnation evicts nobody; a Place that names no gateway keeps the old TTL-only rule; a
re-placement avoids the instances the gateway names."""

from __future__ import annotations

from typing import Any

import pytest

from common.protocol.scheduler import GatewayAlive, Place, Release, Released
from services.scheduler.config import SchedulerConfig
from services.scheduler.core import GlobalScheduler, NoInstanceError
from services.scheduler.gateways import GatewayTable, Seen
from tests.scheduler.helpers import heartbeat, prompt


def scheduler(**cfg: Any) -> GlobalScheduler:
    return GlobalScheduler(SchedulerConfig(admin_address="", **cfg).validate())


def up(s: GlobalScheduler, *ids: str, now: float = 0.0) -> None:
    for iid in ids:
        s.on_heartbeat(heartbeat(iid, "colocated"), now)


def load(s: GlobalScheduler, iid: str) -> int:
    inst = s.registry.get(iid)
    assert inst is not None
    return inst.charged_tokens


def place(rid: str, gateway: str = "gw", started_at: float = 100.0, **kw: Any) -> Place:
    return Place(rid, prompt(40), 8, gateway=gateway, gateway_started_at=started_at, **kw)


def test_a_silent_gateway_loses_its_charges_and_no_one_elses() -> None:
    s = scheduler(mode="colocated", caching=False, heartbeat_timeout_s=2.0)
    up(s, "w0")
    s.place(place("a1", "gw-a"), now=0.0)
    s.place(place("b1", "gw-b"), now=0.0)
    s.place(Place("old", prompt(40), 8), now=0.0)  # an older gateway: names none
    assert load(s, "w0") == 3 * 48
    # gw-b keeps saying it is alive; gw-a died. Its timeout: max(5 x 1 s, 3 x 2 s) = 6 s.
    for t in range(1, 8):
        up(s, "w0", now=float(t))
        assert s.on_gateway_alive(GatewayAlive("gw-b", 100.0, 1.0), float(t)).current
        s.tick(float(t))
    assert set(s.charges) == {"b1", "old"} and load(s, "w0") == 2 * 48
    assert s.counters["silent_gateways"] == 1 and s.counters["dropped_gateway_charges"] == 1
    # Its late release (had it any) takes nothing; the survivors' releases work as ever.
    assert s.release(Release("a1")) == Released(False)
    assert s.release(Release("b1")) == Released(True)
    assert load(s, "w0") == 48  # "old" lives until charge_ttl_s, as before


def test_a_restarted_gateway_drops_its_earlier_incarnations_charges_at_once() -> None:
    s = scheduler(mode="colocated", caching=False)
    up(s, "w0")
    s.place(place("r1", started_at=100.0), now=0.0)
    s.place(place("r2", started_at=100.0), now=0.0)
    assert load(s, "w0") == 96
    # The supervisor restarted it: the new incarnation says hello.
    assert s.on_gateway_alive(GatewayAlive("gw", 200.0), 0.5).current
    assert s.charges == {} and load(s, "w0") == 0
    assert s.counters["restarted_gateways"] == 1
    s.place(place("n1", started_at=200.0), now=0.6)
    assert load(s, "w0") == 48


def test_a_stale_incarnation_evicts_nobody() -> None:
    """Two gateways misconfigured with one id: the earlier one is stale, and its Places
    fall back to the TTL rule instead of evicting the current one's charges."""
    s = scheduler(mode="colocated", caching=False)
    up(s, "w0")
    s.place(place("new", started_at=200.0), now=0.0)
    assert not s.on_gateway_alive(GatewayAlive("gw", 100.0), 0.1).current
    s.place(place("old", started_at=100.0), now=0.2)
    assert set(s.charges) == {"new", "old"} and load(s, "w0") == 96
    assert s.charges["old"].gateway is None  # not owned: TTL only


def test_a_placement_avoids_the_instances_the_gateway_names() -> None:
    s = scheduler(mode="colocated", caching=False)
    up(s, "w0", "w1")
    first = s.place(place("r1"), now=0.0)
    again = s.place(place("r1", avoid=[first.instance_id]), now=0.1)
    assert again.instance_id != first.instance_id
    assert load(s, first.instance_id) == 0 and load(s, again.instance_id) == 48
    with pytest.raises(NoInstanceError, match="avoiding w0, w1"):
        s.place(place("r1", avoid=["w0", "w1"]), now=0.2)


def test_the_gateway_table_bounds() -> None:
    t = GatewayTable(min_timeout_s=1.0, max_gateways=2)
    assert t.seen("a", 1.0, 0.0) == Seen(True)
    assert t.seen("b", 1.0, 0.0, interval_s=10.0) == Seen(True)
    assert t.seen("c", 1.0, 0.0) == Seen(False)  # full: not tracked
    assert t.seen("a", 2.0, 1.0) == Seen(True, replaced=("a", 1.0))
    assert t.expire(6.5) == [("a", 2.0)]  # 5 x the default 1 s interval; b has 50 s
    assert t.expire(51.0) == [("b", 1.0)] and len(t) == 0
