"""The elastic controller's policy (services/scheduler/monitor.py) on synthetic load traces:
thresholds, the vote quorum, debounce, cooldown and hysteresis against flapping, and each
restore condition necessary."""

from __future__ import annotations

import dataclasses

import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.controller import thresholds
from services.scheduler.monitor import Drop, GroupView, Load, Monitor, Restore, Thresholds

T = Thresholds(
    drop_usage=0.95, restore_usage=0.5, window=4, debounce=2, cooldown_s=5, min_group_s=3
)
HOT = Load(used=96, waiting=20, capacity=100)  # 96% used, 20 queued > 4 free: a vote
COOL = Load(used=50, waiting=0, capacity=100)


def monitor(**kw: object) -> Monitor:
    return Monitor(dataclasses.replace(T, **kw), enabled=True)  # type: ignore[arg-type]


def run(m: Monitor, trace: list[dict[str, Load]], t0: float = 100.0, dt: float = 0.1) -> list:
    return [m.poll(t0 + k * dt, solo, []) for k, solo in enumerate(trace)]


def test_a_drop_needs_half_the_instances_voting_on_debounce_polls() -> None:
    m = monitor()
    out = run(m, [{"a": HOT, "b": COOL}] * 2)
    (drop,) = [d for d in out if d is not None]  # 1 of 2 votes: ceil(2/2) = 1 is enough
    assert out[0] is None  # debounce: not on the first poll
    assert isinstance(drop, Drop) and drop.voters == ("a",) and drop.demand_blocks == 16
    m = monitor()
    assert run(m, [{"a": HOT, "b": COOL, "c": COOL}] * 5) == [None] * 5  # 1 of 3 < 2
    m = monitor()
    out = run(m, [{"a": HOT, "b": HOT, "c": COOL}] * 2)
    assert out[0] is None and isinstance(out[1], Drop) and out[1].voters == ("a", "b")
    assert out[1].shortfall == {"a": 16, "b": 16} and out[1].needed == 2


def test_debounce_resets_on_a_poll_without_enough_votes() -> None:
    m = monitor(debounce=3)
    trace = [{"a": HOT}, {"a": HOT}, {"a": COOL}, {"a": HOT}, {"a": HOT}, {"a": HOT}]
    out = run(m, trace)
    assert out[:5] == [None] * 5 and isinstance(out[5], Drop)


@pytest.mark.parametrize(
    "load",
    [
        Load(used=94, waiting=50, capacity=100),  # below 95%: the queue may still fit
        Load(used=96, waiting=3, capacity=100),  # the queue fits in the free blocks
        Load(used=100, waiting=0, capacity=100),  # full, nothing queued: nothing to gain
        Load(used=0, waiting=9, capacity=0),  # no capacity reported (an old worker)
    ],
)
def test_thresholds_no_vote(load: Load) -> None:
    m = monitor()
    assert run(m, [{"a": load}] * 5) == [None] * 5
    assert m.status(101)["last_poll"]["votes"]["a"]["vote"] is False


def test_thresholds_vote_at_the_edges() -> None:
    for load in (Load(used=95, waiting=5, capacity=100), Load(used=100, waiting=1, capacity=100)):
        out = run(monitor(), [{"a": load}] * 2)
        assert isinstance(out[1], Drop), load
    out = run(monitor(drop_usage=0.8), [{"a": Load(used=80, waiting=20, capacity=100)}] * 2)
    assert isinstance(out[1], Drop)


def test_cooldown_after_a_decision_prevents_flapping() -> None:
    m = monitor(cooldown_s=5)
    # Votes held for 10 s at 0.1 s polls: a drop, then nothing for 5 s, then another.
    out = run(m, [{"a": HOT}] * 100)
    drops = [k for k, d in enumerate(out) if d is not None]
    assert drops == [1, 51]  # the second only once the cooldown is over
    assert len(drops) == 2


def test_cooldown_after_a_commanded_group_and_when_off() -> None:
    m = monitor()
    g = GroupView("g1", ("x", "y"), 100.0, Load(used=10, capacity=300))
    assert m.poll(100.0, {"a": HOT}, [g]) is None  # a group appeared: cooldown
    assert m.poll(100.1, {"a": HOT}, [g]) is None
    assert m.cooldown_left(100.1) > 4.8
    assert isinstance(m.poll(105.1, {"a": HOT}, [g]), Drop)
    off = Monitor(T, enabled=False)
    assert run(off, [{"a": HOT}] * 10) == [None] * 10  # off: counted, never decided
    assert off.status(0)["last_poll"]["voters"] == ["a"] and not off.status(0)["enabled"]


