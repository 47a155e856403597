"""The cluster key and how every socket is locked with it.

One secret, the cluster key, makes a process a cluster member. It is a CURVE secret key
(32 bytes, Z85 text); its public half is derived from it. Every member holds the same key
pair, so:

* ZeroMQ control sockets use CURVE (encrypted, authenticated). The side that binds is the
  CURVE server, the side that connects the client, both with the cluster pair. A ZAP
  handler in each process admits a client only when its public key is the cluster's: the
  CURVE handshake has proven the client holds the matching secret key. A peer without the
  key gets no message through, on any socket.
* The data plane (tcp, ucx, gloo transfers) proves the key with an HMAC handshake keyed by
  ``data_plane_key()``, a key derived from the cluster secret for that purpose only.

Invariants:

* A process installs its key once (``install``), before it makes any cluster socket; a
  cluster socket made without one raises ``SecurityError`` (sockets are born locked, never
  silently plain).
* The key comes from a key file (``cluster.key_file``, mode 0600 or stricter, refused
  otherwise) or the environment (``MEMSERVE_CLUSTER__SECRET_KEY``); never from code,
  argv or logs. ``KeyPair.__repr__`` hides the secret.
* The client-facing gateway socket is the one socket that may face non-members: it is plain
  on loopback by default and CURVE with its own server key otherwise (``PublicServer``),
  admitting any client or only listed client keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils import z85 as _z85

from common.errors import MemServeError
from common.logging import Throttled, get_logger

log = get_logger(__name__)

CLUSTER_DOMAIN = "memserve.cluster"
PUBLIC_DOMAIN = "memserve.public"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_KEY_FILE_HEADER = "# MemServe cluster key. Keep it secret: whoever holds it is a member.\n"


class SecurityError(MemServeError):
    """No usable key: missing, malformed, or readable by others."""


class ClusterKeyConfig(msgspec.Struct, omit_defaults=True):
    """The ``[cluster]`` table as every service reads it: where its key comes from.

    Other keys of the table (``memserve up``'s cluster shape) are not this struct's
    business and are ignored, so one ``[cluster]`` table and one set of
    ``MEMSERVE_CLUSTER__*`` variables serve the launcher and every service it starts.
    """

    key_file: str | None = None
    secret_key: str | None = None  # Z85; from the environment, never a file in git


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair in Z85 text (40 bytes each)."""

    public: bytes
    secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def from_secret(cls, secret: str | bytes) -> KeyPair:
        raw = secret.encode() if isinstance(secret, str) else secret
        raw = raw.strip()
        try:
            return cls(zmq.curve_public(raw), raw)
        except (ValueError, zmq.ZMQError):
            raise SecurityError("not a CURVE secret key (40 characters of Z85 text)") from None


def write_key_file(path: str | os.PathLike[str], pair: KeyPair | None = None) -> KeyPair:
    """Write a new key file readable by its owner only; refuses to overwrite one."""
    pair = pair or KeyPair.generate()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never replace a key peers still use; 0o600 from the first byte on disk.
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_KEY_FILE_HEADER)
        f.write(f"public_key = {pair.public.decode()}\n")
        f.write(f"secret_key = {pair.secret.decode()}\n")
    return pair


