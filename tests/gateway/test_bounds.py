"""Bounds on every client input, on the real gateway shell and sockets (issue 12, item 3):
each attack found on the client socket is refused (or survived) with an error to that
client alone, while a normal client is served meanwhile.

    attack                                   bound
    a 1 MiB request_id echoed in each chunk  max_id_bytes: refused, the id not echoed
    8 parallel 1 MB prompts                  max_prompt_bytes, judged before tokenizing
    10,000 sessions from one client          max_sessions_per_client: it evicts its own
    max_tokens = 2**63                       the model's context window
    many requests in flight from one client  max_inflight_per_client
    a flood of malformed messages            throttled warning lines
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import zmq
import zmq.asyncio

from common.client import GatewayClient, GatewayError
from common.protocol import client as cp
from common.protocol.worker import TokenChunk
from common.sampling import SamplingParams
from common.security import PLAIN
from common.sockets import DealerSocket
from services.gateway.service import GatewayService
from tests.gateway.harness import FakeScheduler, FakeWorker, ids, running_gateway
from tests.raw import raw_socket

pytestmark = pytest.mark.integration

PARAMS = SamplingParams(max_tokens=8)


async def answer(w: FakeWorker, text: str = "ok") -> str:
    """Play the worker for the next request: one chunk that ends it. Its request id."""
    gen = await w.recv()
    await w.send(
        gen.reply_to, TokenChunk(gen.request_id, ids(text), finished=True, finish_reason="stop")
    )
    return str(gen.request_id)


async def served(gw: GatewayService, w: FakeWorker, prompt: str = "hi") -> None:
    """A normal client is served: the positive control of every test here."""
    client = GatewayClient(gw.endpoints["clients"], timeout_s=10)
    try:
        done, _ = await asyncio.gather(client.complete(prompt, PARAMS), answer(w, "yes"))
        assert done.text == "yes" and done.final.finish_reason == "stop"
    finally:
        client.close()


async def test_an_oversized_request_id_is_refused_and_never_echoed(
    sched: FakeScheduler, worker: FakeWorker
) -> None:
    async with running_gateway(sched, max_id_bytes=128) as (gw, _):
        raw = DealerSocket(gw.endpoints["clients"], cp.ClientReply, security=PLAIN)
        try:
            await raw.send(cp.Complete("r" * (1 << 20), prompt="hi"))
            final = await asyncio.wait_for(raw.recv(), 10)
            assert isinstance(final, cp.Final) and final.finish_reason == "error"
            assert final.request_id == "" and "longer than 128 bytes" in final.error
            assert gw.core.requests == {} and sched.places == []
            # Within the bound (128 bytes, counted in UTF-8): accepted and echoed.
            ok_id = "é" * 64
            await raw.send(cp.Complete(ok_id, prompt="hi"))
            await answer(worker)
            chunk, final = await raw.recv(), await raw.recv()
            assert isinstance(chunk, cp.Chunk) and chunk.request_id == ok_id
            assert isinstance(final, cp.Final) and final.request_id == ok_id and not final.error
            await raw.send(cp.Complete("r", prompt="hi", session_id="s" * 129))
            final = await asyncio.wait_for(raw.recv(), 10)
            assert isinstance(final, cp.Final) and "session_id longer than" in final.error
        finally:
            raw.close()
        await served(gw, worker)


async def test_big_prompts_are_refused_before_tokenizing_while_others_are_served(
    sched: FakeScheduler, worker: FakeWorker
) -> None:
    async with running_gateway(sched) as (gw, _):
        limit = gw.core.max_prompt_bytes
        tokenized: list[tuple[int, bool]] = []  # (text length, on the event loop's thread)
        encode = gw.core.tokenizer.encode

        def counting(text: str, *, add_special_tokens: bool = True) -> list[int]:
            on_loop = threading.current_thread() is threading.main_thread()
            tokenized.append((len(text), on_loop))
            return encode(text, add_special_tokens=add_special_tokens)

        gw.core.tokenizer.encode = counting  # type: ignore[method-assign]
        attackers = [GatewayClient(gw.endpoints["clients"], timeout_s=10) for _ in range(8)]
        try:
            big = "x" * (1 << 20)
            attacks = [
                asyncio.create_task(a.complete(big, PARAMS, request_id=f"big{i}"))
                for i, a in enumerate(attackers)
            ]
            await served(gw, worker, "a normal prompt")
            for t in attacks:
                with pytest.raises(GatewayError, match="prompt too long: over"):
                    await t
        finally:
            for a in attackers:
                a.close()
        # Only the normal prompt was tokenized, and in a thread, not on the event loop.
        assert tokenized == [(len("a normal prompt"), False)]
        # Within the byte bound a prompt is tokenized and judged by its tokens: at the
        # bound exactly it is more tokens than the context; one byte over, it is not read.
        client = GatewayClient(gw.endpoints["clients"], timeout_s=10)
        try:
            with pytest.raises(GatewayError, match=r"prompt too long: \d+ tokens"):
                await client.complete("y" * limit, PARAMS)
            with pytest.raises(GatewayError, match="prompt too long: over"):
                await client.complete("y" * (limit + 1), PARAMS)
            assert tokenized[1:] == [(limit, False)]
        finally:
            client.close()


async def test_one_client_opening_many_sessions_evicts_only_its_own(
    sched: FakeScheduler, worker: FakeWorker
) -> None:
    async with running_gateway(sched, max_sessions=8, max_sessions_per_client=3) as (gw, _):
        victim = GatewayClient(gw.endpoints["clients"], timeout_s=10)
        attacker = GatewayClient(gw.endpoints["clients"], timeout_s=10)
        try:
            kept = await victim.open_session()
            opened = [await attacker.open_session() for _ in range(200)]
            assert len(set(opened)) == 200  # never refused: its own oldest went instead
            assert len(gw.core.sessions.sessions) == 4  # 3 of the attacker's, 1 of the victim's
            assert kept in gw.core.sessions.sessions
            assert set(opened[-3:]) <= set(gw.core.sessions.sessions)
            with pytest.raises(GatewayError, match="unknown session"):
                await attacker.complete("hi", PARAMS, opened[0])
            # The victim's session still serves its turn; the victim may open more.
            done, _ = await asyncio.gather(victim.complete("hi", PARAMS, kept), answer(worker))
            assert done.text == "ok"
            await victim.open_session()
        finally:
            victim.close()
            attacker.close()


async def test_many_clients_at_the_total_cap_evict_the_least_recently_used_idle_session(
    sched: FakeScheduler, worker: FakeWorker
) -> None:
    async with running_gateway(sched, max_sessions=2, max_sessions_per_client=2) as (gw, _):
        clients = [GatewayClient(gw.endpoints["clients"], timeout_s=10) for _ in range(3)]
        try:
            a = await clients[0].open_session()
            b = await clients[1].open_session()
            await asyncio.gather(clients[0].complete("hi", PARAMS, a), answer(worker))
            c = await clients[2].open_session()  # b is the least recently used
            assert set(gw.core.sessions.sessions) == {a, c}
        finally:
            for x in clients:
                x.close()
        assert b not in gw.core.sessions.sessions


async def test_max_tokens_above_the_context_is_refused(
    sched: FakeScheduler, worker: FakeWorker
) -> None:
    async with running_gateway(sched) as (gw, _):
        context = gw.core.max_tokens_limit
        client = GatewayClient(gw.endpoints["clients"], timeout_s=10)
        try:
            for n in (2**63, context + 1):
                with pytest.raises(GatewayError, match=f"max_tokens too large: {n}, limit"):
                    await client.complete("hi", SamplingParams(max_tokens=n))
            assert sched.places == []
            whole = SamplingParams(max_tokens=context)
            done, _ = await asyncio.gather(client.complete("hi", whole), answer(worker))
            assert done.final.finish_reason == "stop"
            assert sched.places[-1].max_tokens == context
        finally:
            client.close()


async def test_one_client_cannot_take_every_slot_in_flight(
    sched: FakeScheduler, worker: FakeWorker
) -> None:
    async with running_gateway(sched, max_inflight=8, max_inflight_per_client=2) as (gw, _):
        greedy = GatewayClient(gw.endpoints["clients"], timeout_s=10)
        try:
            held = [asyncio.create_task(greedy.complete("hi", PARAMS)) for _ in range(2)]
            gens = [await worker.recv(), await worker.recv()]
            with pytest.raises(GatewayError, match="this client has 2 requests in flight"):
                await greedy.complete("hi", PARAMS)
            await served(gw, worker)  # another client still gets a slot
            for gen in gens:
                await worker.send(
                    gen.reply_to,
                    TokenChunk(gen.request_id, ids("k"), finished=True, finish_reason="stop"),
                )
            assert [(await t).text for t in held] == ["k", "k"]
            assert gw.core.inflight_of == {}
        finally:
            greedy.close()


async def test_a_flood_of_malformed_messages_writes_a_few_warning_lines(
    sched: FakeScheduler, worker: FakeWorker, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_gateway(sched, log_burst=3, log_interval_s=3600) as (gw, _):
        sock = raw_socket(zmq.DEALER, PLAIN)
        sock.connect(gw.endpoints["clients"])
        try:
            for _ in range(50):
                await sock.send_multipart([b"\xc1 not msgpack"])
                bad = await asyncio.wait_for(sock.recv_multipart(), 10)
                assert b"malformed request" in bad[0]  # each one still gets its error
        finally:
            sock.close(0)
        await served(gw, worker)
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).splitlines()
    assert sum("malformed client message" in line for line in lines) == 3
