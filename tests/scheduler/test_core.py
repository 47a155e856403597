"""The scheduler core: every mode's Placement flags (the table in
common/protocol/worker.py), charges made at placement and taken back by phase, the prefix
trees steering placements, instance events, a dead instance's requests charging nobody,
the cap on registrations, and the admin commands it answers itself."""

from __future__ import annotations

from typing import Any

import pytest

from common.errors import InvalidRequestError
from common.protocol.scheduler import InstanceDown, InstanceUp, Place, Release, Released
from services.scheduler.config import SchedulerConfig
from services.scheduler.core import GlobalScheduler, NoInstanceError
from services.scheduler.registry import RegistryFullError
from tests.scheduler.helpers import batch, heartbeat, prompt, stored

TOKEN = "s3cret"


def scheduler(**cfg: Any) -> GlobalScheduler:
    return GlobalScheduler(SchedulerConfig(admin_token=TOKEN, **cfg).validate())


def up(s: GlobalScheduler, *ids: str, role: str = "colocated", now: float = 0.0, **kw: Any) -> None:
    for iid in ids:
        s.on_heartbeat(heartbeat(iid, role, **kw), now)


def load(s: GlobalScheduler, iid: str) -> int:
    inst = s.registry.get(iid)
    assert inst is not None
    return inst.charged_tokens


@pytest.mark.parametrize("caching", [True, False])
def test_colocated_placement(caching: bool) -> None:
    s = scheduler(mode="colocated", caching=caching)
    up(s, "w0")
    p = s.place(Place("r1", prompt(40), 8), now=1.0)
    assert (p.request_id, p.instance_id, p.address) == ("r1", "w0", "tcp://127.0.0.1:9/w0")
    assert (p.mode, p.policy, p.cache, p.handoff, p.fetch) == (
        "colocated",
        "locality",
        caching,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("mode", "cache", "insert", "decode_cache", "return_kv"),
    [
        ("pd-basic", False, False, False, False),
        ("pd-caching-1", True, False, False, False),
        ("pd-caching-2", True, True, True, False),
        ("pd-caching-3", True, True, True, True),
    ],
)
def test_pd_placement_flags_follow_the_mode_table(
    mode: str, cache: bool, insert: bool, decode_cache: bool, return_kv: bool
) -> None:
    s = scheduler(mode=mode)
    up(s, "p0", role="prefill")
    up(s, "d0", role="decode")
    p = s.place(Place("r1", prompt(40), 8), now=1.0)
    assert p.instance_id == "p0" and p.mode == mode and p.cache is cache
    h = p.handoff
    assert h is not None
    assert (h.instance_id, h.address, h.mempool) == (
        "d0",
        "tcp://127.0.0.1:9/d0",
        "tcp://127.0.0.1:8/d0",
    )
    assert (h.insert, h.cache, h.return_kv) == (insert, decode_cache, return_kv)
    # Charges: prefill the uncached prompt, decode prompt + max_tokens.
    assert load(s, "p0") == 40 and load(s, "d0") == 48


def test_no_eligible_instance_is_a_clear_error_and_leaves_no_charge() -> None:
    s = scheduler(mode="colocated")
    with pytest.raises(NoInstanceError, match="no eligible colocated instance"):
        s.place(Place("r1", prompt(10), 4), now=0.0)
    s = scheduler(mode="pd-caching-2")
    up(s, "p0", role="prefill")
    up(s, "d0", role="decode")
    s.registry.drain("d0")
    with pytest.raises(NoInstanceError, match=r"no eligible decode instance .*d0 \(drained\)"):
        s.place(Place("r1", prompt(10), 4), now=0.0)
    assert load(s, "p0") == 0 and s.charges == {}


def test_bad_requests_are_refused() -> None:
    s = scheduler()
    up(s, "w0")
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        s.place(Place("r1", [], 4), now=0.0)
    with pytest.raises(InvalidRequestError, match="phase"):
        s.release(Release("r1", phase="decode"))


