"""The cluster key and CURVE locks (common/security.py).

Key files: made 0600 and never overwritten; refused when others may read them; the secret
never shows in a repr. Sockets: a cluster socket cannot be made without a key; every
socket pattern takes a message only from a peer holding the cluster key; a peer with no
CURVE, or with CURVE and a key of its own (it knows the server's public key, which is no
secret), fails the handshake and gets nothing through. The same message sent with the key
is the positive control of each case.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from common import security
from common.codec import encode
from common.sockets import (
    PubSocket,
    PullSocket,
    PushSocket,
    RouterSocket,
    RpcClient,
    RpcServer,
    SubSocket,
    get_context,
)

ANY = "tcp://127.0.0.1:0"


class Ping(msgspec.Struct, frozen=True):
    n: int


class Pong(msgspec.Struct, frozen=True):
    n: int


# --- key files ------------------------------------------------------------------------------


def test_a_key_file_is_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "k" / "cluster.key"
    pair = security.write_key_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert security.read_key_file(path) == pair
    assert pair.secret.decode() not in repr(pair)
    with pytest.raises(FileExistsError):
        security.write_key_file(path)  # never replaces a key peers may hold


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    security.write_key_file(path)
    path.chmod(0o644)
    with pytest.raises(security.SecurityError, match="chmod 600"):
        security.read_key_file(path)


def test_malformed_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("secret_key = not-a-key\n")
    path.chmod(0o600)
    with pytest.raises(security.SecurityError, match="not a CURVE secret key"):
        security.read_key_file(path)
    other = security.KeyPair.generate()
    path.write_text(f"public_key = {other.public.decode()}\n")
    with pytest.raises(security.SecurityError, match="no secret_key"):
        security.read_key_file(path)
    mine = security.KeyPair.generate()
    path.write_text(f"public_key = {other.public.decode()}\nsecret_key = {mine.secret.decode()}\n")
    with pytest.raises(security.SecurityError, match="does not match"):
        security.read_key_file(path)


def test_the_environment_secret_wins_and_no_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    from_file = security.write_key_file(path)
    from_env = security.KeyPair.generate()
    cfg = security.ClusterKeyConfig(key_file=str(path), secret_key=from_env.secret.decode())
    assert security.load_key(cfg) == from_env
    assert security.load_key(security.ClusterKeyConfig(key_file=str(path))) == from_file
    with pytest.raises(security.SecurityError, match="no cluster key"):
        security.load_key(security.ClusterKeyConfig())


@pytest.fixture
def no_key() -> Iterator[None]:
    pair = security.installed_key()
    assert pair is not None  # tests/conftest.py installs one for the test process
    security.uninstall()
    try:
        yield
    finally:
        security.install(pair)


def test_a_cluster_socket_is_never_born_plain(no_key: None) -> None:
    with pytest.raises(security.SecurityError, match="no cluster key installed"):
        PullSocket(ANY, Ping, bind=True)
    # The public socket's plain mode stays available (a loopback gateway's clients).
    PullSocket(ANY, Ping, bind=True, security=security.PLAIN).close()


# --- every pattern refuses an outsider ------------------------------------------------------


def outsider(kind: int, address: str, how: str) -> zmq.asyncio.Socket:
    """A socket of a process without the cluster key: no CURVE at all, or CURVE with its
    own pair and the server's (public) key."""
    sock = get_context().socket(kind)
    sock.linger = 0
    if how == "own-key":
        pair = security.KeyPair.generate()
        sock.curve_serverkey = security.cluster_key().public
        sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    sock.connect(address)
    return sock