def read_key_file(path: str | os.PathLike[str]) -> KeyPair:
    """The pair in a key file; refused when group or others may read it."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text()
    except OSError as e:
        raise SecurityError(f"cannot read cluster key file {p}: {e.strerror or e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(
            f"cluster key file {p} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):o}); run: chmod 600 {p}"
        )
    values = dict(
        (k.strip(), v.strip())
        for k, sep, v in (line.partition("=") for line in text.splitlines())
        if sep and not k.lstrip().startswith("#")
    )
    if "secret_key" not in values:
        raise SecurityError(f"cluster key file {p} has no secret_key line")
    pair = KeyPair.from_secret(values["secret_key"])
    if "public_key" in values and values["public_key"].encode() != pair.public:
        raise SecurityError(f"cluster key file {p}: public_key does not match secret_key")
    return pair


def load_key(cfg: ClusterKeyConfig) -> KeyPair:
    """The key a config names: ``secret_key`` (environment) wins over ``key_file``."""
    if cfg.secret_key:
        return KeyPair.from_secret(cfg.secret_key)
    if cfg.key_file:
        return read_key_file(cfg.key_file)
    raise SecurityError(
        "no cluster key: set cluster.key_file (or MEMSERVE_CLUSTER__KEY_FILE) to a file "
        "made by `memserve keys`, or MEMSERVE_CLUSTER__SECRET_KEY"
    )


# --- the process's key and its ZAP handler -------------------------------------------------


@dataclass
class _Installed:
    pair: KeyPair
    pid: int
    handler: _ZapHandler


_installed: _Installed | None = None
_lock = threading.Lock()
# Public-socket policies by ZAP domain: domain -> client-key check.
_public_policies: dict[str, Callable[[bytes], bool]] = {}
_public_sockets = itertools.count()


def install(pair: KeyPair) -> None:
    """Make ``pair`` this process's cluster key and start its ZAP handler. Installing the
    same key again is a no-op; another one is refused (``SecurityError``): a process is a
    member of one cluster, and a silent swap would lock it out of the peers it has."""
    global _installed
    with _lock:
        if _installed is not None and _installed.pid == os.getpid():
            if _installed.pair != pair:
                raise SecurityError(
                    "this process already holds another cluster key (one cluster per process)"
                )
            return
        # The context every socket comes from (common.sockets.get_context): ZAP is per context.
        handler = _ZapHandler(zmq.asyncio.Context.instance())
        handler.start()
        _installed = _Installed(pair, os.getpid(), handler)


def uninstall() -> None:
    """Forget the key and stop the ZAP handler (tests)."""
    global _installed
    with _lock:
        if _installed is not None and _installed.pid == os.getpid():
            _installed.handler.stop()
        _installed = None


def _ensure_handler() -> None:
    """Keep the ZAP handler answering: a dead handler thread, or a process-wide context
    that was replaced, would leave every new server socket refusing all (fail closed)."""
    with _lock:
        inst = _installed
        if inst is None:
            return
        context = zmq.asyncio.Context.instance()
        if inst.handler.is_alive() and inst.handler.context is context:
            return
        log.error("ZAP handler gone; starting another", alive=inst.handler.is_alive())
        with contextlib.suppress(Exception):
            inst.handler.stop()
        inst.handler = _ZapHandler(context)
        inst.handler.start()


def installed_key() -> KeyPair | None:
    if _installed is None or _installed.pid != os.getpid():
        return None  # a forked child has no ZAP thread: it must install again
    return _installed.pair


def cluster_key() -> KeyPair:
    pair = installed_key()
    if pair is None:
        raise SecurityError(
            "this process has no cluster key installed: a cluster socket cannot be made "
            "(services load it from [cluster] key_file / MEMSERVE_CLUSTER__*)"
        )
    _ensure_handler()
    return pair


def data_plane_key() -> bytes:
    """The HMAC key of data-plane handshakes: derived from the cluster secret, so it proves
    membership without ever sending the CURVE secret itself."""
    return hmac.new(cluster_key().secret, b"memserve data plane v1", hashlib.sha256).digest()


# --- socket policies ------------------------------------------------------------------------


class SocketSecurity(ABC):
    """How a socket is locked; applied before it binds or connects."""

    @abstractmethod
    def apply(self, sock: zmq.Socket[Any], *, bind: bool) -> None: ...


@dataclass(frozen=True)
class Cluster(SocketSecurity):
    """Members only: CURVE with the cluster pair. The binding side is the server unless
    ``server`` says otherwise (a socket bound to a placeholder that only connects out,
    like the scheduler's KV-event feed, is a client)."""

    server: bool | None = None

    def apply(self, sock: zmq.Socket[Any], *, bind: bool) -> None:
        pair = cluster_key()
        sock.curve_publickey = pair.public
        sock.curve_secretkey = pair.secret
        if bind if self.server is None else self.server:
            sock.curve_server = True
            sock.zap_domain = CLUSTER_DOMAIN.encode()
            _fail_closed(sock)
        else:
            sock.curve_serverkey = pair.public


class Plain(SocketSecurity):
    """No CURVE: only for the client-facing gateway socket on loopback and its clients."""

    def apply(self, sock: zmq.Socket[Any], *, bind: bool) -> None:
        return


@dataclass(frozen=True)
class PublicServer(SocketSecurity):
    """A CURVE server with its own key pair for non-member clients (the gateway's client
    socket off loopback). ``allowed_clients``: Z85 public keys admitted; None admits any
    client (encryption, and the server proven to the client, without client identity)."""

    pair: KeyPair
    allowed_clients: frozenset[bytes] | None = None
    name: str = "gateway"

    def apply(self, sock: zmq.Socket[Any], *, bind: bool) -> None:
        if not bind:
            raise ValueError("PublicServer is for the binding side")
        if installed_key() is None:
            raise SecurityError("a public CURVE socket needs the process's ZAP handler")
        # One domain per socket: two public sockets of a process never share a policy.
        domain = f"{PUBLIC_DOMAIN}.{self.name}.{next(_public_sockets)}"
        allowed = self.allowed_clients
        _public_policies[domain] = (lambda key: True) if allowed is None else allowed.__contains__
        sock.curve_publickey = self.pair.public
        sock.curve_secretkey = self.pair.secret
        sock.curve_server = True
        sock.zap_domain = domain.encode()
        _fail_closed(sock)


@dataclass(frozen=True)
class PublicClient(SocketSecurity):
    """The client of a ``PublicServer``: knows the server's public key; its own pair is
    given (when the server lists client keys) or made up per socket."""

    server_key: bytes
    pair: KeyPair | None = None

    def apply(self, sock: zmq.Socket[Any], *, bind: bool) -> None:
        pair = self.pair or KeyPair.generate()
        sock.curve_serverkey = self.server_key
        sock.curve_publickey = pair.public
        sock.curve_secretkey = pair.secret


def _fail_closed(sock: zmq.Socket[Any]) -> None:
    # Without this libzmq admits every CURVE client when no ZAP handler answers (a handler
    # that died, a forked child): refuse instead.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


CLUSTER = Cluster()
CLUSTER_CLIENT = Cluster(server=False)
PLAIN = Plain()


def allowed_keys(keys: Collection[str]) -> frozenset[bytes]:
    """Z85 public keys from config text, checked."""
    out = set()
    for k in keys:
        raw = k.strip().encode()
        if len(raw) != 40:
            raise SecurityError(f"not a Z85 CURVE public key: {k[:8]}...")
        out.add(raw)
    return frozenset(out)


# --- ZAP ------------------------------------------------------------------------------------


class _ZapHandler(threading.Thread):
    """Answers ZeroMQ's authentication requests (ZAP 1.0, RFC 27) for every CURVE server
    socket of the process's context: cluster sockets admit the cluster key only; public
    sockets follow their ``PublicServer`` policy. Runs in a thread so a busy event loop
    never stalls a handshake."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        super().__init__(name="memserve-zap", daemon=True)
        self.context = context
        self._sock: zmq.Socket[bytes] = context.socket(zmq.REP, socket_class=zmq.Socket)
        self._sock.linger = 0
        self._sock.bind(_ZAP_ENDPOINT)  # before start(): bound by the time install returns
        self._stopper = context.socket(zmq.PAIR, socket_class=zmq.Socket)
        self._stop_addr = f"inproc://memserve-zap-stop-{id(self)}"
        self._stopper.bind(self._stop_addr)
        self._wake = context.socket(zmq.PAIR, socket_class=zmq.Socket)
        self._wake.connect(self._stop_addr)
        self._denied = Throttled(log, burst=5, interval_s=10.0)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._stopper, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._stopper in ready:
                    return
                if self._sock in ready:
                    frames = self._sock.recv_multipart()
                    try:
                        self._answer(frames)
                    except Exception:
                        # The thread must outlive any one request: a dead handler would
                        # stall every later handshake of the process.
                        log.exception("zap request failed")
                        self._sock.send_multipart([b"1.0", b"", b"500", b"error", b"", b""])
        finally:
            self._sock.close(linger=0)
            self._stopper.close(linger=0)

    def stop(self) -> None:
        self._wake.send(b"")
        self.join(timeout=5)
        self._wake.close(linger=0)

    def _answer(self, frames: list[bytes]) -> None:
        if len(frames) < 6:
            # Not a ZAP request (only libzmq talks on this endpoint); REP must still answer.
            self._sock.send_multipart([b"1.0", b"", b"500", b"malformed", b"", b""])
            return
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        ok = (
            mechanism == b"CURVE"
            and len(credentials) == 1
            and self._admits(domain.decode(errors="replace"), credentials[0])
        )
        if not ok:
            self._denied.warning(
                "zap-denied",
                "connection refused: not a cluster member",
                peer=address.decode(errors="replace"),
                domain=domain.decode(errors="replace"),
                mechanism=mechanism.decode(errors="replace"),
            )
        code, text = (b"200", b"OK") if ok else (b"400", b"not a member")
        self._sock.send_multipart([version, request_id, code, text, b"", b""])

    def _admits(self, domain: str, client_key: bytes) -> bool:
        z85 = _z85.encode(client_key)
        if domain == CLUSTER_DOMAIN:
            pair = installed_key()
            return pair is not None and hmac.compare_digest(z85, pair.public)
        policy = _public_policies.get(domain)
        return policy is not None and policy(z85)
