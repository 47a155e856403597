"""Helpers for driving `GatewayCore` directly (tests/gateway/test_core.py, test_follow.py)."""

from __future__ import annotations

from common.protocol import client as cp
from common.tokenizer import Tokenizer, build_byte_tokenizer
from services.gateway.core import GatewayCore, Request
from services.gateway.sessions import Sessions

TOK = Tokenizer(build_byte_tokenizer())
VOCAB = 259
BOS = 1
A, B = b"a", b"b"  # two clients' ROUTER identities


def core(max_inflight: int = 8, max_model_len: int = 64) -> GatewayCore:
    return GatewayCore(
        TOK,
        vocab_size=VOCAB,
        max_model_len=max_model_len,
        max_inflight=max_inflight,
        sessions=Sessions(ttl_s=100, max_sessions=4),
        id_prefix="gw-x",
        reply_to="tcp://10.0.0.1:7000",
    )


def admitted(c: GatewayCore, peer: bytes, req: cp.Complete, now: float = 0.0) -> Request:
    r = c.admit(peer, req, now)
    assert isinstance(r, Request), r
    return r
