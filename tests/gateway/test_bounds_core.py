"""The pure parts of the gateway's bounds: fair session eviction, the checks that run
before tokenizing, the throttled warnings, and the config keys that set them."""

from __future__ import annotations

from typing import Any

import pytest

from common.errors import InvalidRequestError
from common.logging import Throttled
from common.protocol import client as cp
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer, build_byte_tokenizer
from services.gateway.config import GatewayConfig
from services.gateway.core import GatewayCore, Request
from services.gateway.sessions import Sessions

A, B = b"client-a", b"client-b"


class Calls:
    """A logger that records its warnings."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def test_throttled_warnings_burst_then_one_suppressed_line_per_interval() -> None:
    log, now = Calls(), [0.0]
    t = Throttled(log, burst=2, interval_s=10.0, clock=lambda: now[0])  # type: ignore[arg-type]
    written = [t.warning("bad", "bad message", n=i) for i in range(5)]
    assert written == [True, True, False, False, False]
    assert t.warning("other", "other kind")  # keys are throttled apart
    now[0] = 10.0
    assert t.warning("bad", "bad message", n=5)
    assert log.lines == [
        ("bad message", {"n": 0}),
        ("bad message", {"n": 1}),
        ("other kind", {}),
        ("suppressed similar warnings", {"key": "bad", "suppressed": 3}),
        ("bad message", {"n": 5}),
    ]


def test_a_client_at_its_cap_evicts_its_own_least_recently_used_idle_session() -> None:
    ss = Sessions(ttl_s=100, max_sessions=10, max_per_client=2)
    b = ss.open(0.0, B)
    a1, a2 = ss.open(1.0, A), ss.open(2.0, A)
    ss.begin_turn(a1, 3.0)  # a1 busy, and now the more recently used
    a3 = ss.open(4.0, A)
    assert set(ss.sessions) == {b, a1, a3} and ss.evicted == 1  # a2 went, never b
    assert a2 not in ss.sessions
    ss.begin_turn(a3, 5.0)
    with pytest.raises(InvalidRequestError, match="every one with a turn in progress"):
        ss.open(6.0, A)  # nothing of its own to evict: refused, b untouched
    assert b in ss.sessions and ss.by_owner == {B: {b: None}, A: {a1: None, a3: None}}
    ss.open(7.0, B)  # the other client is not locked out


def test_the_total_cap_evicts_the_least_recently_used_idle_session() -> None:
    ss = Sessions(ttl_s=100, max_sessions=2, max_per_client=2)
    a, b = ss.open(0.0, A), ss.open(1.0, B)
    ss.begin_turn(a, 2.0)
    ss.end_turn(a, [1], 3.0)
    c = ss.open(4.0, b"client-c")
    assert set(ss.sessions) == {a, c} and b not in ss.sessions and B not in ss.by_owner
    ss.begin_turn(a, 5.0)
    ss.begin_turn(c, 5.0)
    with pytest.raises(InvalidRequestError, match="too many sessions"):
        ss.open(6.0, B)  # every session is busy


def core(**kw: Any) -> GatewayCore:
    tok = Tokenizer(build_byte_tokenizer())
    return GatewayCore(
        tok,
        vocab_size=tok.vocab_size,
        max_model_len=64,
        max_inflight=8,
        sessions=Sessions(ttl_s=100, max_sessions=4),
        id_prefix="gw-x",
        reply_to="tcp://10.0.0.1:7000",
        **kw,
    )


def test_bounds_are_checked_before_the_prompt_is_tokenized() -> None:
    c = core(max_id_bytes=4, max_prompt_bytes=10, max_tokens_limit=100)
    calls: list[str] = []
    c.tokenizer.encode = lambda text, **_: calls.append(text) or [5]  # type: ignore[method-assign]
    refusals = {
        "longer than 4 bytes": cp.Complete("12345", prompt="x"),
        "session_id longer": cp.Complete("1", prompt="x", session_id="abcde"),
        "over 10 bytes": cp.Complete("1", prompt="é" * 6),
        "64 tokens": cp.Complete("1", token_ids=[5] * 64),
        "max_tokens too large: 101": cp.Complete(
            "1", prompt="x", params=SamplingParams(max_tokens=101)
        ),
    }
    for error, req in refusals.items():
        final = c.admit(A, req, 0.0)
        assert isinstance(final, cp.Final) and error in final.error
    assert calls == [] and c.failed == 5
    ok = c.admit(A, cp.Complete("1234", prompt="é" * 5, params=SamplingParams(max_tokens=100)), 0)
    assert isinstance(ok, Request) and calls == ["é" * 5]


def test_held_requests_count_towards_the_caps_and_can_be_cancelled() -> None:
    c = core(max_inflight_per_client=2)
    first = cp.Complete("1", prompt="x")
    assert c.check(A, first) is None
    c.hold(A, first)
    dup = c.check(A, first)
    assert dup is not None and "already in flight" in dup.error
    assert isinstance(c.admit(A, cp.Complete("2", token_ids=[5]), 0.0), Request)
    over = c.check(A, cp.Complete("3", token_ids=[5]))
    assert over is not None and "this client has 2 requests in flight" in over.error
    assert c.check(B, cp.Complete("3", token_ids=[5])) is None
    assert c.cancel_held(A, "1") and not c.cancel_held(A, "9")
    assert c.unhold(A, first) is True and c.inflight_of == {A: 1}


@pytest.mark.parametrize(
    "bad",
    [
        {"max_inflight_per_client": 0},
        {"max_sessions_per_client": 0},
        {"max_id_bytes": 0},
        {"max_prompt_bytes": -1},
        {"log_burst": 0},
        {"log_interval_s": 0},
    ],
)
def test_bad_bounds_are_named(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"gateway.{next(iter(bad))}"):
        GatewayConfig(**bad).validate()


def test_the_prompt_byte_bound_derives_from_the_context_unless_set() -> None:
    assert GatewayConfig().prompt_bytes_limit(4096) == 8 * 4096 + 1024
    assert GatewayConfig(max_prompt_bytes=500).prompt_bytes_limit(4096) == 500
