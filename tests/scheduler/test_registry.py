"""The registry: heartbeats register, silence drops, a worker that comes back re-registers,
a changed `started_at` is a restart, unhealthy or drained instances are not eligible, and
a full registry refuses new ids."""

from __future__ import annotations

import pytest

from common.errors import ErrorKind
from services.scheduler.registry import (
    ClaimRefusedError,
    Registry,
    RegistryFullError,
    UnknownInstanceError,
)
from tests.scheduler.helpers import heartbeat


def test_first_heartbeat_registers_and_later_ones_refresh() -> None:
    reg = Registry(heartbeat_timeout_s=2.0)
    seen = reg.heartbeat(heartbeat("w0"), now=0.0)
    assert seen.new and seen.replaced is None
    again = reg.heartbeat(heartbeat("w0"), now=1.0)
    assert not again.new and again.instance is seen.instance
    assert again.instance.last_seen == 1.0
    assert [i.instance_id for i in reg.eligible("colocated")] == ["w0"]
    assert reg.eligible("prefill") == []


def test_silence_drops_and_a_returning_instance_registers_again() -> None:
    reg = Registry(heartbeat_timeout_s=2.0)
    reg.heartbeat(heartbeat("w0"), now=0.0)
    reg.heartbeat(heartbeat("w1"), now=1.5)
    assert reg.expire(now=2.0) == []  # exactly at the timeout: still here
    gone = reg.expire(now=2.5)
    assert [i.instance_id for i in gone] == ["w0"]
    assert reg.get("w0") is None and reg.get("w1") is not None
    first_epoch = gone[0].epoch
    back = reg.heartbeat(heartbeat("w0"), now=3.0)
    assert back.new and back.replaced is None and back.instance.epoch != first_epoch


def test_changed_started_at_is_a_restart_with_fresh_state() -> None:
    reg = Registry(heartbeat_timeout_s=2.0)
    old = reg.heartbeat(heartbeat("w0", started_at=1.0), now=0.0).instance
    old.charged_tokens = 500
    seen = reg.heartbeat(heartbeat("w0", started_at=2.0), now=2.5)  # old one silent since 0
    assert seen.new and seen.replaced is old
    assert seen.instance.epoch != old.epoch and seen.instance.charged_tokens == 0


def test_unhealthy_is_registered_but_not_eligible() -> None:
    reg = Registry(heartbeat_timeout_s=2.0)
    reg.heartbeat(heartbeat("w0"), now=0.0)
    seen = reg.heartbeat(heartbeat("w0", healthy=False), now=0.1)
    assert seen.health_changed and not seen.new
    assert reg.eligible("colocated") == [] and reg.state(seen.instance) == "unhealthy"
    back = reg.heartbeat(heartbeat("w0"), now=0.2)
    assert back.health_changed and [i.instance_id for i in reg.eligible("colocated")] == ["w0"]


def test_drain_outlives_a_restart_until_undrain() -> None:
    reg = Registry(heartbeat_timeout_s=2.0)
    reg.heartbeat(heartbeat("w0"), now=0.0)
    reg.heartbeat(heartbeat("w1"), now=0.0)
    reg.drain("w0")
    assert [i.instance_id for i in reg.eligible("colocated")] == ["w1"]
    reg.heartbeat(heartbeat("w1"), now=2.5)
    reg.heartbeat(heartbeat("w0", started_at=9.0), now=2.5)  # restarted: still drained
    assert [i.instance_id for i in reg.eligible("colocated")] == ["w1"]
    reg.undrain("w0")
    assert [i.instance_id for i in reg.eligible("colocated")] == ["w0", "w1"]
    with pytest.raises(UnknownInstanceError, match="no registered instance 'nope'"):
        reg.drain("nope")
    with pytest.raises(UnknownInstanceError):
        reg.undrain("nope")


def test_heartbeat_with_unknown_role_is_refused() -> None:
    reg = Registry(heartbeat_timeout_s=2.0)
    with pytest.raises(ValueError, match="unknown role 'chef'"):
        reg.heartbeat(heartbeat("w0", role="chef"), now=0.0)
    assert reg.instances() == []


def test_a_full_registry_refuses_new_ids_but_keeps_refreshing_and_restarting() -> None:
    reg = Registry(heartbeat_timeout_s=2.0, max_instances=2)
    reg.heartbeat(heartbeat("w0"), now=0.0)
    reg.heartbeat(heartbeat("w1"), now=0.0)
    with pytest.raises(RegistryFullError, match="2 instances registered") as refused:
        reg.heartbeat(heartbeat("w2"), now=0.5)
    assert refused.value.kind is ErrorKind.REFUSED
    assert reg.get("w2") is None and len(reg.instances()) == 2
    assert not reg.heartbeat(heartbeat("w0"), now=1.0).new  # refreshed
    reg.heartbeat(heartbeat("w0"), now=2.5)
    assert reg.heartbeat(heartbeat("w1", started_at=2.0), now=2.5).replaced is not None
    reg.expire(now=4.4)  # w0 and w1 were seen at 2.5: still here
    assert len(reg.instances()) == 2
    reg.heartbeat(heartbeat("w0"), now=5.0)
    assert [i.instance_id for i in reg.expire(now=5.0)] == ["w1"]
    assert reg.heartbeat(heartbeat("w2"), now=5.0).new  # room again


