"""The gateway's `Status` (what the API's /ready asks): built from the scheduler's last
`GatewayKnown` (pure), and answered over the client socket by a real gateway."""

from __future__ import annotations

from common.client import GatewayClient
from common.protocol import scheduler as sp
from services.gateway.readiness import status_report
from tests.gateway.harness import FakeScheduler, running_gateway, until


def test_status_report_from_what_the_scheduler_said() -> None:
    assert not status_report(None, 0.0, 10.0, 1.0).ready
    known = sp.GatewayKnown(True, {"prefill": 1, "decode": 0}, ["prefill", "decode"])
    r = status_report(known, 9.5, 10.0, 1.0)
    assert not r.ready and r.scheduler_ok and "decode" in r.reason
    fine = sp.GatewayKnown(True, {"prefill": 1, "decode": 2}, ["prefill", "decode"])
    assert status_report(fine, 9.5, 10.0, 1.0).ready
    stale = status_report(fine, 1.0, 10.0, 1.0)  # silent for 9 intervals
    assert not stale.ready and not stale.scheduler_ok and "not answered" in stale.reason


async def test_a_gateway_answers_status() -> None:
    sched = FakeScheduler()
    try:
        await _answers(sched)
    finally:
        await sched.close()


async def _answers(sched: FakeScheduler) -> None:
    async with running_gateway(sched, alive_interval_s=0.1) as (gw, _):
        client = GatewayClient(gw.endpoints["clients"], timeout_s=5)
        try:

            async def ready() -> bool:
                return (await client.status()).ready

            # The fake scheduler answers GatewayAlive with no roles needed: ready once heard.
            assert await until(ready)
            report = await client.status()
            assert report.scheduler_ok and report.reason == ""
        finally:
            client.close()
