"""The data-plane handshake (pure): both sides prove the key; wrong keys, short or replayed
messages are refused, and no error carries key material."""

from __future__ import annotations

import os

import pytest

from services.mempool.transport.handshake import (
    CHALLENGE_SIZE,
    HELLO_SIZE,
    PROOF_SIZE,
    HandshakeError,
    Initiator,
    Responder,
    seal,
    unseal,
)

KEY = os.urandom(32)
OTHER = os.urandom(32)


def shake(send_key: bytes, recv_key: bytes) -> None:
    initiator, responder = Initiator(send_key, "tcp"), Responder(recv_key, "tcp")
    challenge = responder.challenge(initiator.hello())
    responder.verify(initiator.proof(challenge))


def test_same_key_completes_with_fixed_sizes() -> None:
    initiator, responder = Initiator(KEY, "tcp"), Responder(KEY, "tcp")
    hello = initiator.hello()
    challenge = responder.challenge(hello)
    proof = initiator.proof(challenge)
    assert (len(hello), len(challenge), len(proof)) == (HELLO_SIZE, CHALLENGE_SIZE, PROOF_SIZE)
    responder.verify(proof)
    assert KEY.hex() not in repr(initiator) + repr(responder)


def test_sender_refuses_a_receiver_with_another_key() -> None:
    initiator = Initiator(KEY, "tcp")
    challenge = Responder(OTHER, "tcp").challenge(initiator.hello())
    with pytest.raises(HandshakeError, match="not hold the cluster key") as err:
        initiator.proof(challenge)
    assert err.value.proven_wrong
    assert KEY.hex() not in str(err.value) and challenge.hex() not in str(err.value)


def test_receiver_refuses_a_sender_with_another_key() -> None:
    # The sender cannot verify the receiver's proof either; a forged proof still fails.
    initiator, responder = Initiator(OTHER, "tcp"), Responder(KEY, "tcp")
    challenge = responder.challenge(initiator.hello())
    with pytest.raises(HandshakeError):
        initiator.proof(challenge)
    with pytest.raises(HandshakeError, match="not hold the cluster key"):
        responder.verify(os.urandom(PROOF_SIZE))


def test_truncated_and_foreign_messages_are_refused() -> None:
    initiator, responder = Initiator(KEY, "tcp"), Responder(KEY, "tcp")
    hello = initiator.hello()
    with pytest.raises(HandshakeError, match="greeting"):
        responder.challenge(hello[:-1])
    with pytest.raises(HandshakeError, match="greeting"):
        responder.challenge(b"GET / HTTP/1.1\r\n".ljust(HELLO_SIZE, b"x"))
    with pytest.raises(HandshakeError, match="proof before a greeting"):
        responder.verify(bytes(PROOF_SIZE))
    with pytest.raises(HandshakeError, match="another transport"):
        Responder(KEY, "ucx").challenge(hello)
    challenge = responder.challenge(hello)
    with pytest.raises(HandshakeError, match="expected"):
        initiator.proof(challenge[:-1])
    with pytest.raises(HandshakeError, match="expected"):
        responder.verify(initiator.proof(challenge)[:-1])


def test_a_recorded_transcript_does_not_replay() -> None:
    """An eavesdropper replays a member's HELLO and PROOF to a new receiver session: its
    fresh nonce makes the old proof worthless. Nor is the receiver's MAC a sender proof."""
    initiator, first = Initiator(KEY, "tcp"), Responder(KEY, "tcp")
    hello = initiator.hello()
    challenge = first.challenge(hello)
    proof = initiator.proof(challenge)
    first.verify(proof)
    second = Responder(KEY, "tcp")
    second.challenge(hello)
    with pytest.raises(HandshakeError):
        second.verify(proof)
    reflected = Responder(KEY, "tcp")
    their_challenge = reflected.challenge(hello)
    with pytest.raises(HandshakeError):
        reflected.verify(their_challenge[-PROOF_SIZE:])


def test_good_key_in_both_directions_and_bad_ones() -> None:
    shake(KEY, KEY)
    for send_key, recv_key in ((KEY, OTHER), (OTHER, KEY)):
        with pytest.raises(HandshakeError):
            shake(send_key, recv_key)


def test_sealed_messages_bind_session_label_and_position() -> None:
    initiator, responder = Initiator(KEY, "gloo"), Responder(KEY, "gloo")
    responder.verify(initiator.proof(responder.challenge(initiator.hello())))
    s_key, r_key = initiator.session_key(), responder.session_key()
    assert s_key == r_key and len(s_key) == 32
    sealed = seal(s_key, "manifest", 3, b"headers")
    assert unseal(r_key, "manifest", 3, sealed) == b"headers"
    for label, seq, message in (
        ("ack", 3, sealed),  # another kind
        ("manifest", 4, sealed),  # another position
        ("manifest", 3, b"x" + sealed[1:]),  # altered
        ("manifest", 3, sealed[:10]),  # truncated
    ):
        with pytest.raises(HandshakeError):
            unseal(r_key, label, seq, message)
    with pytest.raises(HandshakeError, match="no session"):
        unseal(Responder(KEY, "gloo").session_key(), "manifest", 3, sealed)
