"""`memserve bench fuzz`: malformed frames at every socket of a running cluster, as a member
would send them (past CURVE: the fuzzer holds the cluster key), then proof the cluster is
unharmed: every process alive, a request served with the reference tokens, every MemPool
daemon idle and intact.

    memserve bench fuzz --messages 5000          # a fresh P/D cluster, 5,000 per socket
    memserve bench fuzz --mode colocated --messages 300 --seed 7

Frames come from a seeded generator (`frames`): random bytes, truncated and bit-flipped
msgpack of real messages, unknown tags, wrong field types, huge integers, deep nesting,
long strings, empty and many-frame messages, and an RPC request id of the wrong size. The
ROUTER sockets (RPC, control, admin) get a request-id frame first so a malformed body is
answered; PULL sockets get the body alone; the gateway's client socket is fuzzed too
(as any client would). Results: messages sent per socket, replies received, and the
checks, printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from bench.report import write_json

# What a peer of each endpoint is (the endpoint's server pattern), and whether it answers.
PEERS = {
    "rpc": (zmq.DEALER, True),
    "admin": (zmq.DEALER, True),
    "control": (zmq.DEALER, True),
    "clients": (zmq.DEALER, True),
    "heartbeats": (zmq.PUSH, False),
    "requests": (zmq.PUSH, False),
    "replies": (zmq.PUSH, False),
}
SKIP = {"mempool", "events"}  # another process's socket; PUB sockets take no messages


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fuzz", help="malformed frames at every socket, then integrity checks")
    p.add_argument("--mode", default="pd-basic", help="cluster mode to start")
    p.add_argument("--messages", type=int, default=2000, help="malformed messages per socket")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench_fuzz.json")
    p.set_defaults(func=run)


def _samples() -> list[bytes]:
    """Well-formed bodies of real messages, for the generator to damage."""
    from common.protocol import client as cp
    from common.protocol import mempool as mp
    from common.protocol import scheduler as sp
    from common.protocol import worker as wp
    from common.protocol.admin import AdminRequest
    from common.sampling import SamplingParams

    params = SamplingParams(max_tokens=4)
    msgs: list[msgspec.Struct] = [
        cp.Complete("r1", prompt="hello"),
        sp.Place("r1", [1, 2, 3], 4),
        sp.Release("r1"),
        mp.Stats(),
        mp.ReleaseOwner("w"),
        mp.Evict(3),
        wp.Generate("r1", [1, 2, 3], params, "tcp://127.0.0.1:1", False),
        AdminRequest("token", "status", []),
    ]
    return [msgspec.msgpack.encode(m) for m in msgs]


def frames(rng: random.Random, samples: list[bytes]) -> Iterator[list[bytes]]:
    """An endless seeded stream of malformed message bodies (lists of frames)."""
    enc = msgspec.msgpack.encode
    while True:
        base = rng.choice(samples)
        pick = rng.randrange(11)
        if pick == 0:
            yield [rng.randbytes(rng.randrange(0, 256))]
        elif pick == 1:
            yield [base[: rng.randrange(len(base))]]  # truncated
        elif pick == 2:
            b = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            yield [bytes(b)]  # bit flips
        elif pick == 3:
            yield [enc({"type": rng.choice(["Nope", "", "Generate", "Place"]), "x": 1})]
        elif pick == 4:
            yield [enc({"type": "Place", "request_id": 5, "token_ids": "x", "max_tokens": []})]
        elif pick == 5:
            yield [b"\xcf" + rng.randbytes(8)]  # a bare huge integer
        elif pick == 6:
            yield [b"\x91" * 2000 + b"\xc0"]  # deeply nested arrays
        elif pick == 7:
            yield [enc({"type": "Complete", "request_id": "r" * rng.randrange(1, 4096)})]
        elif pick == 8:
            yield []  # no body at all
        elif pick == 9:
            yield [base] * rng.randrange(2, 40)  # too many frames
        else:
            yield [b""]


async def fuzz_endpoint(
    address: str, kind: int, answers: bool, bodies: Iterator[list[bytes]], n: int, member: bool
) -> dict[str, float]:
    """Send `n` malformed messages; count the replies (error replies are the right answer)."""
    from common import security
    from common.sockets import get_context

    sock: zmq.asyncio.Socket = get_context().socket(kind)
    sock.linger = 0
    (security.CLUSTER if member else security.PLAIN).apply(sock, bind=False)
    sock.connect(address)
    sent = replies = 0
    try:
        for i in range(n):
            body = next(bodies)
            msg = ([(i).to_bytes(8, "big") if i % 17 else b"bad-id"] if answers else []) + body
            if not msg:
                msg = [b""]
            try:
                await asyncio.wait_for(sock.send_multipart(msg), 2.0)
            except TimeoutError:
                break  # the peer is not reading: counted as what was sent
            sent += 1
            if answers:
                while await sock.poll(0):
                    await sock.recv_multipart()
                    replies += 1
        if answers:
            while await sock.poll(500):
                await sock.recv_multipart()
                replies += 1
    finally:
        sock.close(linger=0)
    return {"sent": sent, "replies": replies}


async def fuzz_cluster(cluster: Any, messages: int, seed: int) -> dict[str, Any]:
    """Fuzz every endpoint of `cluster` (a started launcher `Cluster`); return the figures."""
    rng = random.Random(seed)
    bodies = frames(rng, _samples())
    out: dict[str, Any] = {}
    for iid, child in cluster.children.items():
        for name, address in child.endpoints.items():
            if name in SKIP or not address.startswith("tcp://"):
                continue
            kind, answers = PEERS[name]
            member = not (child.spec.kind == "gateway" and name == "clients")
            t0 = time.perf_counter()
            figures = await fuzz_endpoint(address, kind, answers, bodies, messages, member)
            figures["seconds"] = round(time.perf_counter() - t0, 3)
            out[f"{iid}.{name}"] = figures
    return out


async def unharmed(cluster: Any, reference: list[int] | None) -> dict[str, Any]:
    """Every process alive, a request served (with `reference`'s tokens when given), every
    daemon intact."""
    from common.mempool_client import MempoolClient

    dead = [iid for iid, c in cluster.children.items() if not c.alive]
    tokens = await reference_tokens(cluster)
    intact: dict[str, str] = {}
    for iid, child in cluster.children.items():
        if child.spec.kind == "mempool":
            mc = MempoolClient(child.endpoints["rpc"])
            try:
                check = await mc.check_integrity()
                intact[iid] = "ok" if check.ok else check.message
            finally:
                mc.close()
    return {
        "dead": dead,
        "tokens": tokens,
        "same_tokens": reference is None or tokens == reference,
        "integrity": intact,
    }


PROMPT = [1, *range(40, 60)]


def settings(mode: str, run_dir: str) -> Any:
    """A small cluster of `mode`, not restarting what dies (a death must show)."""
    from services.launcher.config import load

    return load(
        None,
        {
            "cluster": {"mode": mode, "run_dir": run_dir, "restart": False},
            "worker": {"engine": {"num_threads": 1}},
            "mempool": {"device_blocks": 64, "tensor_memory_bytes": 1 << 20},
        },
    )


async def reference_tokens(cluster: Any) -> list[int]:
    """The greedy tokens of `PROMPT` on the cluster before any fuzzing."""
    from common.client import GatewayClient
    from common.sampling import SamplingParams

    client = GatewayClient(cluster.gateway, timeout_s=30)
    try:
        return (await client.complete(PROMPT, SamplingParams(max_tokens=8))).token_ids
    finally:
        client.close()


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from services.launcher.supervisor import Cluster

    async with Cluster(settings(args.mode, ".memserve/fuzz")) as cluster:
        reference = await reference_tokens(cluster)
        sockets = await fuzz_cluster(cluster, args.messages, args.seed)
        after = await unharmed(cluster, reference)
    return {"mode": args.mode, "messages": args.messages, "sockets": sockets, "after": after}


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(_run(args))
    for name, f in result["sockets"].items():
        print(f"{name:34} sent {f['sent']:6}  replies {f['replies']:6}  {f['seconds']:7.2f} s")
    after = result["after"]
    print(
        f"after: dead {after['dead'] or 'none'}; same tokens {after['same_tokens']}; "
        f"integrity {after['integrity']}"
    )
    write_json(Path(args.out), result)
    print(f"saved {args.out}")
    ok = not after["dead"] and after["same_tokens"] and set(after["integrity"].values()) == {"ok"}
    return 0 if ok else 1
