"""Throughput of the transports between two processes, next to the machine's own limits.

- `measure_throughput(transport, nbytes)`: a parent process sends one transfer of all blocks
  of an `nbytes` region to a peer process (`bench/peer.py`) holding an `nbytes` region; timed from
  the start of `send` until the later of `send` returning and the peer's `wait_complete`
  returning (the peer waits concurrently and stamps that moment with the host-wide monotonic
  clock, so the test plumbing's command latency is left out). The first transfer (which
  also connects or attaches) is a warm-up. Both regions have their pages faulted in
  beforehand, as a running daemon's would.
- `measure_memcpy(nbytes)`: single-thread numpy copy between two faulted-in buffers.
- `measure_raw_socket(nbytes)`: one loopback TCP stream between two processes, `sendall` of
  the whole buffer against `recv_into` a preallocated buffer, default socket options, timed
  until the receiver's one-byte acknowledgement.

Each figure is the median of `repeats` timed runs after a warm-up (`default_repeats`: more
for small sizes, whose runs take milliseconds and vary more).

All return GiB/s. `python -m bench.transport --sizes 16M 512M` prints a table;
`memserve bench mempool` reports the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from bench.peer import PeerProcess
from services.mempool.region import ShmRegion
from services.mempool.transport.base import CopyRun
from services.mempool.transport.registry import available_transports, make_transport

_REPO_ROOT = Path(__file__).resolve().parents[1]
GIB_BYTES = 1 << 30
GIB = float(GIB_BYTES)
DEFAULT_BLOCK_BYTES = 2 << 20


def default_repeats(nbytes: int) -> int:
    """Timed repetitions after the warm-up: about 1 GiB moved in all, 3 to 20 times."""
    return max(3, min(20, -(-GIB_BYTES // nbytes)))


def _geometry(nbytes: int, block_bytes: int) -> tuple[int, int]:
    block_bytes = min(block_bytes, nbytes)
    if nbytes <= 0 or nbytes % block_bytes:
        raise ValueError(f"{nbytes} bytes is not a positive multiple of {block_bytes}-byte blocks")
    return block_bytes, nbytes // block_bytes


def measure_throughput(
    transport: str,
    nbytes: int,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    repeats: int | None = None,
    timeout_s: float = 120.0,
) -> float:
    """GiB/s of one `transport` transfer of `nbytes` between two processes (median)."""
    repeats = repeats or default_repeats(nbytes)
    return asyncio.run(_measure_throughput(transport, nbytes, block_bytes, repeats, timeout_s))


async def _measure_throughput(
    transport: str, nbytes: int, block_bytes: int, repeats: int, timeout_s: float
) -> float:
    block_bytes, blocks = _geometry(nbytes, block_bytes)
    src = ShmRegion.create(block_bytes, blocks)
    peer = PeerProcess.start(transport, block_bytes, blocks)
    _, sender = make_transport(transport, src)
    try:
        # Distinct bytes per block, so a misplaced block fails the check below.
        src.array.reshape(blocks, block_bytes)[:] = (np.arange(blocks) % 251 + 1).astype(np.uint8)[
            :, None
        ]
        runs = [CopyRun(0, 0, blocks)]
        times = []
        for transfer_id in range(repeats + 1):
            await peer.acall("expect", transfer_id, [(0, blocks)])
            # The peer waits while the bytes move and stamps the moment wait_complete
            # returned, so the control channel's latency is not part of the figure.
            peer.submit("wait_stamped", transfer_id, timeout_s, None)
            start = time.perf_counter()
            await sender.send(peer.endpoint, transfer_id, src, runs, timeout_s=timeout_s)
            sent = time.perf_counter()
            _, completed = await asyncio.to_thread(peer.result, timeout_s)
            # shm: wait_complete returns at once (the commit is the completion), so the
            # copy ends when send returns; streams: the receiver's completion comes last.
            elapsed = max(sent, completed) - start
            if transfer_id:  # the first one connects/attaches: a warm-up
                times.append(elapsed)
        expected = zlib.crc32(src.blocks(0, blocks))
        if await peer.acall("crc", [(0, blocks)]) != expected:
            raise RuntimeError(f"{transport} transfer delivered wrong bytes")
        return nbytes / statistics.median(times) / GIB
    finally:
        await sender.close()
        peer.close()
        src.close()


def measure_memcpy(nbytes: int, *, repeats: int | None = None) -> float:
    """GiB/s of a single-thread numpy copy between two faulted-in buffers (median)."""
    repeats = repeats or default_repeats(nbytes)
    a = np.full(nbytes, 1, dtype=np.uint8)
    b = np.zeros(nbytes, dtype=np.uint8)
    np.copyto(b, a)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / GIB


def _raw_receive(nbytes: int, rounds: int) -> None:
    """Child side of `measure_raw_socket`: prints its port, then receives `rounds` times."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    buffer = bytearray(nbytes)  # zero-filled: its pages are faulted in
    view = memoryview(buffer)
    with listener, listener.accept()[0] as sock:
        for _ in range(rounds):
            got = 0
            while got < nbytes:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("sender closed early")
                got += n
            sock.sendall(b"k")


def measure_raw_socket(nbytes: int, *, repeats: int | None = None) -> float:
    """GiB/s of a raw loopback TCP stream between two processes (median)."""
    repeats = repeats or default_repeats(nbytes)
    # A plain subprocess rather than multiprocessing: callers need no __main__ guard.
    command = [sys.executable, "-m", "bench.transport"]
    command += ["--raw-receive", str(nbytes), str(repeats + 1)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=_REPO_ROOT, env=_child_env())
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # EOF (b"") if the child dies first
        if not line.strip().isdigit():
            raise RuntimeError(f"raw socket receiver failed to start: {line!r}")
        payload = np.full(nbytes, 3, dtype=np.uint8)
        times = []
        with socket.create_connection(("127.0.0.1", int(line)), timeout=120) as sock:
            for round_ in range(repeats + 1):
                start = time.perf_counter()
                sock.sendall(payload.data)
                if sock.recv(1) != b"k":
                    raise ConnectionError("raw socket receiver failed")
                if round_:
                    times.append(time.perf_counter() - start)
        return nbytes / statistics.median(times) / GIB
    finally:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    suffix = text[-1:].upper()
    return int(text[:-1]) * units[suffix] if suffix in units else int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="transport throughput vs machine limits")
    parser.add_argument("--sizes", nargs="+", default=["16M", "512M"])
    parser.add_argument("--transports", nargs="+", default=available_transports())
    parser.add_argument("--repeats", type=int, help="default: by size, see default_repeats")
    parser.add_argument("--raw-receive", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_receive:
        _raw_receive(*args.raw_receive)
        return
    for text in args.sizes:
        nbytes = _size(text)
        memcpy = measure_memcpy(nbytes)
        raw = measure_raw_socket(nbytes, repeats=args.repeats)
        print(f"{text:>6}  memcpy {memcpy:6.2f} GiB/s   raw tcp socket {raw:6.2f} GiB/s")
        for name in args.transports:
            rate = measure_throughput(name, nbytes, repeats=args.repeats)
            limit, label = (memcpy, "memcpy") if name == "shm" else (raw, "raw socket")
            print(f"{text:>6}  {name:<4} {rate:6.2f} GiB/s   {rate / limit:5.0%} of {label}")


if __name__ == "__main__":
    main()
