"""`elastic drop / restore / status` on the scheduler service over real sockets, with
scripted workers (elastic_workers.py) on real control sockets: a drop forms a group in
two phases (Prepare to all, Commit to the follower, then to the leader with its reply),
status lists it, placements go to the leader without caching, restore dissolves it; a
member silent at Prepare aborts the drop (Abort to every member, nothing changed); bad
drops are refused with clear errors and nothing sent; a failed commit or a member's death
breaks the group and Break reaches the survivors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common.protocol import scheduler as sp
from common.protocol.elastic import Abort, Break, Commit, FollowerCommitted, Prepare, Restore
from tests.scheduler.elastic_workers import FakeWorker, Script
from tests.scheduler.harness import TOKEN, Harness, until
from tests.scheduler.helpers import cli, heartbeat, prompt

pytestmark = pytest.mark.integration


class Workers:
    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.script = Script()
        self.by_id: dict[str, FakeWorker] = {}

    async def add(self, iid: str, *, healthy: bool = True, **kw: Any) -> FakeWorker:
        w = self.by_id[iid] = FakeWorker(iid, self.script, **kw)
        await self.harness.register(heartbeat(iid, control=w.control, healthy=healthy))
        return w

    async def close(self) -> None:
        for w in self.by_id.values():
            await w.close()


@pytest.fixture
async def workers(harness: Harness) -> AsyncIterator[Workers]:
    ws = Workers(harness)
    yield ws
    await ws.close()


async def elastic(h: Harness, *args: str) -> Any:
    reply = await h.call_admin("elastic", *args)
    assert reply.ok, reply.error
    return reply.result


async def refused(h: Harness, *args: str) -> str:
    reply = await h.call_admin("elastic", *args)
    assert not reply.ok, reply.result
    return reply.error


async def place(h: Harness, n: int, tag: str) -> list[sp.Placement]:
    return [await h.rpc.call(sp.Place(f"{tag}{i}", prompt(40, i), 8)) for i in range(n)]


async def test_drop_forms_a_group_placements_go_to_its_leader_and_restore_dissolves_it(
    harness: Harness, workers: Workers
) -> None:
    w0 = await workers.add("w0")
    w1 = await workers.add("w1")
    await workers.add("w2")
    formed = await elastic(harness, "drop", "w1,w0")
    assert formed["group_id"] == "g1" and formed["leader"] == "w0" and formed["state"] == "SERVING"
    assert [(m["instance_id"], m["rank"], m["layers"]) for m in formed["members"]] == [
        ("w0", 0, [0, 2]),
        ("w1", 1, [2, 4]),
    ]
    assert formed["lent_bytes"] == 4000 and formed["num_blocks"] == 32
    # Two phases: Prepare to both, then the follower's Commit, then the leader's.
    kinds = [(i, type(m).__name__) for i, m in workers.script.log]
    assert sorted(kinds[:2]) == [("w0", "Prepare"), ("w1", "Prepare")]
    assert kinds[2:] == [("w1", "Commit"), ("w0", "Commit")]
    [prep] = w1.received(Prepare)
    assert prep.token == TOKEN and prep.epoch == 1
    assert [(m.instance_id, m.rank, m.control) for m in prep.members] == [
        ("w0", 0, w0.control),
        ("w1", 1, w1.control),
    ]
    [leader_commit] = w0.received(Commit)
    assert [m.stage for m in leader_commit.members] == [
        "tcp://127.0.0.1:1/w0-stage",
        "tcp://127.0.0.1:1/w1-stage",
    ]
    assert leader_commit.followers == [FollowerCommitted("w1", [], 32, 2000, 2000)]
    assert w1.received(Commit)[0].followers == []

    status = await elastic(harness, "status")
    [group] = status["groups"]
    assert group["group_id"] == "g1" and group["state"] == "SERVING"
    events = [e["event"] for e in status["events"]]
    assert events == ["prepare", "ready", "followers-committed", "serving"]
    assert all(e["wall"] > 1e9 and e["at"] > 0 for e in status["events"])

    # One placement target: the leader, no context caching; w1 takes nothing alone.
    placed = await place(harness, 6, "a")
    assert {p.instance_id for p in placed} == {"w0", "w2"}
    assert all(p.cache == (p.instance_id == "w2") for p in placed)
    assert all(p.address == "tcp://127.0.0.1:9/w0" for p in placed if p.instance_id == "w0")

    # The CLI prints the group as a table, and --json as the data.
    code, out, err = await cli(
        ["admin", "--address", harness.svc.admin_address, "--token", TOKEN, "elastic", "status"]
    )
    assert code == 0, err
    assert "g1" in out and "SERVING" in out and "w0(0:0-2) w1(1:2-4)" in out

    assert await refused(harness, "restore", "g7") == "unknown group 'g7' (serving: g1)"
    assert "restore GROUP|all [live|pause]" in await refused(harness, "restore", "g1", "soon")
    restored = await elastic(harness, "restore", "g1")
    assert restored == {
        "restored": [
            {
                "group_id": "g1",
                "members": ["w0", "w1"],
                "moved": 1,
                "recomputed": 0,
                "moved_bytes": 4096,
                "pause_s": 0.01,
                "live": False,
                "moved_live": 0,
                "batches": 0,
                "stall_max_s": 0.0,
                "duration_s": 0.0,
                "fallback": "",
                "rebalanced": 0,
            }
        ]
    }
    [restore] = w0.received(Restore)
    assert (restore.group_id, restore.epoch) == ("g1", 1) and not w1.received(Restore)
    # Live by default, the rest paused after half the timeout.
    assert restore.live and restore.live_timeout_s > 0
    status = await elastic(harness, "status")
    assert status["groups"][0]["state"] == "DISSOLVED"
    assert [e["event"] for e in status["events"]][-2:] == ["restoring", "dissolved"]
    placed = await place(harness, 9, "b")
    assert {p.instance_id for p in placed} == {"w0", "w1", "w2"} and all(p.cache for p in placed)


async def test_a_member_silent_at_prepare_aborts_the_drop_and_nothing_changes(
    harness: Harness, workers: Workers
) -> None:
    harness.svc.elastic.prepare_timeout_s = 0.3
    w0 = await workers.add("w0")
    w1 = await workers.add("w1", silent_on=("Prepare",))
    error = await refused(harness, "drop", "w0,w1")
    assert error == (
        "drop of w0, w1 aborted: w1 did not answer Prepare within 0.3 s; nothing changed "
        "(Abort sent to w0, w1)"
    )
    assert workers.script.of("w0") == ["Prepare", "Abort"]
    assert w0.received(Abort)[0].group_id == "g1" and w1.received(Abort)
    assert not w0.received(Commit) and not w1.received(Commit)
    status = await elastic(harness, "status")
    assert status["groups"] == []
    assert status["events"][-1]["event"] == "aborted"
    assert "w1 did not answer Prepare" in status["events"][-1]["detail"]["reason"]
    placed = await place(harness, 4, "a")
    assert {p.instance_id for p in placed} == {"w0", "w1"} and all(p.cache for p in placed)


async def test_bad_drops_are_refused_with_clear_errors_and_nothing_changes(
    harness: Harness, workers: Workers
) -> None:
    await workers.add("w0")
    await workers.add("w1")
    await workers.add("sick", healthy=False)
    await workers.add("small", model="small")
    await workers.add("poor", budget_bytes=1)
    await workers.add("odd1", num_layers=3)
    await workers.add("odd2", num_layers=3)
    assert await refused(harness, "drop", "w0,zz") == (
        "unknown instance 'zz' (registered: odd1, odd2, poor, sick, small, w0, w1)"
    )
    assert await refused(harness, "drop", "w0") == "a group needs at least 2 instances, got 1"
    assert await refused(harness, "drop", "w0,sick") == "instance 'sick' is unhealthy"
    assert workers.script.log == []  # refused before anything was sent
    assert await refused(harness, "drop", "w0,small") == (
        "drop of small, w0 aborted: members differ in model (small: small, w0: tiny); "
        "nothing changed (Abort sent to small, w0)"
    )
    error = await refused(harness, "drop", "w0,poor")
    assert "members differ in budget_bytes (poor: 1, w0: 100000)" in error
    error = await refused(harness, "drop", "odd1,odd2")
    assert "2 members cannot split 3 layers evenly; nothing changed" in error
    for iid in ("w0", "small", "poor", "odd1", "odd2"):
        assert "Commit" not in workers.script.of(iid) and "Abort" in workers.script.of(iid)
    assert (await elastic(harness, "status"))["groups"] == []
    await elastic(harness, "drop", "w0,w1")
    assert await refused(harness, "drop", "w1,small") == (
        "instance 'w1' is already in group g4 (SERVING)"
    )
    assert await refused(harness, "drop", "w0") == "a group needs at least 2 instances, got 1"
    reply = await harness.call_admin("elastic", "restore")
    assert not reply.ok and "elastic restore GROUP|all" in reply.error
    reply = await harness.call_admin("elastic", "drop", "w0,w1", token="wrong")
    assert not reply.ok and reply.error == "bad admin token"


async def test_a_failed_commit_breaks_the_group_and_tells_the_members(
    harness: Harness, workers: Workers
) -> None:
    harness.svc.elastic.timeout_s = 0.3
    w0 = await workers.add("w0")
    w1 = await workers.add("w1", silent_on=("Commit",))
    error = await refused(harness, "drop", "w0,w1")
    assert error == (
        "group g1 broken: follower commit failed: w1 did not answer Commit within 0.3 s "
        "(Break to w1; Abort to w0)"
    )
    assert w1.received(Break)[0].reason.startswith("follower commit failed")
    assert w0.received(Abort) and not w0.received(Commit)
    [group] = (await elastic(harness, "status"))["groups"]
    assert group["state"] == "BROKEN"
    # Broken: both are placement targets again.
    placed = await place(harness, 4, "a")
    assert {p.instance_id for p in placed} == {"w0", "w1"}


async def test_a_members_death_breaks_the_group_and_break_reaches_the_survivor(
    harness: Harness, workers: Workers
) -> None:
    w0 = await workers.add("w0")
    w1 = await workers.add("w1")
    await elastic(harness, "drop", "w0,w1")
    await harness.beat(heartbeat("w1", control=w1.control, healthy=False))
    await until(lambda: bool(w0.received(Break)), "Break at the survivor")
    [brk] = w0.received(Break)
    assert (brk.token, brk.group_id, brk.epoch) == (TOKEN, "g1", 1)
    assert brk.reason == "member w1 down: unhealthy (lost its MemPool daemon)"
    assert not w1.received(Break)
    await until(
        lambda: any(e.name == "break-sent" for e in harness.svc.core.elastic.events),
        "the break recorded",
    )
    status = await elastic(harness, "status")
    assert status["groups"][0]["state"] == "BROKEN"
    assert [e["event"] for e in status["events"]][-2:] == ["broken", "break-sent"]
    assert status["events"][-1]["detail"]["answers"] == {"w0": "Done"}
    # The survivor takes placements alone again (cached).
    placed = await place(harness, 2, "a")
    assert {(p.instance_id, p.cache) for p in placed} == {("w0", True)}
    # `restore all` has nothing left to restore.
    assert await elastic(harness, "restore", "all") == {"restored": []}
    admin = ["admin", "--address", harness.svc.admin_address, "--token", TOKEN]
    code, out, _ = await cli([*admin, "--json", "elastic", "status"])
    assert code == 0 and json.loads(out)["groups"][0]["state"] == "BROKEN"


async def test_a_refused_leader_commit_or_restore_breaks_the_group(
    harness: Harness, workers: Workers
) -> None:
    w0 = await workers.add("w0", refuse_on=("Commit",))
    w1 = await workers.add("w1")
    assert await refused(harness, "drop", "w0,w1") == (
        "group g1 broken: leader commit failed: w0 refused: w0 will not Commit "
        "(Break to w1; Abort to w0)"
    )
    assert workers.script.of("w1") == ["Prepare", "Commit", "Break"]
    assert workers.script.of("w0")[-2:] == ["Commit", "Abort"] and not w0.received(Break)

    w2 = await workers.add("w2", refuse_on=("Restore",))
    w3 = await workers.add("w3")
    assert (await elastic(harness, "drop", "w3,w2"))["group_id"] == "g2"
    assert await refused(harness, "restore", "all") == (
        "group g2 broken: restore failed: w2 refused: w2 will not Restore (Break to w2, w3)"
    )
    assert w2.received(Break) and w3.received(Break) and not w1.received(Restore)
    states = {g["group_id"]: g["state"] for g in (await elastic(harness, "status"))["groups"]}
    assert states == {"g1": "BROKEN", "g2": "BROKEN"}