def test_another_incarnation_cannot_claim_a_live_id() -> None:
    """A second process heartbeating as a live instance is refused, whatever it claims
    (restarted, unhealthy): the holder keeps its epoch, health and addresses."""
    reg = Registry(heartbeat_timeout_s=2.0)
    held = reg.heartbeat(heartbeat("w0", incarnation="real"), now=0.0).instance
    for claim in (
        heartbeat("w0", incarnation="fake"),  # same started_at, another nonce
        heartbeat("w0", started_at=5.0, incarnation="fake", healthy=False),
        heartbeat("w0", started_at=5.0, incarnation="fake", address="tcp://10.0.0.9:1"),
    ):
        with pytest.raises(ClaimRefusedError) as refused:
            reg.heartbeat(claim, now=1.9)
        assert refused.value.reason == "claimed" and refused.value.kind is ErrorKind.REFUSED
    assert reg.get("w0") is held and held.healthy and held.last_seen == 0.0
    assert [i.instance_id for i in reg.eligible("colocated")] == ["w0"]
    # The holder keeps refreshing as before.
    assert not reg.heartbeat(heartbeat("w0", incarnation="real"), now=1.95).new


def test_a_restarted_worker_takes_over_once_the_old_one_is_silent() -> None:
    reg = Registry(heartbeat_timeout_s=2.0)
    old = reg.heartbeat(heartbeat("w0", incarnation="a"), now=0.0).instance
    with pytest.raises(ClaimRefusedError):
        reg.heartbeat(heartbeat("w0", started_at=2.0, incarnation="b"), now=2.0)
    # Silent past the timeout (not yet expired by a tick): the new incarnation takes over.
    seen = reg.heartbeat(heartbeat("w0", started_at=2.0, incarnation="b"), now=2.01)
    assert seen.new and seen.replaced is old and seen.instance.incarnation == "b"
    # ... and now the old incarnation is the stranger.
    with pytest.raises(ClaimRefusedError):
        reg.heartbeat(heartbeat("w0", incarnation="a"), now=2.02)


def test_an_unhealthy_holder_gives_way_only_to_a_newcomer_at_its_addresses() -> None:
    """The holder said it lost its daemon (its requests failed then): a restart at the same
    addresses takes over at once; a stranger elsewhere still waits for the silence."""
    reg = Registry(heartbeat_timeout_s=2.0)
    reg.heartbeat(heartbeat("w0", incarnation="a"), now=0.0)
    reg.heartbeat(heartbeat("w0", incarnation="a", healthy=False), now=0.5)
    with pytest.raises(ClaimRefusedError):
        reg.heartbeat(heartbeat("w0", incarnation="x", address="tcp://10.0.0.9:1"), now=0.6)
    seen = reg.heartbeat(heartbeat("w0", started_at=3.0, incarnation="b"), now=0.6)
    assert seen.new and seen.replaced is not None and seen.instance.healthy


def test_a_live_incarnation_cannot_move_its_addresses() -> None:
    reg = Registry(heartbeat_timeout_s=2.0)
    inst = reg.heartbeat(heartbeat("w0", incarnation="a", events="tcp://127.0.0.1:7"), now=0.0)
    moves = {
        "address": heartbeat(
            "w0", incarnation="a", events="tcp://127.0.0.1:7", address="tcp://x:1"
        ),
        "mempool": heartbeat(
            "w0", incarnation="a", events="tcp://127.0.0.1:7", mempool="tcp://x:2"
        ),
        "control": heartbeat(
            "w0", incarnation="a", events="tcp://127.0.0.1:7", control="tcp://x:3"
        ),
        "events": heartbeat("w0", incarnation="a", events="tcp://x:4"),
    }
    for what, hb in moves.items():
        with pytest.raises(ClaimRefusedError, match="other addresses") as refused:
            reg.heartbeat(hb, now=0.5)
        assert refused.value.reason == "moved", what
    got = reg.get("w0")
    assert got is inst.instance and got.addresses() == (
        "tcp://127.0.0.1:9/w0",
        "",
        "tcp://127.0.0.1:8/w0",
        "tcp://127.0.0.1:7",
    )
    assert got.last_seen == 0.0  # a refused heartbeat refreshes nothing
