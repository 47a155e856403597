"""A daemon's refusals reach a `MempoolClient` with the kind callers match on
(`RpcError.kind`): unknown ids, bad arguments, out of memory, a move the transfer's state
does not allow, and a failed transfer's cause (peer timeout, data plane unreachable)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import pytest

from common.errors import ErrorKind
from common.protocol import mempool as mp
from common.sockets import RpcError, RpcServer
from tests.daemons import SpawnDaemon, assert_clean

pytestmark = pytest.mark.integration


async def kind_of(call: Any) -> ErrorKind:
    with pytest.raises(RpcError) as info:
        await call
    return info.value.kind


async def kind_and_message(call: Any) -> tuple[ErrorKind, str]:
    """The error's kind, and which of the expected phrases its message holds."""
    with pytest.raises(RpcError) as info:
        await call
    phrases = ("COMMITTING -> COMMITTING", "aborted while committing")
    return info.value.kind, next((p for p in phrases if p in str(info.value)), str(info.value))


async def test_refusals_carry_their_kind(spawn_daemon: SpawnDaemon) -> None:
    d = await spawn_daemon("a", device_blocks=8, transports=["tcp"])
    c = d.client
    ids = await c.alloc_mem(1)
    nowhere = "tcp://127.0.0.1:1"  # never reached: each call is refused before that
    from_index = mp.TransferWithInsert(nowhere, b"\x01\x00\x00\x00", ids, from_index=True)
    cases = [
        (c.release(77), ErrorKind.UNKNOWN_ID),
        (c.call(mp.CommitReceive(4242)), ErrorKind.UNKNOWN_ID),
        (c.get_tensor("missing"), ErrorKind.UNKNOWN_ID),
        (c.send_tensor(nowhere, "missing"), ErrorKind.UNKNOWN_ID),
        (c.alloc_mem(8), ErrorKind.OUT_OF_MEMORY),
        (c.call(mp.Insert(b"abc", [0])), ErrorKind.BAD_REQUEST),  # not whole int32 tokens
        (c.call(mp.AllocMem(1, tier=7)), ErrorKind.BAD_REQUEST),
        (c.call(mp.Transfer(nowhere, ids, [0], timeout_s=-1), 5), ErrorKind.BAD_REQUEST),
        (c.transfer(nowhere, [5], [0], timeout_s=1), ErrorKind.BAD_REQUEST),  # a free block
        (c.transfer(nowhere, ids, [0], transport="nope"), ErrorKind.BAD_REQUEST),
        (c.call(from_index), ErrorKind.BAD_REQUEST),  # from_index takes no src_ids
        (c.call(mp.PrepareReceive(1, transports=["nope"])), ErrorKind.REFUSED),
    ]
    kinds = [await kind_of(call) for call, _ in cases]
    assert kinds == [kind for _, kind in cases]
    await c.free_mem(ids)
    await assert_clean(d)


async def test_a_second_commit_and_an_abort_mid_commit_are_refused(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = await spawn_daemon("d", transports=["tcp"])
    c = d.client
    prep = await c.call(mp.PrepareReceive(2, transports=["tcp"], timeout_s=30))
    # No byte is sent: whichever commit arrives first waits; the other is refused at once.
    commits = [asyncio.create_task(c.call(mp.CommitReceive(prep.transfer_id), 40)) for _ in "ab"]
    done, waiting = await asyncio.wait(commits, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and len(waiting) == 1
    refused = await kind_and_message(done.pop())
    assert refused == (ErrorKind.REFUSED, "COMMITTING -> COMMITTING")
    await c.call(mp.AbortReceive(prep.transfer_id))  # the waiting commit fails, and frees
    assert await kind_and_message(waiting.pop()) == (ErrorKind.REFUSED, "aborted while committing")
    assert await kind_of(c.call(mp.CommitReceive(prep.transfer_id))) is ErrorKind.UNKNOWN_ID
    await assert_clean(d)


async def test_a_peer_that_does_not_answer_is_a_timeout(spawn_daemon: SpawnDaemon) -> None:
    a = await spawn_daemon("a", transports=["tcp"])
    src = await a.client.alloc_mem(2)
    assert await kind_of(a.client.transfer("tcp://127.0.0.1:9", src, [], timeout_s=1)) is (
        ErrorKind.TIMEOUT
    )
    await a.client.free_mem(src)
    assert (await a.client.stats()).transfers_failed == 1
    await assert_clean(a)


async def test_an_unreachable_data_plane_is_unavailable_and_the_peer_is_told_to_abort(
    spawn_daemon: SpawnDaemon,
) -> None:
    """A stand-in peer prepares the transfer but names a data endpoint nobody listens on."""
    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    peer = RpcServer("tcp://127.0.0.1:0", cast(Any, mp.MempoolRequest), cast(Any, mp.MempoolReply))
    seen: list[Any] = []

    async def answer(req: Any) -> Any:
        seen.append(req)
        if isinstance(req, mp.PrepareReceive):
            return mp.Prepared(
                transfer_id=5, dst_ids=[0, 1], transport="tcp", endpoint={"tcp": dead}
            )
        return mp.Ok()

    serving = asyncio.create_task(peer.serve(answer))
    try:
        a = await spawn_daemon("a", transports=["tcp"])
        src = await a.client.alloc_mem(2)
        kind = await kind_of(a.client.transfer(peer.address, src, [], timeout_s=20))
        assert kind is ErrorKind.UNAVAILABLE
        assert [type(r) for r in seen] == [mp.PrepareReceive, mp.AbortReceive]
        assert seen[1].transfer_id == 5
        await a.client.free_mem(src)
        await assert_clean(a)
    finally:
        peer.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
