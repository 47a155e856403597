"""The registry: heartbeats register, silence drops, a worker that comes back re-registers,
a changed `started_at` is a restart, unhealthy or drained instances are not eligible, and
a full registry refuses new ids."""

from __future__ import annotations

import pytest

from common.errors import ErrorKind
from services.scheduler.registry import Registry, RegistryFullError, UnknownInstanceError
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
    seen = reg.heartbeat(heartbeat("w0", started_at=2.0), now=0.5)
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
    reg.heartbeat(heartbeat("w0", started_at=9.0), now=0.5)  # restarted: still drained
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
    assert reg.heartbeat(heartbeat("w1", started_at=2.0), now=1.0).replaced is not None
    reg.expire(now=2.9)  # w0 and w1 were seen at 1.0: still here
    assert len(reg.instances()) == 2
    reg.heartbeat(heartbeat("w0"), now=3.5)
    assert [i.instance_id for i in reg.expire(now=3.5)] == ["w1"]
    assert reg.heartbeat(heartbeat("w2"), now=3.5).new  # room again
