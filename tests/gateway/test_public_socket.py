"""The gateway's client socket, the one socket facing non-members (services/gateway/
public.py): plain on loopback; CURVE with the gateway's own key elsewhere (a gateway with
no key refuses to start off loopback); with `allowed_client_keys`, listed clients only.
A client with the published server key is served; one without it, or unlisted, is not."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common import security
from common.client import GatewayClient, GatewayTimeout
from common.protocol.worker import TokenChunk
from common.sampling import SamplingParams
from services.gateway.config import GatewayConfig
from services.gateway.public import client_socket_security, is_loopback
from tests.gateway.harness import FakeScheduler, FakeWorker, ids, running_gateway

PARAMS = SamplingParams(max_tokens=8)


def test_the_lock_follows_the_address(tmp_path: Path) -> None:
    assert is_loopback("tcp://127.0.0.1:5800") and not is_loopback("tcp://0.0.0.0:5800")
    assert client_socket_security(GatewayConfig(address="tcp://127.0.0.1:0")) is security.PLAIN
    with pytest.raises(security.SecurityError, match="client_key_file"):
        client_socket_security(GatewayConfig(address="tcp://0.0.0.0:0"))
    off = GatewayConfig(address="tcp://0.0.0.0:0", client_curve="off")
    assert client_socket_security(off) is security.PLAIN
    key = tmp_path / "gw.key"
    pair = security.write_key_file(key)
    lock = client_socket_security(
        GatewayConfig(address="tcp://0.0.0.0:0", client_key_file=str(key))
    )
    assert isinstance(lock, security.PublicServer) and lock.pair == pair
    assert lock.allowed_clients is None
    with pytest.raises(ValueError, match="client_curve"):
        GatewayConfig(client_curve="maybe").validate()


async def answer(w: FakeWorker) -> None:
    gen = await w.recv()
    await w.send(gen.reply_to, TokenChunk(gen.request_id, ids("yes"), finished=True))


async def refused(client: GatewayClient) -> bool:
    """The request gets no answer at all: the handshake never completed."""
    try:
        await client.complete("hi", PARAMS)
    except GatewayTimeout:
        return True
    finally:
        client.close()
    return False


async def test_a_curve_gateway_serves_clients_with_its_key_only(
    tmp_path: Path, sched: FakeScheduler, worker: FakeWorker
) -> None:
    key = tmp_path / "gw.key"
    pair = security.write_key_file(key)
    async with running_gateway(sched, client_curve="on", client_key_file=str(key)) as (gw, _):
        address = gw.endpoints["clients"]
        plain = GatewayClient(address, timeout_s=1.0, heartbeat_s=None)
        assert await refused(plain)
        client = GatewayClient(address, timeout_s=10, server_key=pair.public.decode())
        try:
            done, _ = await asyncio.gather(client.complete("hi", PARAMS), answer(worker))
            assert done.text == "yes"
        finally:
            client.close()


async def test_a_gateway_with_a_client_list_serves_listed_clients_only(
    tmp_path: Path, sched: FakeScheduler, worker: FakeWorker
) -> None:
    key = tmp_path / "gw.key"
    pair = security.write_key_file(key)
    listed = security.KeyPair.generate()
    async with running_gateway(
        sched,
        client_curve="on",
        client_key_file=str(key),
        allowed_client_keys=[listed.public.decode()],
    ) as (gw, _):
        address, server = gw.endpoints["clients"], pair.public.decode()
        stranger = GatewayClient(address, timeout_s=1.0, heartbeat_s=None, server_key=server)
        assert await refused(stranger)
        client = GatewayClient(address, timeout_s=10, server_key=server, client_key=listed)
        try:
            done, _ = await asyncio.gather(client.complete("hi", PARAMS), answer(worker))
            assert done.text == "yes"
        finally:
            client.close()