@pytest.mark.parametrize("policy", ["least-load", "locality"])
def test_load_is_charged_at_placement(policy: str) -> None:
    s = scheduler(policy=policy)
    up(s, "w0", "w1")
    first = s.place(Place("r1", prompt(100, 1), 10), now=0.0)
    second = s.place(Place("r2", prompt(100, 2), 10), now=0.0)
    assert {first.instance_id, second.instance_id} == {"w0", "w1"}


def test_release_phases_take_back_their_part_once() -> None:
    s = scheduler()
    up(s, "w0")
    s.place(Place("r1", prompt(100), 20), now=0.0)
    assert load(s, "w0") == 120
    assert s.release(Release("r1", "prefill")) == Released(True)
    assert load(s, "w0") == 20
    assert s.release(Release("r1", "prefill")) == Released(False)
    assert s.release(Release("r1", "all")) == Released(True)
    assert load(s, "w0") == 0
    assert s.release(Release("r1", "all")) == Released(False)
    assert s.release(Release("never-placed")) == Released(False)


def test_placing_the_same_request_again_replaces_its_charge() -> None:
    s = scheduler()
    up(s, "w0")
    s.place(Place("r1", prompt(100), 20), now=0.0)
    s.place(Place("r1", prompt(100), 20), now=0.0)
    assert load(s, "w0") == 120 and len(s.charges) == 1


def test_the_prefix_holder_gets_the_request_and_a_smaller_charge() -> None:
    s = scheduler()
    up(s, "w0", "w1")
    doc = prompt(64)
    s.on_kv_events("w1", batch("w1", 0, stored(doc)), now=0.0)
    for i in range(3):  # balanced: every turn goes to the holder
        p = s.place(Place(f"r{i}", doc + prompt(20, seed=i + 1), 0), now=0.0)
        assert p.instance_id == "w1" and p.cached_tokens == 64 and p.fetch is None
    assert load(s, "w1") == 3 * 20 and load(s, "w0") == 0
    # A whole-block prompt: the worker leaves its last token to compute, so 48 are usable.
    assert s.place(Place("r9", doc, 0), now=0.0).cached_tokens == 48


def test_fetch_when_the_holder_is_too_busy() -> None:
    s = scheduler(balance_abs_threshold_tokens=100, min_fetch_tokens=16)
    up(s, "w0", "w1", block_bytes=4096)
    doc = prompt(1024)
    s.on_kv_events("w1", batch("w1", 0, stored(doc)), now=0.0)
    s.registry.drain("w0")  # make w1 the busy one
    s.place(Place("busy", prompt(50, seed=9), 5000), now=0.0)
    s.registry.undrain("w0")
    p = s.place(Place("r1", [*doc, 1, 2, 3], 4), now=0.0)
    assert p.instance_id == "w0" and p.cached_tokens == 0
    assert p.fetch is not None
    assert (p.fetch.instance_id, p.fetch.num_tokens) == ("w1", 1024)
    assert load(s, "w0") == 3 + 4  # the fetched prefix is not charged as compute
    assert s.counters["fetches"] == 1


@pytest.mark.parametrize(("mode", "holder_wins"), [("pd-caching-2", True), ("pd-caching-1", False)])
def test_decode_prefix_matters_only_where_decode_keeps_history(
    mode: str, holder_wins: bool
) -> None:
    s = scheduler(mode=mode)
    up(s, "p0", role="prefill")
    up(s, "d0", "d1", role="decode")
    doc = prompt(128)
    s.on_kv_events("d1", batch("d1", 0, stored(doc)), now=0.0)
    picks = {s.place(Place(f"r{i}", [*doc, 5], 4), now=0.0).handoff.instance_id for i in range(2)}  # type: ignore[union-attr]
    assert picks == ({"d1"} if holder_wins else {"d0", "d1"})


