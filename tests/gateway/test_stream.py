"""The gateway's pure parts: chunks from two workers put in order, stop strings that end a
request (and ask for its legs to be aborted), timings, sessions."""

from __future__ import annotations

import pytest

from common.detokenizer import IncrementalDetokenizer
from common.errors import InvalidRequestError
from common.protocol.worker import TokenChunk
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer, build_byte_tokenizer
from services.gateway.sessions import Sessions
from services.gateway.stream import RequestStream

TOK = Tokenizer(build_byte_tokenizer())


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def stream(stop: list[str] | None = None) -> RequestStream:
    params = SamplingParams(max_tokens=20, stop=stop or [])
    prompt = TOK.encode("hi")
    return RequestStream(
        "r1", prompt, params, IncrementalDetokenizer(TOK, prompt, params.stop), 0.0
    )


def test_chunks_from_two_workers_are_put_in_order_and_deduplicated() -> None:
    s = stream()
    # The decode worker's chunks overtake the prefill worker's first token.
    later = s.accept(TokenChunk("x", ids("bc"), offset=1), 1.0)
    assert later.text == "" and later.final is None
    first = s.accept(TokenChunk("x", ids("a"), offset=0, num_cached_tokens=16), 2.0)
    assert first.text == "abc" and first.first_token
    again = s.accept(TokenChunk("x", ids("bc"), offset=1), 2.5)  # a repeat changes nothing
    assert again.text == "" and not again.token_ids
    end = s.accept(TokenChunk("x", ids("d"), finished=True, finish_reason="length", offset=3), 4.0)
    assert end.text == "d" and end.final is not None
    f = end.final
    assert (f.finish_reason, f.num_output_tokens, f.num_cached_tokens) == ("length", 4, 16)
    assert f.ttft_s == 2.0 and f.total_s == 4.0 and f.tpot_s == pytest.approx(2.0 / 3)


def test_a_final_chunk_waits_for_the_tokens_before_it() -> None:
    s = stream()
    last = TokenChunk("x", [], finished=True, finish_reason="length", offset=2)
    assert s.accept(last, 1.0).final is None
    assert s.accept(TokenChunk("x", ids("ab"), offset=0), 2.0).final is not None


def test_a_stop_string_across_chunks_ends_the_request_and_aborts_the_legs() -> None:
    s = stream(stop=["END"])
    out = s.accept(TokenChunk("x", ids("okE"), offset=0), 1.0)
    assert out.text == "o" and out.final is None  # "kE" held back: it may start the stop
    out = s.accept(TokenChunk("x", ids("NDmore"), offset=3), 2.0)
    assert out.final is not None and out.final.finish_reason == "stop"
    assert out.abort_legs and out.text == "k"


def test_an_error_chunk_ends_the_request_at_once() -> None:
    s = stream()
    boom = TokenChunk(
        "x", [], finished=True, finish_reason="error", error="worker w0: boom", offset=5
    )
    out = s.accept(boom, 1.0)
    assert out.final is not None and out.final.error == "worker w0: boom"


def test_sessions_keep_history_one_turn_at_a_time_and_expire() -> None:
    ss = Sessions(ttl_s=10, max_sessions=2)
    sid = ss.open(0.0)
    assert ss.begin_turn(sid, 1.0) == []
    with pytest.raises(InvalidRequestError, match="in progress"):
        ss.begin_turn(sid, 1.5)
    ss.end_turn(sid, [1, 2, 3], 2.0)
    assert ss.begin_turn(sid, 3.0) == [1, 2, 3]
    ss.end_turn(sid, None, 4.0)  # a failed turn leaves the history alone
    assert ss.begin_turn(sid, 5.0) == [1, 2, 3]
    ss.end_turn(sid, [1, 2, 3, 4], 5.0)
    with pytest.raises(InvalidRequestError, match="unknown session"):
        ss.begin_turn("nope", 5.0)
    ss.open(5.0)
    with pytest.raises(InvalidRequestError, match="too many"):
        ss.open(5.0)
    assert ss.expire(100.0) == 2 and not ss.sessions


def test_final_names_the_instances_that_served_it() -> None:
    from services.gateway.stream import Leg

    def pd_stream() -> RequestStream:
        s = stream()
        s.legs = [Leg("prefill-0", "tcp://p"), Leg("decode-0", "tcp://d")]
        return s

    both = pd_stream()
    both.accept(TokenChunk("x", ids("a"), offset=0, instance_id="prefill-0"), 1.0)
    end = both.accept(
        TokenChunk(
            "x", ids("b"), finished=True, finish_reason="length", offset=1, instance_id="decode-0"
        ),
        2.0,
    )
    assert end.final is not None and end.final.instances == ["prefill-0", "decode-0"]
    # One token (max_tokens 1, or eos): the prefill worker ends it; decode never ran.
    one = pd_stream()
    end = one.accept(
        TokenChunk("x", ids("a"), finished=True, finish_reason="length", instance_id="prefill-0"),
        1.0,
    )
    assert end.final is not None and end.final.instances == ["prefill-0"]
    # A failure names every instance the request was placed on.
    failed = pd_stream()
    failed.accept(TokenChunk("x", ids("a"), offset=0, instance_id="prefill-0"), 1.0)
    gone = failed.end("error", 2.0, "decode-0 is down")
    assert gone.instances == ["prefill-0", "decode-0"]
