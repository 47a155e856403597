"""The pure parts of self-healing: which exits restart a child and after how long
(services/launcher/restart.py), the settings a restart binds (plan.pinned), and the
worker's view of its daemon (services/worker/daemon_link.py)."""

from __future__ import annotations

from services.launcher.plan import ProcSpec, pinned, stable_endpoints
from services.launcher.restart import Backoff, Verdict, verdict
from services.worker.daemon_link import DaemonLink, LinkAction, LinkState


def test_crashes_restart_and_ordered_stops_do_not() -> None:
    assert verdict("worker", -9, restart=True) is Verdict.RESTART
    assert verdict("scheduler", 1, restart=True) is Verdict.RESTART
    assert verdict("scheduler", 0, restart=True) is Verdict.STOP_CLUSTER  # admin shutdown
    assert verdict("gateway", 0, restart=True) is Verdict.STOP_CLUSTER
    assert verdict("mempool", 0, restart=True) is Verdict.REPORT
    assert verdict("gateway", -9, restart=False) is Verdict.STOP_CLUSTER
    assert verdict("worker", -9, restart=False) is Verdict.REPORT


def test_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    b = Backoff(initial_s=0.5, max_s=3.0, stable_s=30.0)
    assert [b.next_delay(1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.next_delay(31.0) == 0.5 and b.attempt == 1


def test_a_restart_binds_the_ports_it_had_on_the_configured_host() -> None:
    spec = ProcSpec(
        "gateway",
        "gateway",
        3,
        {"address": "tcp://0.0.0.0:0", "reply_address": "tcp://127.0.0.1:0", "x": 1},
    )
    endpoints = {"clients": "tcp://host-a:4100", "replies": "tcp://127.0.0.1:4101"}
    assert pinned(spec, endpoints) == {
        "address": "tcp://0.0.0.0:4100",
        "reply_address": "tcp://127.0.0.1:4101",
        "x": 1,
    }
    fixed = ProcSpec("mempool", "m", 1, {"control_address": "tcp://127.0.0.1:5601"})
    assert pinned(fixed, {"rpc": "tcp://127.0.0.1:5601"}) == fixed.settings
    assert stable_endpoints("mempool", {"rpc": "a", "events": "b", "shm": "c"}) == {
        "rpc": "a",
        "events": "b",
    }


def test_daemon_link_states() -> None:
    link = DaemonLink("one", strikes=2, backoff_s=0.5, backoff_max_s=1.0)
    assert link.answered("one") is LinkAction.NONE and link.healthy
    # Unanswered checks: lost after `strikes`; the same incarnation back is a stall.
    assert link.missed() is LinkAction.NONE and link.healthy
    assert link.missed() is LinkAction.FAIL_ALL and link.state is LinkState.LOST
    assert link.missed() is LinkAction.NONE
    assert link.answered("one") is LinkAction.NONE and link.healthy
    # Another incarnation: re-attach once, retried with a backoff, then healthy.
    assert link.answered("two") is LinkAction.REATTACH and not link.healthy
    assert link.answered("two") is LinkAction.NONE
    assert [link.reattach_failed() for _ in range(3)] == [0.5, 1.0, 1.0]
    link.reattached("two")
    assert link.healthy and link.reattaches == 1 and link.incarnation == "two"
    # A dropped connection fences the engine: even the same incarnation means re-attach.
    assert link.disconnected() is LinkAction.FAIL_ALL and not link.healthy
    assert link.disconnected() is LinkAction.NONE
    assert link.answered("two") is LinkAction.REATTACH
    link.reattached("two")
    assert link.healthy and not link.fenced
