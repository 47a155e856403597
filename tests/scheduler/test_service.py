"""The scheduler service over real sockets: heartbeats on a PUSH socket register workers,
Place / Release over RPC, silence drops an instance and publishes InstanceDown, malformed
heartbeats are dropped while it keeps serving, the admin socket refuses a wrong token and
answers its commands, a real MemPool daemon's KV events keep the tree exact, many daemons'
events share one SUB socket and land in the right instances' trees (restarts followed to
a new address), and a real `memserve scheduler` process serves `memserve admin` until told
to shut down."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable

import pytest
import zmq

from common.protocol import kv_events as ev
from common.protocol import scheduler as sp
from common.protocol.admin import AdminReply, AdminRequest
from common.sockets import (
    PubSocket,
    PushSocket,
    RpcError,
    RpcServer,
)
from services.scheduler.global_tree import PromptHashes
from tests.daemons import Launcher, SpawnDaemon
from tests.raw import raw_socket
from tests.scheduler.harness import TOKEN, Harness, until
from tests.scheduler.helpers import BLOCK_SIZE, cli, heartbeat, prompt, stored

pytestmark = pytest.mark.integration


async def test_heartbeat_registers_and_place_returns_it(harness: Harness) -> None:
    await harness.register(heartbeat("w0"))
    assert await harness.next_event() == sp.InstanceUp("w0", "colocated")
    placed = await harness.rpc.call(sp.Place("r1", prompt(40), 8))
    assert isinstance(placed, sp.Placement)
    assert (placed.instance_id, placed.address, placed.cache) == (
        "w0",
        "tcp://127.0.0.1:9/w0",
        True,
    )
    assert await harness.rpc.call(sp.Release("r1", "prefill")) == sp.Released(True)
    assert await harness.rpc.call(sp.Release("r1")) == sp.Released(True)
    assert await harness.rpc.call(sp.Release("r1")) == sp.Released(False)


async def test_another_process_cannot_claim_a_live_instance_id(harness: Harness) -> None:
    """A second process heartbeating as live w0 ("restarted, unhealthy", or at its own
    addresses) is refused: no InstanceDown ends w0's requests, placements still go to the
    real w0, and it keeps refreshing."""
    real = heartbeat("w0", incarnation="real")
    await harness.register(real)
    assert await harness.next_event() == sp.InstanceUp("w0", "colocated")
    epoch = harness.svc.core.registry.get("w0").epoch  # type: ignore[union-attr]
    intruder = PushSocket(harness.svc.heartbeat_address, sp.Heartbeat, bind=False)
    try:
        await intruder.send(heartbeat("w0", started_at=7.0, incarnation="x", healthy=False))
        await intruder.send(heartbeat("w0", incarnation="x", address="tcp://127.0.0.1:1"))
        await intruder.send(heartbeat("w0", incarnation="real", address="tcp://127.0.0.1:1"))
        counters = harness.svc.core.counters
        await until(lambda: counters["refused_claims"] == 3, "claims refused")
    finally:
        intruder.close()
    await harness.beat(real)  # the real w0 still refreshes and serves
    placed = await harness.rpc.call(sp.Place("r1", prompt(40), 8))
    assert (placed.instance_id, placed.address) == ("w0", "tcp://127.0.0.1:9/w0")
    inst = harness.svc.core.registry.get("w0")
    assert inst is not None and inst.epoch == epoch and inst.healthy
    assert inst.address == "tcp://127.0.0.1:9/w0" and inst.incarnation == "real"
    # The next instance event is w1's: nothing was published for w0 meanwhile.
    await harness.register(heartbeat("w1"))
    assert await harness.next_event() == sp.InstanceUp("w1", "colocated")


async def test_silence_drops_the_instance_and_publishes_instance_down(harness: Harness) -> None:
    await harness.register(heartbeat("w0"))
    assert await harness.next_event() == sp.InstanceUp("w0", "colocated")
    harness.clock.now += 1.0  # five heartbeat timeouts of silence
    down = await harness.next_event()
    assert isinstance(down, sp.InstanceDown) and down.instance_id == "w0"
    assert "no heartbeat" in down.reason
    with pytest.raises(RpcError, match="no eligible colocated instance"):
        await harness.rpc.call(sp.Place("r1", prompt(10), 1))
    await harness.register(heartbeat("w0"))  # it comes back
    assert await harness.next_event() == sp.InstanceUp("w0", "colocated")
    assert (await harness.rpc.call(sp.Place("r2", prompt(10), 1))).instance_id == "w0"


async def test_malformed_heartbeats_are_dropped_and_serving_goes_on(harness: Harness) -> None:
    raw = raw_socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(harness.svc.heartbeat_address)
    try:
        await raw.send_multipart([b"\xc1not msgpack"])
        await harness.beat(heartbeat("w9", role="chef"))  # decodes, but no such role
        await harness.register(heartbeat("w0"))
    finally:
        raw.close()
    assert [i.instance_id for i in harness.svc.core.registry.instances()] == ["w0"]
    assert (await harness.rpc.call(sp.Place("r1", prompt(10), 1))).instance_id == "w0"


async def test_admin_refuses_a_wrong_token_and_answers_commands(harness: Harness) -> None:
    await harness.register(heartbeat("w0"))
    await harness.register(heartbeat("w1"))
    refused = await harness.call_admin("drain", "w0", token="guess")
    assert refused == AdminReply(False, error="bad admin token")
    assert await harness.call_admin("drain", "w0", token="") == refused
    assert harness.svc.core.registry.eligible("colocated")[0].instance_id == "w0"

    status = await harness.call_admin("status")
    assert status.ok and status.result["service"] == "scheduler"
    assert status.result["instances"] == {"colocated": {"up": 2, "drained": 0, "unhealthy": 0}}
    assert status.result["endpoints"]["rpc"] == harness.svc.address

    assert (await harness.call_admin("drain", "w0")).ok
    for i in range(3):
        placed = await harness.rpc.call(sp.Place(f"r{i}", prompt(10), 1))
        assert placed.instance_id == "w1"
    rows = (await harness.call_admin("instances")).result
    assert [(r["instance_id"], r["state"]) for r in rows] == [("w0", "drained"), ("w1", "up")]
    assert (await harness.call_admin("undrain", "w0")).ok

    assert (await harness.call_admin("policy", "least-load")).result["policy"] == "least-load"
    assert (await harness.call_admin("policy")).result == {"policy": "least-load"}
    unknown = await harness.call_admin("dance")
    assert not unknown.ok and "unknown command 'dance'" in unknown.error


async def test_shutdown_tells_workers_and_gateways_then_stops(harness: Harness) -> None:
    received: list[AdminRequest] = []

    async def worker_control(req: AdminRequest) -> AdminReply:
        received.append(req)
        return AdminReply(True, {"stopping": "w0"})

    control: RpcServer[AdminRequest, AdminReply] = RpcServer(
        "tcp://127.0.0.1:0", AdminRequest, AdminReply
    )
    serving = asyncio.create_task(control.serve(worker_control))
    try:
        await harness.register(heartbeat("w0", control=control.address))
        await harness.register(heartbeat("w1", control="tcp://127.0.0.1:1"))  # nobody there
        assert await harness.next_event() == sp.InstanceUp("w0", "colocated")
        assert await harness.next_event() == sp.InstanceUp("w1", "colocated")
        reply = await harness.call_admin("shutdown")
        assert reply.ok and reply.result["workers"]["w0"] == "stopping"
        assert "Timeout" in reply.result["workers"]["w1"]
        assert received == [AdminRequest(TOKEN, "shutdown")]
        assert await harness.next_event() == sp.ClusterShutdown()
        await asyncio.wait_for(harness.serving, 10)  # serve() returned: the process exits
    finally:
        serving.cancel()
        control.close()


async def test_kv_events_of_a_real_daemon_keep_the_tree_exact(
    harness: Harness, spawn_daemon: SpawnDaemon
) -> None:
    daemon = await spawn_daemon("m0", admin_token=TOKEN)
    client = daemon.client
    await harness.register(
        heartbeat("w0", events=daemon.endpoints["events"], mempool=daemon.address)
    )
    tree = harness.svc.core.trees["colocated"]

    def held(tokens: list[int]) -> int:
        return tree.match(PromptHashes(tokens), "w0")

    # Until the SUB socket is connected the daemon's events go nowhere: insert until one
    # arrives, then every later one does.
    for attempt in range(50):
        probe = prompt(16, seed=1000 + attempt)
        await client.insert(probe, await client.alloc_mem(1))
        try:
            await until(lambda p=probe: held(p) == 16, "probe", timeout_s=0.2)  # type: ignore[misc]
            break
        except AssertionError:
            continue
    else:
        raise AssertionError("no KV event ever arrived")

    doc = prompt(64, seed=1)
    await client.insert(doc, await client.alloc_mem(4))
    await until(lambda: held(doc) == 64, "doc stored")
    branch = doc[:32] + prompt(40, seed=2)  # shares 2 blocks, adds 2 more and a tail
    await client.insert(branch, await client.alloc_mem(5))
    await until(lambda: held(branch) == 64, "branch stored")
    assert held([*doc, 7, 7]) == 64 and held(doc[:40]) == 32
    assert held(prompt(64, seed=3)) == 0
    dropped = await client.delete(branch)
    assert dropped == 2
    await until(lambda: held(branch) == 32, "branch removed")
    assert held(doc) == 64

    # A hit at the daemon shows in cache-stats; flush-cache empties the daemon and the tree.
    m = await client.match(doc)
    await client.release(m.handle)
    stats = await harness.call_admin("cache-stats")
    assert stats.ok
    mine = stats.result["instances"]["w0"]
    assert mine["daemon"] == "m0" and mine["matched_tokens"] >= 64
    assert stats.result["cluster"]["hit_rate"] > 0
    flushed = await harness.call_admin("flush-cache")
    assert flushed.ok and flushed.result["instances"]["w0"]["device_blocks"] > 0
    await until(lambda: tree.num_blocks("w0") == 0, "tree emptied by the flush")
    assert (await client.stats()).index["device"] == 0

    # `memserve admin status` works against the daemon's own control socket.
    code, out, _ = await cli(["admin", "--address", daemon.address, "--token", TOKEN, "status"])
    assert code == 0 and json.loads(out)["service"] == "mempool"

    # Dropped for silence: the blocks the dead worker held at its daemon are freed.
    await client.alloc_mem(3, owner="w0")
    assert (await client.stats()).client["device"] == 3
    harness.clock.now += 1.0
    await until(lambda: harness.svc.core.registry.get("w0") is None, "w0 dropped")
    for _ in range(500):
        if (await client.stats()).client["device"] == 0:
            break
        await asyncio.sleep(0.01)
    assert (await client.stats()).client["device"] == 0
    assert "w0" not in harness.svc.members


async def test_scheduler_process_serves_admin_until_shutdown(launcher: Launcher) -> None:
    proc = await launcher.start("scheduler", "scheduler", {"admin_token": TOKEN})
    ep = proc.endpoints
    assert set(ep) == {"rpc", "heartbeats", "events", "admin", "metrics"}
    beats = PushSocket(ep["heartbeats"], sp.Heartbeat, bind=False)
    try:
        await beats.send(heartbeat("w0"))
        admin = ["admin", "--address", ep["admin"], "--token", TOKEN]
        for _ in range(500):
            code, out, _ = await cli([*admin, "instances"])
            if "w0" in out:
                break
            await asyncio.sleep(0.01)
        assert code == 0 and out.splitlines()[0].split()[:3] == ["INSTANCE", "ROLE", "STATE"]
        assert out.splitlines()[1].split()[:3] == ["w0", "colocated", "up"]
        code, out, _ = await cli([*admin, "status"])
        assert code == 0 and json.loads(out)["pid"] == proc.proc.pid
        code, _, err = await cli(["admin", "--address", ep["admin"], "--token", "nope", "status"])
        assert code == 1 and "bad admin token" in err
        code, out, _ = await cli([*admin, "shutdown"])
        assert code == 0 and json.loads(out)["stopping"] == "scheduler"
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    finally:
        beats.close()


class FakeDaemon:
    """A daemon's KV-event PUB socket and nothing else: numbered batches stamped with the
    address they are published on, as services/mempool publishes them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pub = PubSocket("tcp://127.0.0.1:0", ev.KvEventBatch, bind=True)
        self.seq = itertools.count()

    @property
    def address(self) -> str:
        return self.pub.address

    async def send(self, *events: ev.KvEvent) -> None:
        batch = ev.KvEventBatch(self.name, next(self.seq), BLOCK_SIZE, list(events), self.address)
        await self.pub.publish(self.name.encode(), batch)

    async def store(self, tokens: list[int], held: Callable[[], bool]) -> None:
        """Publish `tokens` stored until the scheduler has it (a new subscriber's first
        batches are lost by design: ZeroMQ's slow joiner)."""
        for _ in range(100):
            await self.send(stored(tokens))
            try:
                await until(held, f"{self.name} stored", timeout_s=0.1)
                return
            except AssertionError:
                continue
        raise AssertionError(f"no KV event of {self.name} ever arrived")


