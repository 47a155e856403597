"""The gateway's bookkeeping, driven directly: validation with clear errors, bounded
admission, duplicate ids, the layout of a session's prompts as turns go by, what a
placement makes of a request, and the accounting at the end."""

from __future__ import annotations

import pytest

from common.protocol import client as cp
from common.protocol import scheduler as sp
from common.protocol import worker as wp
from common.protocol.worker import TokenChunk
from common.sampling import SamplingParams
from services.gateway.core import GatewayCore, Request
from tests.gateway.core_helpers import BOS, TOK, VOCAB, A, B, admitted, core


def refused(c: GatewayCore, req: cp.Complete, peer: bytes = A) -> str:
    f = c.admit(peer, req, 0.0)
    assert isinstance(f, cp.Final), f
    assert f.finish_reason == "error" and f.request_id == req.request_id
    return f.error


def run_to_length(c: GatewayCore, r: Request, tokens: list[int], now: float) -> cp.Final:
    up = r.stream.accept(TokenChunk(r.rid, tokens, finished=True, finish_reason="length"), now)
    assert up.final is not None
    assert c.finish(r.rid, up.final, now) is r
    return up.final


def test_a_text_prompt_gets_the_bos_and_a_unique_gateway_id() -> None:
    c = core()
    r1 = admitted(c, A, cp.Complete("1", prompt="hi"))
    r2 = admitted(c, B, cp.Complete("1", prompt="hi"))  # same client id, other client
    assert r1.stream.prompt_ids == [BOS, *TOK.encode("hi", add_special_tokens=False)]
    assert r1.rid != r2.rid and r1.rid.startswith("gw-x-")
    assert c.lookup(A, "1") is r1 and c.lookup(B, "1") is r2 and c.lookup(A, "2") is None


@pytest.mark.parametrize(
    ("req", "error"),
    [
        (cp.Complete("r", prompt="x", token_ids=[5]), "exactly one of prompt"),
        (cp.Complete("r"), "exactly one of prompt"),
        (cp.Complete("r", prompt="x", params=SamplingParams(top_p=0.0)), "top_p"),
        (cp.Complete("r", prompt="x", params=SamplingParams(max_tokens=0)), "max_tokens"),
        (cp.Complete("r", prompt="x", params=SamplingParams(temperature=-1)), "temperature"),
        (cp.Complete("r", token_ids=[5, VOCAB]), f"outside the vocabulary [0, {VOCAB})"),
        (cp.Complete("r", token_ids=[-1]), "outside the vocabulary"),
        (cp.Complete("r", token_ids=[]), "empty"),
        (cp.Complete("r", prompt="x", session_id="nope"), "unknown session 'nope'"),
    ],
)
def test_invalid_requests_are_refused_with_a_clear_error(req: cp.Complete, error: str) -> None:
    c = core()
    assert error in refused(c, req)
    assert not c.requests and not c.by_client and c.failed == 1


def test_a_prompt_too_long_says_how_long_and_the_limit() -> None:
    c = core(max_model_len=64)
    assert "prompt too long: 64 tokens, limit 63" in refused(
        c, cp.Complete("r", token_ids=[5] * 64)
    )
    assert isinstance(c.admit(A, cp.Complete("ok", token_ids=[5] * 63), 0.0), Request)


def test_admission_is_bounded_and_request_ids_are_unique_per_client() -> None:
    c = core(max_inflight=2)
    r = admitted(c, A, cp.Complete("1", prompt="a"))
    assert "already in flight" in refused(c, cp.Complete("1", prompt="b"))
    admitted(c, B, cp.Complete("1", prompt="a"))
    assert refused(c, cp.Complete("3", prompt="c")).startswith("overloaded: 2 requests in flight")
    # One ends: room again, and its id may be used again.
    c.finish(r.rid, r.stream.end("abort", 1.0), 1.0)
    admitted(c, A, cp.Complete("1", prompt="again"))
    assert (c.served, c.failed) == (0, 2)  # an abort is neither served nor failed


def test_a_session_prompt_is_the_history_then_the_new_text_without_bos() -> None:
    c = core(max_model_len=4096)
    sid = c.sessions.open(0.0)
    r1 = admitted(c, A, cp.Complete("t1", prompt="Hello", session_id=sid))
    assert r1.stream.prompt_ids == TOK.encode("Hello")  # first turn: BOS + text
    assert "in progress" in refused(c, cp.Complete("t1b", prompt="x", session_id=sid))
    out1 = TOK.encode(" there", add_special_tokens=False)
    run_to_length(c, r1, out1, 1.0)
    assert c.sessions.sessions[sid].history == TOK.encode("Hello") + out1

    r2 = admitted(c, A, cp.Complete("t2", prompt=" again", session_id=sid), 2.0)
    turn2 = TOK.encode("Hello") + out1 + TOK.encode(" again", add_special_tokens=False)
    assert r2.stream.prompt_ids == turn2 and turn2.count(BOS) == 1
    # A failed turn leaves the history as it was; the next turn builds on the same one.
    c.finish(r2.rid, r2.stream.end("error", 3.0, "worker died"), 3.0)
    assert c.sessions.sessions[sid].history == TOK.encode("Hello") + out1
    r3 = admitted(c, A, cp.Complete("t3", token_ids=[7, 8], session_id=sid), 4.0)
    assert r3.stream.prompt_ids == TOK.encode("Hello") + out1 + [7, 8]
    run_to_length(c, r3, [9], 5.0)
    assert c.sessions.sessions[sid].history == TOK.encode("Hello") + out1 + [7, 8, 9]
    assert (c.served, c.failed) == (2, 2)


