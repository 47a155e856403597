"""The scheduler's pipeline groups, pure (services/scheduler/elastic.py and the core's
placement): every refusal of a drop with the message the admin sees and nothing changed,
the layer ranges (disjoint, covering every layer), restore targets, a member's death, the
bounded timeline, and a serving group as one placement target without context caching."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.protocol.elastic import FollowerCommitted, GroupServing, Ready, Restored
from common.protocol.scheduler import Place
from services.cli.admin import render
from services.scheduler.config import SchedulerConfig
from services.scheduler.core import GlobalScheduler
from services.scheduler.elastic import (
    BROKEN,
    DISSOLVED,
    FORMING,
    RESTORING,
    SERVING,
    Elastic,
    ElasticError,
    Group,
    layer_ranges,
    parse_ids,
)
from services.scheduler.registry import Registry
from tests.scheduler.helpers import heartbeat, prompt


def registry(*ids: str, **kw: object) -> Registry:
    reg = Registry(heartbeat_timeout_s=2.0)
    for iid in ids:
        reg.heartbeat(heartbeat(iid, control=f"tcp://127.0.0.1:7/{iid}", **kw), 0.0)  # type: ignore[arg-type]
    return reg


def ready(iid: str, **kw: object) -> Ready:
    fields: dict[str, object] = dict(
        instance_id=iid,
        model="tiny",
        num_layers=4,
        param_bytes=1000,
        budget_bytes=10_000,
        block_bytes=64,
        stage=f"tcp://127.0.0.1:6/{iid}",
    )
    fields.update(kw)
    return Ready(**fields)  # type: ignore[arg-type]


def serving(e: Elastic, members: list[str]) -> Group:
    g = e.begin(members, 1.0, 1000.0)
    e.ready(g, {m: ready(m) for m in members}, 1.1, 1000.1)
    followers = [FollowerCommitted(m, [], 8, 500, 500) for m in members[1:]]
    e.followers_committed(g, followers, 1.2, 1000.2)
    e.serving(g, GroupServing(g.group_id, 8, 16, 0, 500, 500), followers, 1.3, 1000.3)
    return g


@pytest.mark.parametrize(
    ("ids", "error"),
    [
        (["w0", "nope"], "unknown instance 'nope' (registered: w0, w1, w2)"),
        (["w0"], "a group needs at least 2 instances, got 1"),
        ([], "a group needs at least 2 instances, got 0"),
        (["w0", "w1", "w0"], "instance listed twice: w0"),
    ],
)
def test_a_bad_drop_is_refused_with_a_clear_error_and_nothing_changes(
    ids: list[str], error: str
) -> None:
    e = Elastic()
    reg = registry("w0", "w1", "w2")
    with pytest.raises(ElasticError) as exc:
        e.validate_drop(ids, reg)
    assert str(exc.value) == error
    assert e.groups == {} and not e.events


def test_unhealthy_drained_grouped_or_other_role_instances_are_refused() -> None:
    e = Elastic()
    reg = registry("w0", "w1", "w2", "w3")
    reg.heartbeat(heartbeat("p0", "prefill", control="tcp://127.0.0.1:7/p0"), 0.0)
    reg.heartbeat(heartbeat("w1", healthy=False, control="tcp://127.0.0.1:7/w1"), 0.1)
    reg.drain("w2")
    with pytest.raises(ElasticError, match="instance 'w1' is unhealthy"):
        e.validate_drop(["w0", "w1"], reg)
    with pytest.raises(ElasticError, match="instance 'w2' is drained"):
        e.validate_drop(["w0", "w2"], reg)
    with pytest.raises(ElasticError, match="'p0' is a prefill instance; only colocated"):
        e.validate_drop(["w0", "p0"], reg)
    g = e.begin(["w0", "w3"], 0.0, 0.0)
    with pytest.raises(ElasticError, match=f"'w3' is already in group {g.group_id} \\(FORMING\\)"):
        e.validate_drop(["w3", "w0"], reg)


def test_members_are_ranked_by_id_and_the_lowest_leads() -> None:
    e = Elastic()
    members = e.validate_drop(parse_ids(" w2, w0 ,w1"), registry("w0", "w1", "w2"))
    assert members == ["w0", "w1", "w2"]
    g = e.begin(members, 5.0, 500.0)
    assert (g.group_id, g.epoch, g.leader, g.followers, g.state) == (
        "g1",
        1,
        "w0",
        ["w1", "w2"],
        FORMING,
    )


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"model": "small"}, "members differ in model (w0: tiny, w1: small)"),
        ({"num_layers": 8}, "members differ in num_layers (w0: 4, w1: 8)"),
        ({"budget_bytes": 1}, "members differ in budget_bytes (w0: 10000, w1: 1)"),
        ({"block_bytes": 1}, "members differ in block_bytes (w0: 64, w1: 1)"),
    ],
)
def test_readys_that_disagree_are_refused(bad: dict[str, object], error: str) -> None:
    e = Elastic()
    g = e.begin(["w0", "w1"], 0.0, 0.0)
    with pytest.raises(ElasticError) as exc:
        e.ready(g, {"w0": ready("w0"), "w1": ready("w1", **bad)}, 0.1, 0.1)
    assert str(exc.value) == error
    assert g.layer_ranges == [] and g.state == FORMING


def test_a_group_that_does_not_divide_the_layers_is_refused() -> None:
    e = Elastic()
    g = e.begin(["w0", "w1", "w2"], 0.0, 0.0)
    with pytest.raises(ElasticError, match="3 members cannot split 4 layers evenly"):
        e.ready(g, {m: ready(m) for m in g.members}, 0.1, 0.1)
    e.abort(g, "uneven", 0.2, 0.2)
    assert e.groups == {} and [ev.name for ev in e.events] == ["prepare", "aborted"]
    # Its epoch stays used: the next group has another.
    assert e.begin(["w0", "w1"], 0.3, 0.3).epoch == 2


@given(st.integers(1, 8), st.integers(1, 16))
def test_layer_ranges_are_disjoint_and_cover_every_layer(g: int, per: int) -> None:
    num_layers = g * per
    ranges = layer_ranges(num_layers, g)
    assert len(ranges) == g
    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end == start  # adjacent: disjoint, no gap
    assert sorted(i for a, b in ranges for i in range(a, b)) == list(range(num_layers))


@given(st.integers(2, 8), st.integers(1, 64))
def test_layer_ranges_refuse_an_uneven_split(g: int, num_layers: int) -> None:
    if num_layers % g:
        with pytest.raises(ElasticError):
            layer_ranges(num_layers, g)
    else:
        assert layer_ranges(num_layers, g)[1] == (num_layers // g, 2 * num_layers // g)


def test_a_served_group_lists_members_ranks_layers_and_lent_bytes() -> None:
    e = Elastic()
    g = serving(e, ["w0", "w1"])
    status = e.status()
    [grp] = status["groups"]
    assert grp["state"] == SERVING and grp["leader"] == "w0"
    assert grp["members"] == [
        {"instance_id": "w0", "rank": 0, "layers": [0, 2], "param_bytes": 500},
        {"instance_id": "w1", "rank": 1, "layers": [2, 4], "param_bytes": 500},
    ]
    assert grp["lent_bytes"] == 1000 and grp["num_blocks"] == 8 and grp["formed_at"] == 1000.3
    names = [ev["event"] for ev in status["events"]]
    assert names == ["prepare", "ready", "followers-committed", "serving"]
    assert status["events"][-1]["at"] == 1.3 and status["events"][-1]["wall"] == 1000.3
    assert e.hidden() == {"w1"} and e.leader_group("w0") is g and e.leader_group("w1") is None


def test_restore_targets() -> None:
    e = Elastic()
    with pytest.raises(ElasticError, match="unknown group 'g9' \\(serving: none\\)"):
        e.resolve_restore("g9")
    assert e.resolve_restore("all") == []
    g1 = serving(e, ["w0", "w1"])
    g2 = serving(e, ["w2", "w3"])
    assert e.resolve_restore("all") == [g1, g2]
    assert e.resolve_restore("g2") == [g2]
    e.restoring(g1, 2.0, 2.0)
    assert g1.state == RESTORING and e.hidden() == {"w1", "w3"}  # still one target
    with pytest.raises(ElasticError, match="group g1 is RESTORING, not SERVING"):
        e.resolve_restore("g1")
    e.dissolved(g1, Restored("g1", 2, 0, 128, 0.01), 2.1, 2.1)
    assert g1.state == DISSOLVED and e.group_of("w0") is None and e.hidden() == {"w3"}


def test_a_members_death_breaks_its_group_and_owes_the_survivors_a_break() -> None:
    e = Elastic()
    g = serving(e, ["w0", "w1", "w2", "w3"])
    e.on_instance_down("w9", "no heartbeat", 3.0, 3.0)  # nobody's member: nothing
    assert e.take_breaks() == []
    e.on_instance_down("w2", "no heartbeat for 2.1 s", 3.0, 3.0)
    assert g.state == BROKEN and g.reason == "member w2 down: no heartbeat for 2.1 s"
    assert e.take_breaks() == [(g, ["w0", "w1", "w3"])] and e.take_breaks() == []
    assert e.group_of("w0") is None and e.hidden() == set()  # eligible again
    e.on_instance_down("w0", "again", 4.0, 4.0)  # broken already: nothing more
    assert e.take_breaks() == []


def test_the_timeline_and_finished_groups_are_bounded() -> None:
    e = Elastic(max_events=5, max_finished=2)
    groups = [serving(e, [f"a{i}", f"b{i}"]) for i in range(4)]
    for g in groups:
        e.broken(g, "test", 9.0, 9.0)
    assert len(e.events) == 5
    assert list(e.groups) == ["g3", "g4"]


def core_with_group() -> GlobalScheduler:
    core = GlobalScheduler(SchedulerConfig(admin_token="t").validate())
    for iid in ("w0", "w1", "w2"):
        core.on_heartbeat(heartbeat(iid, control=f"tcp://127.0.0.1:7/{iid}"), 0.0)
    serving(core.elastic, ["w0", "w1"])
    return core


def test_a_serving_group_is_one_placement_target_through_its_leader_without_cache() -> None:
    core = core_with_group()
    placed = [core.place(Place(f"r{n}", prompt(40, n), 8), 1.0) for n in range(6)]
    assert {p.instance_id for p in placed} == {"w0", "w2"}  # never the follower
    for p in placed:
        assert p.cache == (p.instance_id == "w2")
        assert p.address == f"tcp://127.0.0.1:9/{p.instance_id}"
    assert core.counters["group_placements"] == 3
    # Dissolved: the members are placement targets of their own again.
    [g] = core.elastic.placing()
    core.elastic.restoring(g, 2.0, 2.0)
    core.elastic.dissolved(g, Restored(g.group_id, 0, 0, 0, 0.0), 2.0, 2.0)
    placed = [core.place(Place(f"s{n}", prompt(40, n), 8), 3.0) for n in range(9)]
    assert {p.instance_id for p in placed} == {"w0", "w1", "w2"}


def test_a_member_that_goes_down_breaks_the_group_in_the_core() -> None:
    core = core_with_group()
    core.on_heartbeat(heartbeat("w1", healthy=False, control="tcp://127.0.0.1:7/w1"), 1.0)
    [g] = core.elastic.groups.values()
    assert g.state == BROKEN and "member w1 down: unhealthy" in g.reason
    assert [(b.group_id, s) for b, s in core.elastic.take_breaks()] == [(g.group_id, ["w0"])]
    # Silence breaks a group too (tick).
    serving(core.elastic, ["w0", "w2"])
    core.on_heartbeat(heartbeat("w0", control="tcp://127.0.0.1:7/w0"), 5.0)
    core.tick(5.0)  # w2 silent since 0.0 > 2 s
    [(b, survivors)] = core.elastic.take_breaks()
    assert b.state == BROKEN and survivors == ["w0"] and "no heartbeat" in b.reason


def test_elastic_status_is_answered_by_the_core_and_drop_by_the_service() -> None:
    core = core_with_group()
    reply = core.admin("elastic", ["status"], 1.0)
    assert reply.ok and reply.result["groups"][0]["group_id"] == "g1"
    reply = core.admin("elastic", ["drop", "w0,w2"], 1.0)
    assert not reply.ok and reply.error == "elastic drop is run by the scheduler service"
    reply = core.admin("elastic", [], 1.0)
    assert not reply.ok and "elastic status | elastic drop ID,ID" in reply.error
    assert core.describe_instances(1.0)[1]["group"] == "g1"
    assert core.status(1.0)["groups"] == {SERVING: 1}


def test_the_cli_prints_the_group_id_first_and_status_as_tables() -> None:
    e = Elastic()
    g = serving(e, ["w0", "w1"])
    out = render("elastic", g.to_dict(), ["drop", "w0,w1"]).splitlines()
    assert out[0] == "g1" and "members w0(0:0-2) w1(1:2-4), lent 1000 bytes" in out[1]
    table = render("elastic", e.status(), ["status"]).splitlines()
    assert table[0].split()[:5] == ["GROUP", "STATE", "EPOCH", "LEADER", "MEMBERS(RANK:LAYERS)"]
    assert table[1].split()[:5] == ["g1", "SERVING", "1", "w0", "w0(0:0-2)"]
    assert [line.split()[3] for line in table[4:]] == [
        "prepare",
        "ready",
        "followers-committed",
        "serving",
    ]
    assert render("elastic", {"restored": []}, ["restore", "all"]) == "nothing to restore"
    assert render("elastic", {"groups": [], "events": []}, ["status"]) == "no groups"
