"""A worker process serving token streams over ZeroMQ on its MemPool daemon's memory:
the tokens of the single-process reference, cache hits on the next turn, bad input
answered on the request's own stream, aborts that free every block, and a daemon that
passes its integrity check when idle."""

from __future__ import annotations

import asyncio
import signal

import pytest
import zmq
import zmq.asyncio

from common.admin_client import admin_call
from common.protocol import worker as wp
from common.sampling import SamplingParams
from services.worker.service import MAX_PEERS
from tests.daemons import SpawnDaemon, SpawnWorker
from tests.raw import raw_socket
from tests.worker.helpers import Gateway, MakeEngine, prompt, run_to_end, tokens

pytestmark = pytest.mark.integration


async def test_worker_serves_streams_with_the_reference_tokens(
    spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker, make_engine: MakeEngine
) -> None:
    daemon = await spawn_daemon("m0", device_blocks=128)
    worker = await spawn_worker("w0", daemon.address)
    gw = Gateway(worker.endpoints["requests"])
    reference = make_engine(num_kv_blocks=128)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    try:
        prompts = {f"r{i}": prompt(20 + 7 * i, i) for i in range(4)}
        for rid, p in prompts.items():
            await gw.generate(rid, p, params)
        got = await gw.collect(set(prompts))
        for rid, p in prompts.items():
            reference.add_request(rid, p, params)
            assert tokens(got[rid]) == run_to_end(reference)[rid], rid
            assert got[rid][-1].finish_reason == "length"
        # The next turn of r3 finds its history in the daemon's index.
        turn2 = prompts["r3"] + tokens(got["r3"]) + prompt(4, 9)
        await gw.generate("r3b", turn2, params)
        second = (await gw.collect({"r3b"}))["r3b"]
        assert second[-1].num_cached_tokens == (len(prompts["r3"]) + 10 - 1) // 16 * 16
        reference.add_request("r3b", turn2, params)
        assert tokens(second) == run_to_end(reference)["r3b"]
        # Bad input: an error on that request's stream, the worker keeps serving.
        await gw.generate("bad", [5, 6], SamplingParams(top_p=0.0))
        await gw.generate("empty", [], params)
        bad = await gw.collect({"bad", "empty"})
        assert "top_p" in (bad["bad"][-1].error or "") and "empty" in (bad["empty"][-1].error or "")
        sock = raw_socket(zmq.PUSH)
        sock.connect(worker.endpoints["requests"])
        await sock.send_multipart([b"\xc1 not msgpack"])
        sock.close(0)
        # Abort mid-stream frees the request's blocks.
        await gw.generate("long", prompt(30, 5), SamplingParams(max_tokens=3000, ignore_eos=True))
        first = await asyncio.wait_for(gw.replies.recv(), 30)
        assert first.request_id == "long" and not first.finished
        await gw.requests.send(wp.Abort("long"))
        rest = await gw.collect({"long"})
        assert rest["long"][-1].finish_reason == "abort" and len(tokens(rest["long"])) < 3000
    finally:
        gw.close()
    # Idle: every block is free or in the index; SIGTERM gives the worker's lease back.
    worker.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 20) == 0
    check = await daemon.client.check_integrity()
    assert check.ok, check.message
    st = await daemon.client.stats()
    assert st.client["device"] == 0 and st.pinned["device"] == 0, st


async def test_unreachable_reply_addresses_hold_a_bounded_number_of_sockets(
    spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker
) -> None:
    """Requests naming 100 reply addresses nobody listens on: the worker keeps at most
    MAX_PEERS sockets (each a file descriptor and a reconnecting connection), and a
    request with a live reply address is still served."""
    daemon = await spawn_daemon("m0", device_blocks=64)
    worker = await spawn_worker("w0", daemon.address, admin_token="t")
    gw = Gateway(worker.endpoints["requests"])
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    try:
        for i in range(100):
            await gw.requests.send(
                wp.Generate(f"lost{i}", prompt(8, i), one, f"tcp://127.0.0.1:{40000 + i}")
            )
        await gw.generate("live", prompt(8, 1), one)
        assert tokens((await gw.collect({"live"}))["live"])
        status = await admin_call(worker.endpoints["control"], "t", "status")
        assert status.ok and status.result["peers"] <= MAX_PEERS, status.result
    finally:
        gw.close()