def test_a_refused_turn_gives_the_session_back() -> None:
    c = core(max_model_len=8)
    sid = c.sessions.open(0.0)
    assert "prompt too long" in refused(c, cp.Complete("r", token_ids=[5] * 9, session_id=sid))
    assert "top_p" in refused(
        c, cp.Complete("r", prompt="x", session_id=sid, params=SamplingParams(top_p=2.0))
    )
    r = admitted(c, A, cp.Complete("r", token_ids=[5, 6], session_id=sid))
    assert r.stream.prompt_ids == [5, 6] and c.sessions.sessions[sid].busy


def test_a_pd_placement_gives_two_legs_and_the_generate_for_the_prefill_worker() -> None:
    c = core()
    r = admitted(c, A, cp.Complete("r", token_ids=[5, 6, 7], params=SamplingParams(max_tokens=3)))
    place = c.place_request(r)
    assert (place.request_id, place.token_ids, place.max_tokens) == (r.rid, [5, 6, 7], 3)
    handoff = wp.HandOff(
        "decode-0", address="tcp://d:1", mempool="tcp://dm:1", insert=True, cache=True
    )
    placement = sp.Placement(
        r.rid, "prefill-0", address="tcp://p:1", mode="pd-caching-2", policy="x", handoff=handoff
    )
    gen = c.placed(r, placement)
    assert gen == wp.Generate(
        r.rid,
        [5, 6, 7],
        params=r.stream.params,
        reply_to="tcp://10.0.0.1:7000",
        cache=True,
        handoff=handoff,
    )
    assert r.pd and [leg.instance_id for leg in r.stream.legs] == ["prefill-0", "decode-0"]
    assert c.on_instance("decode-0") == [r] and c.on_instance("prefill-1") == []


def test_lookups_for_a_gone_client_and_silent_requests() -> None:
    c = core()
    ra = admitted(c, A, cp.Complete("1", prompt="a"), now=0.0)
    rb = admitted(c, B, cp.Complete("1", prompt="b"), now=5.0)
    assert c.of_peer(A) == [ra]
    assert c.silent(now=10.0, timeout_s=7.0) == [ra]
    rb.stream.accept(TokenChunk(rb.rid, [70]), 9.0)
    ra.stream.accept(TokenChunk(ra.rid, [70]), 9.5)
    assert c.silent(now=10.0, timeout_s=7.0) == []
    assert c.status() == {
        "inflight": 2,
        "sessions": 0,
        "served": 0,
        "failed": 0,
        "owed_releases": 0,
    }
    assert c.finish(ra.rid, ra.stream.end("error", 11.0, "x"), 11.0) is ra
    assert c.finish(ra.rid, ra.stream.end("error", 11.0, "x"), 11.0) is None  # only once
    assert c.status()["failed"] == 1 and c.status()["inflight"] == 1


def test_placed_again_only_before_the_first_token_and_a_bounded_number_of_times() -> None:
    c = core()
    c.max_replacements = 1
    r = admitted(c, A, cp.Complete("1", token_ids=[5, 6]))
    handoff = wp.HandOff("d0", address="tcp://d0", mempool="tcp://m")
    c.placed(r, sp.Placement(r.rid, "p0", "tcp://p0", "pd-caching-3", "t", handoff=handoff))
    assert c.can_replace(r)
    first = r.rid
    old, live = c.unplace(r, "d0", now=5.0)
    assert old == first and [leg.instance_id for leg in live] == ["p0"]  # to be aborted
    assert (r.stream.legs, r.pd, r.avoid, r.stream.last_activity) == ([], False, ["d0"], 5.0)
    # A fresh id: the old placement's chunks, aborts and charge never touch the new one.
    assert r.rid == f"{first}.1" and c.requests == {r.rid: r} and c.lookup(A, "1") is r
    assert c.place_request(r).avoid == ["d0"]
    c.placed(r, sp.Placement(r.rid, "w1", "tcp://w1", "colocated", "t"))
    assert not c.can_replace(r)  # out of attempts
    c.max_replacements = 2
    assert c.unplace(r, "w1", now=6.0)[0] == f"{first}.1" and r.rid == f"{first}.2"

    s = admitted(c, A, cp.Complete("2", token_ids=[5, 6]))
    c.placed(s, sp.Placement(s.rid, "w1", "tcp://w1", "colocated", "t"))
    s.stream.accept(TokenChunk(s.rid, [7], instance_id="w1"), 1.0)
    assert not c.can_replace(s)  # a token is out: it cannot move


def test_releases_owed_are_bounded_and_wait_for_the_request_to_end() -> None:
    c = core()
    r = admitted(c, A, cp.Complete("1", token_ids=[5, 6]))
    c.owe_release("gone-1")
    c.owe_release(r.rid)
    assert c.take_owed() == ["gone-1"]  # r is still running: its own end releases it
    assert c.take_owed() == [] and list(c.owed) == [r.rid]