def test_restart_drops_the_old_tree_and_charges() -> None:
    s = scheduler()
    up(s, "w0", started_at=1.0)
    doc = prompt(64)
    s.on_kv_events("w0", batch("w0", 0, stored(doc)), now=0.0)
    s.place(Place("r1", [*doc, 1], 10), now=0.0)
    # Another incarnation takes the id over once the old one is silent past the timeout.
    events = s.on_heartbeat(heartbeat("w0", started_at=2.0), now=2.5)
    assert events == [InstanceDown("w0", "restarted"), InstanceUp("w0", "colocated")]
    assert load(s, "w0") == 0 and s.trees["colocated"].num_blocks("w0") == 0
    # The old placement's release touches nothing of the new incarnation.
    s.place(Place("r2", prompt(30, seed=3), 0), now=2.6)
    assert s.release(Release("r1")) == Released(True)
    assert load(s, "w0") == 30


def test_tick_drops_silent_instances_with_their_charges() -> None:
    s = scheduler(heartbeat_timeout_s=2.0)
    up(s, "w0", "w1", now=0.0)
    s.place(Place("r1", prompt(10), 10), now=0.0)
    s.on_heartbeat(heartbeat("w1"), now=1.5)
    events = s.tick(now=2.5)
    assert events == [InstanceDown("w0", "no heartbeat for 2.5 s")]
    assert [i.instance_id for i in s.registry.instances()] == ["w1"]
    assert s.release(Release("r1")) == Released(True)  # harmless: w0's share is gone
    assert load(s, "w1") == 0
    assert s.on_kv_events("w0", batch("w0", 0), now=3.0) is False


def test_unhealthy_publishes_down_and_recovery_up() -> None:
    s = scheduler()
    assert s.on_heartbeat(heartbeat("w0"), 0.0) == [InstanceUp("w0", "colocated")]
    assert s.on_heartbeat(heartbeat("w0"), 0.1) == []
    s.on_kv_events("w0", batch("w0", 0, stored(prompt(64))), now=0.1)
    assert s.trees["colocated"].num_blocks("w0") > 0
    down = s.on_heartbeat(heartbeat("w0", healthy=False), 0.2)
    assert [type(e) for e in down] == [InstanceDown]
    assert s.trees["colocated"].num_blocks("w0") == 0  # its KV died with its daemon
    with pytest.raises(NoInstanceError, match=r"w0 \(unhealthy\)"):
        s.place(Place("r1", prompt(10), 1), now=0.3)
    assert s.on_heartbeat(heartbeat("w0"), 0.4) == [InstanceUp("w0", "colocated")]


def test_forgotten_charges_expire() -> None:
    s = scheduler(charge_ttl_s=100.0, heartbeat_timeout_s=1000.0)
    up(s, "w0")
    s.place(Place("old", prompt(10), 0), now=0.0)
    s.place(Place("new", prompt(10), 0), now=50.0)
    s.tick(now=120.0)
    assert list(s.charges) == ["new"] and load(s, "w0") == 10
    assert s.counters["expired_charges"] == 1


def test_admin_commands() -> None:
    s = scheduler()
    up(s, "w0", "w1")
    assert s.authorize(TOKEN) and not s.authorize("wrong") and not s.authorize("")
    status = s.admin("status", [], now=1.0)
    assert status.ok and status.result["mode"] == "colocated"
    assert status.result["instances"] == {"colocated": {"up": 2, "drained": 0, "unhealthy": 0}}

    drained = s.admin("drain", ["w0"], now=1.0)
    assert drained.ok and drained.result == {"drained": "w0", "role": "colocated"}
    assert {s.place(Place(f"r{i}", prompt(5), 1), 1.0).instance_id for i in range(3)} == {"w1"}
    rows = {r["instance_id"]: r for r in s.admin("instances", [], now=1.0).result}
    assert rows["w0"]["state"] == "drained" and rows["w1"]["charged_tokens"] == 18
    assert s.admin("undrain", ["w0"], now=1.0).ok
    assert s.admin("drain", ["w9"], now=1.0).error.startswith("no registered instance 'w9'")

    assert s.admin("policy", [], now=1.0).result == {"policy": "locality"}
    assert s.admin("policy", ["round-robin"], now=1.0).result == {
        "policy": "round-robin",
        "was": "locality",
    }
    assert s.place(Place("x", prompt(5), 1), 1.0).policy == "round-robin"
    bad = s.admin("policy", ["fastest"], now=1.0)
    assert not bad.ok and "unknown policy 'fastest'" in bad.error
    assert s.policy == "round-robin"

    wrong = s.admin("drain", [], now=1.0)
    assert not wrong.ok and "drain INSTANCE_ID" in wrong.error
    unknown = s.admin("reboot", [], now=1.0)
    assert not unknown.ok and "unknown command 'reboot'" in unknown.error


