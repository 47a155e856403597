"""Races around a group forming or dissolving, in process (`AsyncEngine` pause/export).

While a member is paused for a drop or a restore (between Prepare and Commit, or during
a restore), requests and aborts keep arriving. An abort that arrives then must not be lost
by the export: the aborted request must not leave with the others (it would be adopted
and run to its end elsewhere with nobody listening, holding KV all the while).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from common.protocol import elastic as el
from common.sampling import SamplingParams
from services.worker import elastic as elastic_mod
from services.worker.async_engine import AsyncEngine, StreamOutput
from services.worker.block_pool import BlockPool
from services.worker.elastic import ElasticMember
from services.worker.engine import Engine
from services.worker.pipeline.engine import PipelineEngine
from tests.worker.helpers import MakeEngine, prompt


async def _drain(stream, outs: list[StreamOutput]) -> None:  # type: ignore[no-untyped-def]
    async for out in stream:
        outs.append(out)


async def test_abort_while_paused_is_not_exported(make_engine: MakeEngine) -> None:
    engine = make_engine(num_kv_blocks=64)
    aengine = AsyncEngine(engine)
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    running: list[StreamOutput] = []
    queued: list[StreamOutput] = []
    try:
        t1 = asyncio.create_task(_drain(aengine.generate(prompt(8, 1), params, "running"), running))
        while not running:  # admitted and producing tokens
            await asyncio.sleep(0.01)
        await aengine.pause()
        # Both arrive while paused (a member between Prepare and Commit).
        t2 = asyncio.create_task(_drain(aengine.generate(prompt(8, 2), params, "queued"), queued))
        await asyncio.sleep(0)
        aengine.abort("running")
        aengine.abort("queued")
        exported = await aengine.export()
        await asyncio.wait_for(asyncio.gather(t1, t2), 5)
    finally:
        await aengine.close()
    assert [s.request_id for s, _ in exported] == []
    assert running[-1].finished and not running[-1].moved
    assert queued and queued[-1].finished and not queued[-1].moved
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


class _FakeEngine:
    """A worker's engine at a follower's commit: records where the worker forwards new
    requests at the moment it exports its own, then fails the commit there."""

    def __init__(self, member: ElasticMember) -> None:
        self.member = member
        self.forward_at_export: str | None = None
        self.engine = None  # the inner engine (not reached before the export)

    async def export(self, *, keep_kv: bool = False) -> list[Any]:
        self.forward_at_export = self.member.forward_to
        raise RuntimeError("commit stops here (test)")


class _FakeService:
    def __init__(self) -> None:
        self.cfg = SimpleNamespace(instance_id="w1", admin_token="tok")
        self.routes: dict[str, str] = {}
        self.engine: Any = None
        self.announced: list[tuple[str, str]] = []

    def announce(self, state: el.RequestState, instance_id: str, address: str) -> None:
        self.announced.append((state.request_id, instance_id))


async def test_follower_forwards_new_requests_from_its_export_at_commit() -> None:
    """A request that reaches a follower after it exported its own at the commit (while
    it drops layers, splits and leases) must go to the leader: the follower's engine stays
    paused for the group's whole life, so a request queued there would wait until the
    restore (or its gateway's timeout)."""
    svc = _FakeService()
    member = ElasticMember(svc)  # type: ignore[arg-type]
    svc.engine = _FakeEngine(member)
    members = [
        el.Member("w0", 0, "tcp://c0", "tcp://leader-requests", "tcp://m0", "tcp://s0"),
        el.Member("w1", 1, "tcp://c1", "tcp://w1-requests", "tcp://m1", "tcp://s1"),
    ]
    member.state, member.group_id, member.epoch = "prepared", "g1", 1
    member.members, member.rank = members, 1
    try:
        reply = await member.handle(el.Commit("tok", "g1", 1, members))
    finally:
        await member.close()
    assert isinstance(reply, el.Refused) and "commit stops here" in reply.error
    assert svc.engine.forward_at_export == "tcp://leader-requests"


class _LeaderEngine:
    """A leader's async engine at a restore: one request leaves with its group blocks."""

    def __init__(self, state: el.RequestState) -> None:
        self.engine = PipelineEngine.__new__(PipelineEngine)  # only drain and pool are read
        self.engine.drain = lambda: []  # type: ignore[method-assign]
        self.engine.pool = BlockPool(4)
        self.engine.table = torch.arange(4)
        self.engine.cache = SimpleNamespace(layout=SimpleNamespace(bytes_per_block=64))  # type: ignore[assignment]
        self._executor = ThreadPoolExecutor(max_workers=1)
        self.state = state
        self.paused = False

    async def pause(self) -> None:
        self.paused = True

    async def _deliver(self, out: Any) -> None:
        raise AssertionError("nothing was in flight")

    async def export(self, *, keep_kv: bool = False) -> list[tuple[el.RequestState, Any]]:
        assert keep_kv and self.paused
        return [(self.state, None)]


class _LeaderService(_FakeService):
    def __init__(self) -> None:
        super().__init__()
        self.cfg.instance_id = "w0"
        self.failed: list[tuple[str, str]] = []
        self.aborted: dict[str, float] = {}
        self.forwarded: list[tuple[str, str]] = []

    def forward_abort(self, request_id: str, address: str) -> None:
        self.forwarded.append((request_id, address))

    def fail_moved(self, state: el.RequestState, error: str) -> None:
        self.failed.append((state.request_id, error))


def _restoring_leader(capacity: int) -> tuple[_LeaderService, ElasticMember]:
    """The leader (w0) of group g1 with w1, about to restore one request (r1, holding
    group block 0); the leader takes back `capacity` full blocks, the follower 1."""
    state = el.RequestState(
        request_id="r1",
        prompt_token_ids=[1, 2, 3],
        output_token_ids=[4],
        params=SamplingParams(max_tokens=8),
        reply_to="tcp://gateway",
        output_offset=1,
        block_ids=[0],
        num_computed_tokens=3,
    )
    svc = _LeaderService()
    member = ElasticMember(svc)  # type: ignore[arg-type]
    svc.engine = _LeaderEngine(state)
    member.state, member.group_id, member.epoch = "leader", "g1", 1
    member.members = [
        el.Member("w0", 0, "tcp://c0", "tcp://r0", "tcp://m0", "tcp://s0"),
        el.Member("w1", 1, "tcp://c1", "tcp://r1", "tcp://m1", "tcp://s1"),
    ]
    member.rank = 0
    member.held, member.capacity_blocks = [7, 6, 5, 4], capacity
    member.tables = [[7, 6, 5, 4], [7, 6, 5, 4]]
    member.followers = [
        el.FollowerCommitted("w1", [], 4, 0, 0, table=[7, 6, 5, 4], capacity_blocks=1)
    ]
    return svc, member


async def test_a_restore_that_fails_after_the_export_ends_the_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The leader exports every request (its stream ends as `moved`) before it moves the
    KV home; if moving fails (a member's daemon died), nobody holds the requests any more:
    each must get an error, not wait for its gateway's silence timeout."""

    async def move_fails(*args: Any) -> int:
        raise RuntimeError("a daemon went away")

    monkeypatch.setattr(elastic_mod, "move_home", move_fails)
    svc, member = _restoring_leader(1)
    try:
        reply = await member.handle(el.Restore("tok", "g1", 1))
    finally:
        await member.close()
        svc.engine._executor.shutdown()
    assert isinstance(reply, el.Refused) and "daemon went away" in reply.error
    assert [rid for rid, _ in svc.failed] == ["r1"]


class _SplitRefused:
    """A member's daemon that refuses the split (a peer's transfer holds device blocks)."""

    def __init__(self) -> None:
        self.params: list[int] = []

    async def free_mem(self, ids: list[int]) -> None:
        pass

    async def info(self) -> Any:
        return SimpleNamespace(device_blocks=16, split=1)

    async def set_params(self, n: int) -> None:
        self.params.append(n)

    async def split(self, g: int, *, grow: bool) -> Any:
        raise RuntimeError("cannot split: 3 device blocks in transfer")


class _CommittingEngine:
    def __init__(self, engine: Engine, state: el.RequestState) -> None:
        self.engine = engine
        self.client = _SplitRefused()
        self.arena = None
        self.owner = "w1"
        self.state = state
        self.resumed = False

    async def export(self, *, keep_kv: bool = False) -> list[tuple[el.RequestState, Any]]:
        return [(self.state, None)]

    def resume(self) -> None:
        self.resumed = True


async def test_a_commit_that_fails_after_dropping_layers_serves_again_whole(
    make_engine: MakeEngine,
) -> None:
    """A member whose commit fails after it dropped its layers (its daemon refused the
    split) is told `Abort` and serves alone again: it must hold its whole model then, not
    serve requests through half of its layers; the requests it exported must end."""
    engine = make_engine(num_kv_blocks=16)
    whole = engine.model.param_bytes()
    layers = engine.model_config.num_layers
    state = el.RequestState(
        request_id="r1",
        prompt_token_ids=[1, 2, 3],
        output_token_ids=[],
        params=SamplingParams(max_tokens=8),
        reply_to="tcp://gateway",
    )
    svc = _LeaderService()
    svc.cfg.instance_id = "w1"
    svc.routes["r1"] = "tcp://gateway"
    svc.engine = _CommittingEngine(engine, state)
    member = ElasticMember(svc)  # type: ignore[arg-type]
    members = [
        el.Member("w0", 0, "tcp://c0", "tcp://r0", "tcp://m0", "tcp://s0"),
        el.Member("w1", 1, "tcp://c1", "tcp://r1", "tcp://m1", "tcp://s1"),
    ]
    member.state, member.group_id, member.epoch = "prepared", "g1", 1
    member.members, member.rank = members, 1
    try:
        reply = await member.handle(el.Commit("tok", "g1", 1, members))
        assert isinstance(reply, el.Refused) and "cannot split" in reply.error
        assert isinstance(await member.handle(el.Abort("tok", "g1", 1)), el.Done)
    finally:
        await member.close()
    assert svc.engine.resumed and member.state == "solo"
    assert engine.model.num_local_layers == layers
    assert engine.model.param_bytes() == whole
    assert svc.engine.client.params[-1] == whole
    assert [rid for rid, _ in svc.failed] == ["r1"]


async def test_a_member_that_refuses_to_dissolve_has_its_requests_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At a restore a follower refuses `Dissolve` (it failed before adopting anything): the
    requests homed there are nobody's, so they must end with an error now."""

    async def moved(*args: Any) -> int:
        return 0

    monkeypatch.setattr(elastic_mod, "move_home", moved)
    svc, member = _restoring_leader(0)  # no room at the leader
    dissolved: list[list[el.RequestState]] = []

    async def ask(m: el.Member, msg: el.ElasticRequest) -> el.ElasticReply:
        raise elastic_mod.ElasticError(f"{m.instance_id}: shrink refused")

    async def dissolve_local(keep: list[int], requests: list[el.RequestState]) -> None:
        dissolved.append(requests)

    member.ask = ask  # type: ignore[method-assign, assignment]
    member._dissolve_local = dissolve_local  # type: ignore[method-assign]
    try:
        reply = await member.handle(el.Restore("tok", "g1", 1))
    finally:
        await member.close()
        svc.engine._executor.shutdown()
    assert isinstance(reply, el.Refused) and "shrink refused" in reply.error
    assert dissolved == [[]]  # the leader took none of them
    assert [rid for rid, _ in svc.failed] == ["r1"]


async def test_an_abort_for_a_request_gone_home_elsewhere_follows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway aborts at the instance it last heard from: after a restore that is the
    leader until the request's new home speaks. An abort that reached the leader while
    the request went home to another member (or that comes later) must reach that member,
    or the request runs to its end there with nobody listening."""

    async def moved(*args: Any) -> int:
        return 0

    monkeypatch.setattr(elastic_mod, "move_home", moved)
    svc, member = _restoring_leader(0)  # no room at the leader

    async def ask(m: el.Member, msg: el.ElasticRequest) -> el.ElasticReply:
        svc.aborted["r1"] = 0.0  # the client left while the request was moving home
        return el.Done(m.instance_id)

    async def dissolve_local(keep: list[int], requests: list[el.RequestState]) -> None:
        member._reset()

    member.ask = ask  # type: ignore[method-assign, assignment]
    member._dissolve_local = dissolve_local  # type: ignore[method-assign]
    try:
        reply = await member.handle(el.Restore("tok", "g1", 1))
    finally:
        await member.close()
        svc.engine._executor.shutdown()
    assert isinstance(reply, el.Restored)
    assert svc.forwarded == [("r1", "tcp://r1")]  # the abort that came meanwhile
    assert member.abort_to("r1") == "tcp://r1"  # and any that comes later
    assert member.abort_to("other") == ""