async def send_unless_refused(send: Awaitable[object]) -> None:
    """An outsider's send: once its handshake was refused a socket may have no peer left
    to queue for, and the send would wait forever; nothing is delivered either way."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(send, 1.0)


async def nothing_arrives(recv: asyncio.Future[object], wait_s: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(asyncio.shield(recv), wait_s)
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize("how", ["plain", "own-key"])
async def test_pull_takes_only_members(how: str) -> None:
    with PullSocket(ANY, Ping, bind=True) as pull:
        sock = outsider(zmq.PUSH, pull.address, how)
        try:
            await send_unless_refused(sock.send_multipart(encode(Ping(1))))
            recv = asyncio.ensure_future(pull.recv())
            assert await nothing_arrives(recv)
            with PushSocket(pull.address, Ping, bind=False) as member:
                await member.send(Ping(2))
                assert await asyncio.wait_for(recv, 5) == Ping(2)
        finally:
            sock.close()


@pytest.mark.parametrize("how", ["plain", "own-key"])
async def test_rpc_server_answers_only_members(how: str) -> None:
    async def double(p: Ping) -> Pong:
        return Pong(2 * p.n)

    with RpcServer(ANY, Ping, Pong) as server:
        serving = asyncio.create_task(server.serve(double))
        sock = outsider(zmq.DEALER, server.address, how)
        try:
            await send_unless_refused(sock.send_multipart([b"\x00" * 8, *encode(Ping(1))]))
            assert await nothing_arrives(asyncio.ensure_future(sock.recv_multipart()))
            client = RpcClient(server.address, Ping, Pong)
            try:
                assert await client.call(Ping(21), timeout_s=5) == Pong(42)
            finally:
                client.close()
        finally:
            sock.close()
            serving.cancel()


@pytest.mark.parametrize("how", ["plain", "own-key"])
async def test_pub_publishes_only_to_members(how: str) -> None:
    with PubSocket(ANY, Ping, bind=True) as pub, SubSocket(pub.address, Ping, bind=False) as sub:
        spy = outsider(zmq.SUB, pub.address, how)
        spy.subscribe(b"")
        try:
            got = asyncio.ensure_future(sub.recv())
            for n in range(40):  # until the member's subscription is through
                await pub.publish(b"t", Ping(n))
                if await asyncio.wait([got], timeout=0.05) and got.done():
                    break
            assert got.result()[0] == b"t"
            assert await nothing_arrives(asyncio.ensure_future(spy.recv_multipart()))
        finally:
            spy.close()


async def test_router_takes_only_members() -> None:
    with RouterSocket(ANY, Ping) as router:
        sock = outsider(zmq.DEALER, router.address, "own-key")
        try:
            await send_unless_refused(sock.send_multipart(encode(Ping(1))))
            recv = asyncio.ensure_future(router.recv())
            assert await nothing_arrives(recv)
        finally:
            sock.close()
            recv.cancel()


# --- the public (gateway) socket ------------------------------------------------------------


async def test_a_public_server_admits_listed_clients_only(tmp_path: Path) -> None:
    server_pair = security.KeyPair.generate()
    listed, unlisted = security.KeyPair.generate(), security.KeyPair.generate()
    lock = security.PublicServer(server_pair, frozenset({listed.public}), name="test-listed")
    with PullSocket(ANY, Ping, bind=True, security=lock) as pull:
        recv = asyncio.ensure_future(pull.recv())
        for pair, n in ((unlisted, 1), (None, 2)):
            client = security.PublicClient(server_pair.public, pair)
            with PushSocket(pull.address, Ping, bind=False, security=client) as push:
                await send_unless_refused(push.send(Ping(n)))
                assert await nothing_arrives(recv)
        ok = security.PublicClient(server_pair.public, listed)
        with PushSocket(pull.address, Ping, bind=False, security=ok) as push:
            await push.send(Ping(3))
            assert await asyncio.wait_for(recv, 5) == Ping(3)


async def test_a_public_server_without_a_list_admits_any_client_with_its_key() -> None:
    server_pair = security.KeyPair.generate()
    lock = security.PublicServer(server_pair, None, name="test-any")
    with PullSocket(ANY, Ping, bind=True, security=lock) as pull:
        recv = asyncio.ensure_future(pull.recv())
        with PushSocket(pull.address, Ping, bind=False, security=security.PLAIN) as plain:
            await send_unless_refused(plain.send(Ping(1)))  # no CURVE: refused
            assert await nothing_arrives(recv)
        client = security.PublicClient(server_pair.public)
        with PushSocket(pull.address, Ping, bind=False, security=client) as push:
            await push.send(Ping(2))
            assert await asyncio.wait_for(recv, 5) == Ping(2)


async def test_without_a_zap_handler_every_client_is_refused() -> None:
    """Fail closed: libzmq would admit any CURVE client when no ZAP handler answers."""
    pair = security.cluster_key()
    with PullSocket(ANY, Ping, bind=True) as pull:
        security.uninstall()  # the handler thread stops; the socket stays
        try:
            sock = get_context().socket(zmq.PUSH)
            sock.linger = 0
            sock.curve_serverkey = pair.public
            sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
            sock.connect(pull.address)
            await send_unless_refused(sock.send_multipart(encode(Ping(1))))
            assert await nothing_arrives(asyncio.ensure_future(pull.recv()))
            sock.close()
        finally:
            security.install(pair)


def test_a_process_holds_one_cluster_key() -> None:
    """Installing another key is refused: a silent swap would lock the process out of the
    peers it already talks to (a launcher started from a member keeps that member's key)."""
    held = security.cluster_key()
    security.install(held)  # the same again: nothing happens
    with pytest.raises(security.SecurityError, match="another cluster key"):
        security.install(security.KeyPair.generate())
    assert security.cluster_key() == held
