"""The load client against a scripted gateway (a real ROUTER socket speaking the client
protocol, answering each request after a delay taken from its prompt): arrivals are kept
(open loop), turns of a session are sequential and in order inside one gateway session,
the count and time bounds hold, a failed turn ends its session, stop() keeps the records."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import LoadClient
from bench.workloads.model import Session, Turn, Workload
from common.protocol import client as cp
from common.security import PLAIN
from common.sockets import RouterSocket

pytestmark = pytest.mark.integration


class ScriptedGateway:
    """Answers Complete with a Final after `delay_s`; prompt token 2 (never in a generated prompt) makes it an error."""

    def __init__(self, delay_s: float = 0.05):
        self.sock: RouterSocket[Any] = RouterSocket(
            "tcp://127.0.0.1:0", cp.ClientRequest, security=PLAIN
        )
        self.delay_s = delay_s
        self.log: list[tuple[float, str, list[int]]] = []  # (time, session, token ids)
        self.sessions = 0
        self.task: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        while True:
            peer, msg = await self.sock.recv()
            if isinstance(msg, cp.OpenSession):
                self.sessions += 1
                await self.sock.send_to(peer, cp.SessionOpened(f"s{self.sessions}"))
            elif isinstance(msg, cp.CloseSession):
                await self.sock.send_to(peer, cp.SessionClosed(msg.session_id))
            elif isinstance(msg, cp.Complete):
                self.log.append((time.perf_counter(), msg.session_id, msg.token_ids or []))
                asyncio.get_running_loop().create_task(self.answer(peer, msg))

    async def answer(self, peer: bytes, msg: cp.Complete) -> None:
        await asyncio.sleep(self.delay_s)
        ids = msg.token_ids or []
        if 2 in ids:
            final = cp.Final(msg.request_id, "error", error="scripted failure")
        else:
            final = cp.Final(
                msg.request_id,
                "length",
                num_prompt_tokens=len(ids),
                num_cached_tokens=len(ids) // 2,
                num_output_tokens=msg.params.max_tokens,
                ttft_s=self.delay_s / 2,
                total_s=self.delay_s,
                instances=["w0"],
            )
        await self.sock.send_to(peer, final)


@pytest.fixture
async def gateway() -> AsyncIterator[ScriptedGateway]:
    gw = ScriptedGateway()
    gw.task = asyncio.create_task(gw.serve())
    yield gw
    gw.task.cancel()
    gw.sock.close()


def workload(arrivals: list[float], turns: int, fail_at: tuple[int, int] | None = None) -> Workload:
    sessions = []
    for i, at in enumerate(arrivals):
        ts = []
        for t in range(turns):
            token = 2 if fail_at == (i, t) else 10 + t
            ts.append(Turn((1, 50 + i, token) if t == 0 else (50 + i, token), max_tokens=3))
        sessions.append(Session(f"s-{i}", at, tuple(ts)))
    return Workload("test", tuple(sessions), {})


async def test_replays_sessions_in_order_at_their_arrival_times(gateway: ScriptedGateway) -> None:
    w = workload([0.0, 0.3, 0.3], turns=3)
    load = LoadClient(gateway.sock.address, progress=False)
    result = await load.run(w)
    assert len(result.records) == 9 and result.unsent == 0 and not result.interrupted
    # Each session used one gateway session and sent its turns in order.
    by_session: dict[str, list[list[int]]] = {}
    for _, sid, ids in gateway.log:
        by_session.setdefault(sid, []).append(ids)
    assert sorted(len(v) for v in by_session.values()) == [3, 3, 3]
    for turns in by_session.values():
        assert [ids[-1] for ids in turns] == [10, 11, 12]
    # Open loop: sessions 1 and 2 started 0.3 s after session 0, together.
    first: dict[str, float] = {}
    for at, sid, _ in gateway.log:
        first.setdefault(sid, at)
    starts = sorted(first.values())
    assert starts[1] - starts[0] >= 0.25 and starts[2] - starts[1] < 0.1
    r = result.records[0]
    assert (r["prompt"], r["cached"], r["output"], r["instances"], r["error"]) == (
        3,
        1,
        3,
        ["w0"],
        "",
    )
    assert r["ttft_s"] == pytest.approx(0.025) and r["client_s"] >= 0.05


async def test_max_requests_bounds_the_run(gateway: ScriptedGateway) -> None:
    result = await LoadClient(gateway.sock.address, max_requests=4, progress=False).run(
        workload([0.0, 0.0], turns=5)
    )
    assert len(result.records) == 4 and result.unsent == 6


async def test_duration_bounds_the_run(gateway: ScriptedGateway) -> None:
    # Sessions arrive every 0.1 s for 2 s; only those before 0.35 s may start.
    w = workload([0.1 * i for i in range(20)], turns=1)
    result = await LoadClient(gateway.sock.address, duration_s=0.35, progress=False).run(w)
    assert 3 <= len(result.records) <= 4 and result.wall_s < 1.5


async def test_a_failed_turn_ends_its_session(gateway: ScriptedGateway) -> None:
    result = await LoadClient(gateway.sock.address, progress=False).run(
        workload([0.0, 0.0], turns=3, fail_at=(0, 1))
    )
    errors = [r for r in result.records if r["error"]]
    assert [(r["session"], r["turn"], r["error"]) for r in errors] == [
        ("s-0", 1, "scripted failure")
    ]
    assert len(result.records) == 5 and result.unsent == 1


async def test_stop_keeps_what_was_measured(gateway: ScriptedGateway) -> None:
    gateway.delay_s = 0.2
    load = LoadClient(gateway.sock.address, progress=False)
    run = asyncio.create_task(load.run(workload([0.0], turns=10)))
    await asyncio.sleep(0.5)
    load.stop()
    result = await asyncio.wait_for(run, 5)
    assert result.interrupted and 1 <= len(result.records) <= 3
    assert result.unsent == 10 - len(result.records)


async def test_bench_serve_against_a_running_gateway(
    gateway: ScriptedGateway, tmp_path: Path
) -> None:
    """`memserve bench serve --gateway ADDR`: one run, against what is already there."""
    from services.cli import build_parser

    args = build_parser().parse_args(
        [
            *("bench", "serve", "--gateway", gateway.sock.address, "--workload", "agent"),
            *("--sessions", "3", "--rate", "0", "--scale", "0.1", "--no-plots"),
            *("--no-progress", "--out-dir", str(tmp_path)),
        ]
    )
    code = await asyncio.to_thread(args.func, args)
    assert code == 0
    doc = json.loads((tmp_path / "agent.json").read_text())
    (run,) = doc["runs"]
    assert run["label"] == "running-cluster" and run["summary"]["errors"] == 0
    assert run["summary"]["requests"] == doc["workload"]["summary"]["requests"] == len(gateway.log)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "agent-summary.csv",
        "agent.csv",
        "agent.json",
        "agent.md",
    ]
