"""A worker as a migration's destination and source, over its real control socket: blocks
reserved for an incoming request are held aside and freed on `Cancel`, on a refused
`Arrive` (blocks it never reserved, a deadline passed) or when the hold expires; a source
refuses to migrate a request it does not run. The daemon passes check_integrity after."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common.admin_client import admin_call
from common.protocol import migrate as mg
from common.protocol.elastic import RequestState
from common.sampling import SamplingParams
from common.sockets import RpcClient
from tests.daemons import SpawnDaemon, SpawnWorker, assert_idle_and_intact

TOKEN = "t0ken"


def state(rid: str, blocks: list[int], computed: int) -> RequestState:
    return RequestState(
        request_id=rid,
        prompt_token_ids=[1, *range(3, 3 + 40)],
        output_token_ids=[7, 8],
        params=SamplingParams(max_tokens=4, ignore_eos=True),
        reply_to="tcp://127.0.0.1:9",
        output_offset=2,
        block_ids=blocks,
        num_computed_tokens=computed,
    )


async def test_destination_holds_and_frees_reserved_blocks(
    spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker
) -> None:
    daemon = await spawn_daemon("mw-mempool")
    worker = await spawn_worker("mw", daemon.address, admin_token=TOKEN)
    control = worker.endpoints["control"]
    rpc: RpcClient[Any, Any] = RpcClient(control, mg.MigrateRequest, mg.MigrateReply)

    async def held() -> dict[str, Any]:
        reply = await admin_call(control, TOKEN, "status")
        return dict(reply.result["migration"])

    try:
        bad = await rpc.call(mg.Reserve("wrong", "x", 2))
        assert isinstance(bad, mg.MigrateRefused) and "token" in bad.error

        leased = (await daemon.client.stats()).client["device"]  # the worker's own, idle
        got = await rpc.call(mg.Reserve(TOKEN, "x", 3))
        assert isinstance(got, mg.Reserved) and len(got.block_ids) == 3
        more = await rpc.call(mg.Reserve(TOKEN, "x", 1))
        assert isinstance(more, mg.Reserved) and len(more.block_ids) == 1
        assert (await held())["held_blocks"] == 4
        # Blocks it never reserved: refused, and what it held for the request is freed.
        wrong = await rpc.call(mg.Arrive(TOKEN, state("x", [*got.block_ids[:2], 999], 40)))
        assert isinstance(wrong, mg.MigrateRefused) and "not reserved" in wrong.error
        assert (await held())["held_requests"] == 0

        got = await rpc.call(mg.Reserve(TOKEN, "y", 2))
        assert isinstance(got, mg.Reserved)
        late = await rpc.call(
            mg.Arrive(TOKEN, state("y", got.block_ids, 32), deadline=time.time() - 1)
        )
        assert isinstance(late, mg.MigrateRefused) and "deadline" in late.error
        got = await rpc.call(mg.Reserve(TOKEN, "z", 2))
        assert isinstance(got, mg.Reserved)
        cancelled = await rpc.call(mg.Cancel(TOKEN, "z"))
        assert cancelled == mg.Cancelled(2)
        assert await rpc.call(mg.Cancel(TOKEN, "z")) == mg.Cancelled(0)

        got = await rpc.call(mg.Reserve(TOKEN, "quiet", 2, hold_s=0.2))  # a source gone quiet
        assert isinstance(got, mg.Reserved)
        deadline = time.monotonic() + 10
        while (await held())["held_blocks"]:
            assert time.monotonic() < deadline, "the hold never expired"
            await asyncio.sleep(0.05)

        # As a source: it runs no such request.
        dst = mg.Destination("other", control, "tcp://127.0.0.1:9", daemon.address)
        nope = await rpc.call(mg.Migrate(TOKEN, "ghost", dst))
        assert isinstance(nope, mg.MigrateRefused) and "ghost" in nope.error
        assert (await daemon.client.stats()).client["device"] == leased  # every one freed
        await assert_idle_and_intact(daemon.client, "mw-mempool")
    finally:
        rpc.close()