def test_admin_mode_switches_new_placements() -> None:
    from services.scheduler.config import SchedulerConfig
    from services.scheduler.core import GlobalScheduler

    core = GlobalScheduler(SchedulerConfig(mode="pd-basic", admin_token="t"))
    assert core.admin("mode", [], 0.0).result == {"mode": "pd-basic"}
    reply = core.admin("mode", ["colocated-nocache"], 0.0)
    assert reply.ok and reply.result == {"mode": "colocated-nocache", "was": "pd-basic"}
    assert (core.cfg.mode, core.cfg.caching) == ("colocated", False)
    assert core.admin("mode", ["pd-caching-3"], 0.0).ok
    assert (core.cfg.mode, core.cfg.caching) == ("pd-caching-3", True)
    bad = core.admin("mode", ["pd-caching-9"], 0.0)
    assert not bad.ok and "unknown mode" in bad.error


def test_a_dead_instance_leaves_no_phantom_load_on_the_survivors() -> None:
    s = scheduler(mode="pd-basic", policy="least-load", heartbeat_timeout_s=2.0)
    up(s, "p0", "p1", role="prefill", now=0.0)
    up(s, "d0", role="decode", now=0.0)
    first = s.place(Place("r1", prompt(100), 20), now=0.0)
    dead = first.instance_id
    survivor = "p1" if dead == "p0" else "p0"
    assert load(s, dead) == 100 and load(s, "d0") == 120
    s.on_heartbeat(heartbeat(survivor, "prefill"), now=1.5)
    s.on_heartbeat(heartbeat("d0", "decode"), now=1.5)
    assert s.tick(now=2.5) == [InstanceDown(dead, "no heartbeat for 2.5 s")]
    # r1 died with its prefill instance: its decode leg charges d0 no more.
    assert load(s, "d0") == 0 and load(s, survivor) == 0
    assert s.counters["dropped_charges"] == 1
    second = s.place(Place("r2", prompt(30, seed=1), 10), now=2.6)
    assert second.instance_id == survivor
    assert load(s, survivor) == 30 and load(s, "d0") == 40  # the true load: r2's only
    assert s.release(Release("r1")) == Released(True)  # the gateway's late release: harmless
    assert load(s, survivor) == 30 and load(s, "d0") == 40


def test_a_restarted_decode_instance_frees_the_prefill_side_of_its_requests() -> None:
    s = scheduler(mode="pd-basic")
    up(s, "p0", role="prefill")
    up(s, "d0", role="decode")
    s.place(Place("r1", prompt(50), 5), now=0.0)
    assert load(s, "p0") == 50
    s.on_heartbeat(heartbeat("d0", "decode", started_at=2.0), now=2.5)
    assert load(s, "p0") == 0 and load(s, "d0") == 0
    assert s.release(Release("r1", phase="prefill")) == Released(True)
    assert load(s, "p0") == 0


def test_registrations_beyond_max_instances_are_refused_and_counted() -> None:
    s = scheduler(max_instances=1)
    up(s, "w0")
    with pytest.raises(RegistryFullError):
        up(s, "w1")
    assert s.counters["refused_registrations"] == 1
    assert s.place(Place("r1", prompt(10), 1), now=0.0).instance_id == "w0"
