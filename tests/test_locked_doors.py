"""Locked doors on a running cluster (`memserve up`'s launcher, P/D mode): a local process
without the cluster key gets nothing through any socket, and the attacks that used to work
(issue 12) are refused with nothing changed.

- Every endpoint of every process (but the gateway's client socket, which faces clients)
  refuses a CURVE handshake from a peer with no CURVE or with a key of its own, and
  completes one with the cluster key: the positive control, on the same endpoint.
- A heartbeat from an outsider registers no instance (request hijack, admin token theft);
  the same heartbeat from a member does.
- An outsider's `ReleaseOwner` to a daemon frees nothing; the worker keeps serving and every
  daemon passes its integrity check.
- An outsider's `Generate` straight to a worker streams nothing; a member's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from common import security
from common.admin_client import admin_call
from common.client import GatewayClient
from common.codec import encode
from common.mempool_client import MempoolClient
from common.protocol import mempool as mp
from common.protocol import scheduler as sp
from common.protocol import worker as wp
from common.sampling import SamplingParams
from common.sockets import PullSocket, PushSocket, get_context
from services.launcher.config import load
from services.launcher.supervisor import Cluster
from tests.daemons import assert_idle_and_intact

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

TOKEN = "doors-token"
ONE = SamplingParams(max_tokens=4, ignore_eos=True)
PROMPT = [1, *range(30, 70)]

# What a peer must be to talk to each endpoint (the server socket's pattern). A process
# that grows an endpoint not named here fails the first test: name it, and it is checked.
PEER_OF = {
    "rpc": zmq.DEALER,
    "admin": zmq.DEALER,
    "control": zmq.DEALER,
    "heartbeats": zmq.PUSH,
    "requests": zmq.PUSH,
    "replies": zmq.PUSH,
    "events": zmq.SUB,
}
# Endpoints that name another process's socket, or face clients.
NOT_OWN = {("worker", "mempool"), ("gateway", "clients")}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    run = tmp_path_factory.mktemp("doors")
    settings = load(
        None,
        {
            "cluster": {"mode": "pd-basic", "run_dir": str(run), "admin_token": TOKEN},
            "scheduler": {"heartbeat_timeout_s": 1.5},
            "worker": {"heartbeat_interval_s": 0.25, "engine": {"num_threads": 1}},
            "mempool": {"device_blocks": 64, "tensor_memory_bytes": 1 << 20},
        },
    )
    async with Cluster(settings) as c:
        yield c


def outsider(kind: int, how: str) -> zmq.asyncio.Socket:
    """A socket as a local process would make it: no CURVE ("plain"), CURVE with a pair of
    its own and the cluster's public key, which is no secret ("own-key"), or a member's."""
    sock = get_context().socket(kind)
    sock.linger = 0
    if how == "own-key":
        pair = security.KeyPair.generate()
        sock.curve_serverkey = security.cluster_key().public
        sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    elif how == "member":
        security.CLUSTER.apply(sock, bind=False)
    return sock


async def handshake(address: str, kind: int, how: str, wait_s: float = 1.5) -> str:
    """'ok' once a ZMTP handshake with `address` completes; else the first failure event
    (or 'none' when nothing completed within `wait_s`)."""
    sock = outsider(kind, how)
    monitor = sock.get_monitor_socket()
    try:
        sock.connect(address)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            if not await monitor.poll(int(left * 1000)):
                break
            event = await recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return "ok"
            if event["event"] in (
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            ):
                return "refused"
        return "none"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


async def test_every_endpoint_admits_members_only(cluster: Cluster) -> None:
    checked = []
    for iid, child in cluster.children.items():
        for name, address in child.endpoints.items():
            if (child.spec.kind, name) in NOT_OWN or not address.startswith("tcp://"):
                continue
            assert name in PEER_OF, f"{iid} endpoint {name!r}: say what peer it takes"
            kind = PEER_OF[name]
            outcomes = {how: await handshake(address, kind, how) for how in ("plain", "own-key")}
            assert set(outcomes.values()) <= {"refused", "none"}, (iid, name, outcomes)
            assert await handshake(address, kind, "member") == "ok", (iid, name)
            checked.append(f"{iid}.{name}")
    kinds = {cluster.children[c.split(".")[0]].spec.kind for c in checked}
    assert kinds == {"scheduler", "mempool", "worker", "gateway"}, checked


async def instances(cluster: Cluster) -> set[str]:
    reply = await admin_call(cluster.admin_address, TOKEN, "instances")
    assert reply.ok, reply.error
    return {row["instance_id"] for row in reply.result}


def fake_heartbeat(iid: str, control: str) -> sp.Heartbeat:
    return sp.Heartbeat(
        iid,
        "decode",
        "tcp://127.0.0.1:1",
        "tcp://127.0.0.1:2",
        "tcp://127.0.0.1:3",
        control,
        16,
        1024,
        time.time(),
        healthy=False,  # the member's control registers, never takes placements
    )


async def test_an_outsider_heartbeat_registers_nothing(cluster: Cluster) -> None:
    address = cluster.endpoints("scheduler")["heartbeats"]
    for how in ("plain", "own-key"):
        sock = outsider(zmq.PUSH, how)
        sock.connect(address)
        beat = encode(fake_heartbeat(f"evil-{how}", "tcp://127.0.0.1:4"))
        for _ in range(5):
            # Never connected: the message has nowhere to go.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sock.send_multipart(beat), 0.2)
        sock.close(linger=0)
    await asyncio.sleep(1.0)
    registered = await instances(cluster)
    assert not any(i.startswith("evil") for i in registered), registered
    # Positive control: the same heartbeat from a member registers.
    with PushSocket(address, sp.Heartbeat, bind=False) as member:
        deadline = time.monotonic() + 10
        while "member-0" not in await instances(cluster):
            assert time.monotonic() < deadline
            await member.send(fake_heartbeat("member-0", "tcp://127.0.0.1:5"))
            await asyncio.sleep(0.2)


async def test_an_outsider_cannot_free_a_workers_blocks(cluster: Cluster) -> None:
    daemon = cluster.endpoints("decode-0-mempool")["rpc"]
    client = GatewayClient(cluster.gateway, timeout_s=30)
    members = MempoolClient(daemon)
    try:
        before = (await client.complete(PROMPT, ONE)).token_ids
        stats = await members.stats()
        for how in ("plain", "own-key"):
            sock = outsider(zmq.DEALER, how)
            sock.connect(daemon)
            await sock.send_multipart([b"\x00" * 8, *encode(mp.ReleaseOwner("decode-0"))])
            assert not await sock.poll(1000), f"{how}: the daemon answered an outsider"
            sock.close(linger=0)
        after = await members.stats()
        assert (after.free, after.capacity) == (stats.free, stats.capacity)  # nothing freed
        assert (await client.complete(PROMPT, ONE)).token_ids == before
    finally:
        client.close()
        members.close()
    for iid, child in cluster.children.items():
        if child.spec.kind == "mempool":
            check = MempoolClient(child.endpoints["rpc"])
            try:
                await assert_idle_and_intact(check, iid)
            finally:
                check.close()


async def test_an_outsider_generate_streams_nothing(cluster: Cluster) -> None:
    worker = cluster.endpoints("prefill-0")["requests"]
    with PullSocket("tcp://127.0.0.1:0", wp.TokenChunk, bind=True) as replies:
        for how in ("plain", "own-key"):
            sock = outsider(zmq.PUSH, how)
            sock.connect(worker)
            gen = wp.Generate(f"evil-{how}", PROMPT, ONE, replies.address, False)
            with contextlib.suppress(TimeoutError):  # never connected
                await asyncio.wait_for(sock.send_multipart(encode(gen)), 0.5)
            sock.close(linger=0)
        assert not await replies.poll(1.5)
        # Positive control: a member's Generate is served (a colocated-style request on
        # the prefill worker: no hand-off asked for).
        with PushSocket(worker, wp.Generate, bind=False) as member:
            await member.send(wp.Generate("member-gen", PROMPT, ONE, replies.address, False))
            chunk: Any = await asyncio.wait_for(replies.recv(), 30)
            assert chunk.request_id == "member-gen" and not chunk.error


def run_service(kind: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMSERVE_CLUSTER__")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", kind],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_service_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    done = await asyncio.to_thread(run_service, "mempool", {})
    assert done.returncode == 1 and "no cluster key" in done.stderr, done.stderr[-500:]
    loose = tmp_path / "cluster.key"
    security.write_key_file(loose)
    loose.chmod(0o644)
    done = await asyncio.to_thread(
        run_service, "mempool", {"MEMSERVE_CLUSTER__KEY_FILE": str(loose)}
    )
    assert done.returncode == 1 and "chmod 600" in done.stderr, done.stderr[-500:]


async def test_a_gateway_off_loopback_refuses_to_serve_clients_plain() -> None:
    done = await asyncio.to_thread(
        run_service,
        "gateway",
        {
            "MEMSERVE_CLUSTER__KEY_FILE": os.environ["MEMSERVE_CLUSTER__KEY_FILE"],
            "MEMSERVE_GATEWAY__ADDRESS": "tcp://0.0.0.0:0",
        },
    )
    assert done.returncode == 1 and "client_key_file" in done.stderr, done.stderr[-500:]