async def test_kv_events_of_many_daemons_share_one_socket_and_follow_restarts(
    harness: Harness,
) -> None:
    a, b, c = FakeDaemon("m-a"), FakeDaemon("m-b"), FakeDaemon("m-c")
    svc = harness.svc
    tree = svc.core.trees["colocated"]

    def held(tokens: list[int], iid: str) -> int:
        return tree.match(PromptHashes(tokens), iid)

    try:
        await harness.register(heartbeat("w1", events=a.address))
        await harness.register(heartbeat("w2", events=b.address))
        await harness.register(heartbeat("w3", events=b.address))  # shares w2's daemon
        doc_a, doc_b = prompt(64, seed=11), prompt(64, seed=12)
        await a.store(doc_a, lambda: held(doc_a, "w1") == 64)
        await b.store(doc_b, lambda: held(doc_b, "w2") == 64 and held(doc_b, "w3") == 64)
        assert held(doc_a, "w2") == held(doc_a, "w3") == 0 and held(doc_b, "w1") == 0
        # One socket, one connection per daemon.
        assert svc.kv.connections == 2
        status = await harness.call_admin("status")
        assert status.result["kv_connections"] == 2
        assert status.result["subscriptions"] == ["w1", "w2", "w3"]

        # A batch naming an address no instance registered is dropped: sent on a's
        # connection before a marker, it has been handled once the marker is in.
        stray, marker = prompt(64, seed=13), prompt(64, seed=14)
        bogus = ev.KvEventBatch("m-a", 0, BLOCK_SIZE, [stored(stray)], "tcp://127.0.0.1:1")
        await a.pub.publish(b"m-a", bogus)
        await a.send(stored(marker))
        await until(lambda: held(marker, "w1") == 64, "marker")
        assert all(held(stray, w) == 0 for w in ("w1", "w2", "w3"))
        assert held(doc_a, "w1") == 64  # the stray batch did not count as a gap in a's seq

        # w1 restarts on a new daemon (taking its id over once the old process is silent
        # past the timeout): its tree starts afresh and follows c, not a.
        harness.clock.now += 0.3
        await harness.beat(heartbeat("w2", events=b.address))
        await harness.beat(heartbeat("w3", events=b.address))
        await harness.beat(heartbeat("w1", started_at=2.0, events=c.address))
        await until(lambda: svc.members["w1"].events == c.address, "w1 restarted")
        assert held(doc_a, "w1") == 0 and svc.kv.connections == 2
        doc_c = prompt(64, seed=15)
        await c.store(doc_c, lambda: held(doc_c, "w1") == 64)
        late = prompt(64, seed=16)
        await a.send(stored(late))  # the old daemon: no longer followed
        after = prompt(64, seed=17)
        await c.send(stored(after))
        await until(lambda: held(after, "w1") == 64, "after")
        assert held(late, "w1") == 0

        # Silence drops every instance and every connection.
        harness.clock.now += 1.0
        await until(lambda: not svc.members, "all dropped")
        assert svc.kv.connections == 0
    finally:
        for daemon in (a, b, c):
            daemon.pub.close()
