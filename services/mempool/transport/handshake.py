"""The data-plane handshake: both ends of a tcp/ucx/gloo connection prove they hold the
cluster key before a single region byte moves, in either direction.

Mutual challenge-response over ``k = common.security.data_plane_key()`` (an HMAC key
derived from the cluster secret; the secret itself never travels):

    S (sender, connects)                         R (receiver, listens)
    HELLO  = MAGIC | VERSION | channel | n_s  ─▶
                                              ◀─ CHALLENGE = n_r | HMAC(k, "recv" | ctx)
    verify R's MAC (constant time)
    PROOF  = HMAC(k, "send" | ctx)            ─▶ verify S's MAC (constant time)

    ctx = channel | n_s | n_r    (channel: "tcp", "ucx", "gloo", ...; nonces 32 random bytes)

Invariants:

* A sender writes nothing but HELLO and PROOF before R has proven the key: a listener that
  is not a member (e.g. a transfer endpoint an attacker named) receives HELLO, 48 bytes
  of magic, version, channel and a random nonce, and no region data.
* A receiver reads nothing but HELLO and PROOF before S has proven the key, and its
  transport writes no byte of a frame into a region before `Responder.verify` returned.
* Both nonces enter both MACs, so neither side's proof can be replayed into another
  session (each side picks a fresh nonce); the labels differ per direction, so R's MAC can
  not be reflected back as S's proof; the channel is MAC'd, so a proof for one transport
  does not serve another.
* Messages have fixed sizes (`HELLO_SIZE`, `CHALLENGE_SIZE`, `PROOF_SIZE`); anything else
  is refused. Errors (`HandshakeError`) never carry key material or MACs.

This module is pure (no sockets, no clocks); transports send and receive the messages
under their own deadline (the receiver's is ``data_header_timeout_s``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

MAGIC = b"MSDP"
VERSION = 1
NONCE_SIZE = 32
MAC_SIZE = 32
CHANNEL_SIZE = 8  # the channel name, NUL-padded
HELLO_SIZE = len(MAGIC) + 4 + CHANNEL_SIZE + NONCE_SIZE  # 48
CHALLENGE_SIZE = NONCE_SIZE + MAC_SIZE  # 64
PROOF_SIZE = MAC_SIZE  # 32

_RECV_LABEL = b"memserve/data-plane/v1/receiver"
_SEND_LABEL = b"memserve/data-plane/v1/sender"
_SESSION_LABEL = b"memserve/data-plane/v1/session"


class HandshakeError(Exception):
    """The peer did not prove the cluster key (wrong key, wrong protocol, or a short or
    malformed message). `proven_wrong` is True when the peer answered with a wrong proof
    (it is not a member) rather than with a broken message."""

    def __init__(self, message: str, *, proven_wrong: bool = False) -> None:
        super().__init__(message)
        self.proven_wrong = proven_wrong


def _channel_bytes(channel: str) -> bytes:
    raw = channel.encode()
    if not 0 < len(raw) <= CHANNEL_SIZE:
        raise ValueError(f"channel name {channel!r} must be 1..{CHANNEL_SIZE} bytes")
    return raw.ljust(CHANNEL_SIZE, b"\0")


def _channel_name(channel: bytes) -> str:
    return channel.rstrip(b"\0").decode()


def _mac(key: bytes, label: bytes, channel: bytes, n_s: bytes, n_r: bytes) -> bytes:
    # Fixed-size fields after a label: the concatenation is unambiguous.
    return hmac.new(key, label + b"\0" + channel + n_s + n_r, hashlib.sha256).digest()


def _check_key(key: bytes) -> bytes:
    if len(key) < 16:
        raise ValueError("data-plane key must be at least 16 bytes")
    return key


class Initiator:
    """The connecting side (the sender): `hello()`, then `proof(challenge)`."""

    def __init__(
        self, key: bytes, channel: str, *, random: Callable[[int], bytes] = os.urandom
    ) -> None:
        self._key = _check_key(key)
        self._channel = _channel_bytes(channel)
        self._nonce = random(NONCE_SIZE)
        self._session = b""

    def __repr__(self) -> str:
        return f"Initiator(channel={_channel_name(self._channel)!r})"

    def hello(self) -> bytes:
        return MAGIC + VERSION.to_bytes(4, "big") + self._channel + self._nonce

    def proof(self, challenge: bytes) -> bytes:
        """Verify the receiver's `challenge`; the PROOF to send back. Raises HandshakeError
        (``proven_wrong``) when the receiver does not hold the key."""
        if len(challenge) != CHALLENGE_SIZE:
            raise HandshakeError(
                f"handshake answer of {len(challenge)} bytes, expected {CHALLENGE_SIZE}"
            )
        n_r, mac = challenge[:NONCE_SIZE], challenge[NONCE_SIZE:]
        expected = _mac(self._key, _RECV_LABEL, self._channel, self._nonce, n_r)
        if not hmac.compare_digest(mac, expected):
            raise HandshakeError(
                "the peer's handshake proof is wrong: it does not hold the cluster key",
                proven_wrong=True,
            )
        self._session = _mac(self._key, _SESSION_LABEL, self._channel, self._nonce, n_r)
        return _mac(self._key, _SEND_LABEL, self._channel, self._nonce, n_r)

    def session_key(self) -> bytes:
        """A key of this session only (after `proof`): for `seal`ing later messages."""
        return self._session


class Responder:
    """The listening side (the receiver): `challenge(hello)`, then `verify(proof)`."""

    def __init__(
        self, key: bytes, channel: str, *, random: Callable[[int], bytes] = os.urandom
    ) -> None:
        self._key = _check_key(key)
        self._channel = _channel_bytes(channel)
        self._nonce = random(NONCE_SIZE)
        self._peer_nonce: bytes | None = None
        self._session = b""

    def __repr__(self) -> str:
        return f"Responder(channel={_channel_name(self._channel)!r})"

    def challenge(self, hello: bytes) -> bytes:
        if len(hello) != HELLO_SIZE or not hello.startswith(MAGIC):
            raise HandshakeError("not a MemServe data-plane greeting")
        version = int.from_bytes(hello[len(MAGIC) : len(MAGIC) + 4], "big")
        if version != VERSION:
            raise HandshakeError(f"data-plane protocol version {version}, expected {VERSION}")
        offset = len(MAGIC) + 4
        if hello[offset : offset + CHANNEL_SIZE] != self._channel:
            raise HandshakeError("data-plane greeting for another transport")
        self._peer_nonce = bytes(hello[offset + CHANNEL_SIZE :])
        mac = _mac(self._key, _RECV_LABEL, self._channel, self._peer_nonce, self._nonce)
        return self._nonce + mac

    def verify(self, proof: bytes) -> None:
        """Raises HandshakeError unless `proof` shows the sender holds the key."""
        if self._peer_nonce is None:
            raise HandshakeError("handshake proof before a greeting")
        if len(proof) != PROOF_SIZE:
            raise HandshakeError(f"handshake proof of {len(proof)} bytes, expected {PROOF_SIZE}")
        expected = _mac(self._key, _SEND_LABEL, self._channel, self._peer_nonce, self._nonce)
        if not hmac.compare_digest(proof, expected):
            raise HandshakeError(
                "the peer's handshake proof is wrong: it does not hold the cluster key",
                proven_wrong=True,
            )
        self._session = _mac(
            self._key, _SESSION_LABEL, self._channel, self._peer_nonce, self._nonce
        )

    def session_key(self) -> bytes:
        """A key of this session only (after `verify`): for `seal`ing later messages."""
        return self._session


def seal(session_key: bytes, label: str, seq: int, data: bytes) -> bytes:
    """`data` followed by its MAC under `session_key`, bound to `label` and `seq` (so a
    sealed message cannot be replayed as another kind, or at another position)."""
    return data + _seal_mac(session_key, label, seq, data)


def unseal(session_key: bytes, label: str, seq: int, sealed: bytes) -> bytes:
    """The data of a `seal`ed message; HandshakeError when its MAC is wrong."""
    if not session_key:
        raise HandshakeError("no session: the handshake did not complete")
    data, mac = sealed[:-MAC_SIZE], sealed[-MAC_SIZE:]
    if len(sealed) < MAC_SIZE or not hmac.compare_digest(
        mac, _seal_mac(session_key, label, seq, data)
    ):
        raise HandshakeError(f"a {label} message not sealed by the session's peer")
    return data


def _seal_mac(session_key: bytes, label: str, seq: int, data: bytes) -> bytes:
    if not session_key:
        raise HandshakeError("no session: the handshake did not complete")
    head = label.encode() + b"\0" + seq.to_bytes(8, "big")
    return hmac.new(session_key, head + data, hashlib.sha256).digest()


def resolve_key(key: bytes | None) -> bytes:
    """`key`, or this process's data-plane key (SecurityError when it has none)."""
    if key is not None:
        return key
    from common.security import data_plane_key

    return data_plane_key()
