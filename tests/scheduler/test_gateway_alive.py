"""The scheduler service answers `GatewayAlive` over its RPC socket, and a gateway
incarnation that then falls silent loses its placements' charges (the ticker, on the
service's clock); a restarted one drops its predecessor's at its first word."""

from __future__ import annotations

from common.modes import Mode
from common.protocol import scheduler as sp
from tests.scheduler.harness import Harness, until
from tests.scheduler.helpers import heartbeat, prompt


async def test_a_silent_or_restarted_gateway_loses_its_charges(harness: Harness) -> None:
    core = harness.svc.core
    await harness.register(heartbeat("w0"))
    alive = sp.GatewayAlive("gw", 1.0, interval_s=0.1)
    known = await harness.rpc.call(alive)
    assert isinstance(known, sp.GatewayKnown) and known.current
    # What the cluster can serve with, for the gateway's StatusReport (the API's /ready).
    assert known.instances == {"colocated": 1, "prefill": 0, "decode": 0}
    assert known.needs == list(sp_needs(harness))
    await harness.rpc.call(sp.Place("r1", prompt(40), 8, gateway="gw", gateway_started_at=1.0))
    assert core.charges["r1"].gateway == ("gw", 1.0)
    # Restarted: the new incarnation's first word drops the old one's charge.
    known = await harness.rpc.call(sp.GatewayAlive("gw", 2.0, 0.1))
    assert isinstance(known, sp.GatewayKnown) and known.current
    assert "r1" not in core.charges and core.counters["restarted_gateways"] == 1
    await harness.rpc.call(sp.Place("r2", prompt(40), 8, gateway="gw", gateway_started_at=2.0))
    assert "r2" in core.charges
    harness.clock.now += 60.0  # silent far past max(5 x 0.1 s, 3 x heartbeat_timeout_s)
    await until(lambda: core.counters["silent_gateways"] == 1, "the silent gateway dropped")
    assert "r2" not in core.charges


def sp_needs(harness: Harness) -> tuple[str, ...]:
    cfg = harness.svc.core.cfg
    return Mode.of(cfg.mode, cfg.caching).roles