def group_trace(m: Monitor, used: list[int], waiting: int = 0, t0: float = 200.0) -> list:
    """Polls of group g1 (members a, b, each 100 blocks alone, seen before the drop)."""
    m.poll(t0 - 10, {"a": COOL, "b": COOL}, [])
    out = []
    for k, u in enumerate(used):
        view = GroupView("g1", ("a", "b"), t0, Load(used=u, waiting=waiting, capacity=400))
        out.append(m.poll(t0 + k, {}, [view]))
    return out


def test_restore_when_every_condition_holds() -> None:
    m = monitor(cooldown_s=0)
    out = group_trace(m, [300, 200, 150, 100, 90, 80])
    # Window 4 full at poll 3 (t=203, age 3 >= min_group_s): [300, 200, 150, 100] falls,
    # and 100 <= 0.5 * 200 held.
    assert out[:3] == [None] * 3
    assert out[3] == Restore("g1", used=100, held=200)
    idle = group_trace(monitor(cooldown_s=0), [0, 0, 0, 0, 0])
    assert isinstance(idle[3], Restore)  # idle and flat: nothing left to fall


@pytest.mark.parametrize(
    ("why", "kw", "used", "waiting"),
    [
        ("fits", {}, [300, 250, 200, 150, 120, 110], 0),  # falling, but above 100 = 0.5 * 200
        ("falling", {}, [10, 20, 30, 40, 50, 60], 0),  # small but rising
        ("nothing_waits", {}, [90, 80, 70, 60, 50, 40], 1),  # something queued
        ("old_enough", {"min_group_s": 100}, [90, 80, 70, 60, 50, 40], 0),
        ("falling", {"window": 30}, [90, 80, 70, 60, 50, 40], 0),  # window not full yet
    ],
)
def test_each_restore_condition_is_necessary(
    why: str, kw: dict[str, float], used: list[int], waiting: int
) -> None:
    m = monitor(cooldown_s=0, **kw)
    assert group_trace(m, used, waiting) == [None] * len(used)
    assert m.status(0)["groups"]["g1"]["checks"][why] is False


def test_hysteresis_between_drop_and_restore() -> None:
    """A load that swings between 60% and 94% of what the members held never restores
    (above 50%) and never drops (below 95%): no flapping in the band between."""
    m = monitor(cooldown_s=0, min_group_s=0)
    swing = [120, 188, 150, 120, 188, 150, 120, 188]  # of 200 held
    assert group_trace(m, swing) == [None] * len(swing)
    band = [{"a": Load(used=u, waiting=30, capacity=100)} for u in (60, 94, 80, 60, 94)]
    assert run(m, band, t0=400) == [None] * 5


def test_unknown_pre_drop_capacity_never_restores_by_itself() -> None:
    m = monitor(cooldown_s=0, min_group_s=0)
    for k in range(6):  # a scheduler restarted mid-group: the members were never seen alone
        view = GroupView("g1", ("a", "b"), 0.0, Load(used=0, capacity=400))
        assert m.poll(float(k), {}, [view]) is None
    assert m.status(6)["groups"]["g1"]["checks"]["fits"] is False


def test_config_defaults_and_refusals() -> None:
    cfg = SchedulerConfig()
    assert thresholds(cfg) == Thresholds()  # KunServe's public code's defaults
    assert (cfg.elastic_auto, cfg.elastic_poll_s, cfg.elastic_max_group) == (False, 0.1, 2)
    for bad in (
        {"elastic_restore_usage": 0.96},  # no hysteresis band
        {"elastic_drop_usage": 1.5},
        {"elastic_window": 0},
        {"elastic_debounce": 0},
        {"elastic_poll_s": 0},
        {"elastic_cooldown_s": -1},
        {"elastic_max_group": 1},
    ):
        with pytest.raises(ValueError, match="elastic_"):
            SchedulerConfig(admin_token="t", **bad).validate()
