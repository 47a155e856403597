"""Throughput of the transports between two processes, next to the machine's own limits.

- `measure_throughput(transport, nbytes)`: a parent process sends one transfer of all blocks
  of an `nbytes` region to a peer process (`peer.py`) holding an `nbytes` region; timed from
  the start of `send` until the peer's `wait_complete` returned. The first transfer (which
  also connects or attaches) is a warm-up; the median of `repeats` more is reported. Both
  regions have their pages faulted in beforehand, as a running daemon's would.
- `measure_memcpy(nbytes)`: single-thread numpy copy between two faulted-in buffers.
- `measure_raw_socket(nbytes)`: one loopback TCP stream between two processes, `sendall` of
  the whole buffer against `recv_into` a preallocated buffer, default socket options, timed
  until the receiver's one-byte acknowledgement.

All return GiB/s. `python -m services.mempool.transport.bench --sizes 16M 512M` prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import time
import zlib
from multiprocessing.connection import Connection

import numpy as np

from services.mempool.region import ShmRegion
from services.mempool.transport.base import CopyRun
from services.mempool.transport.peer import PeerProcess
from services.mempool.transport.registry import available_transports, make_transport

GIB = float(1 << 30)
DEFAULT_BLOCK_BYTES = 2 << 20


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
    repeats: int = 3,
    timeout_s: float = 120.0,
) -> float:
    """GiB/s of one `transport` transfer of `nbytes` between two processes (median)."""
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
            start = time.perf_counter()
            await sender.send(peer.endpoint, transfer_id, src, runs, timeout_s=timeout_s)
            await peer.acall("wait", transfer_id, timeout_s, None)
            elapsed = time.perf_counter() - start
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


def measure_memcpy(nbytes: int, *, repeats: int = 5) -> float:
    """GiB/s of a single-thread numpy copy between two faulted-in buffers (median)."""
    a = np.full(nbytes, 1, dtype=np.uint8)
    b = np.zeros(nbytes, dtype=np.uint8)
    np.copyto(b, a)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / GIB


def _raw_receiver(conn: Connection, nbytes: int, rounds: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
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


def measure_raw_socket(nbytes: int, *, repeats: int = 3) -> float:
    """GiB/s of a raw loopback TCP stream between two processes (median)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_raw_receiver, args=(child, nbytes, repeats + 1), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise TimeoutError("raw socket receiver did not start")
        port = parent.recv()
        payload = np.full(nbytes, 3, dtype=np.uint8)
        times = []
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            for round_ in range(repeats + 1):
                start = time.perf_counter()
                sock.sendall(payload.data)
                if sock.recv(1) != b"k":
                    raise ConnectionError("raw socket receiver failed")
                if round_:
                    times.append(time.perf_counter() - start)
        return nbytes / statistics.median(times) / GIB
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    suffix = text[-1:].upper()
    return int(text[:-1]) * units[suffix] if suffix in units else int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="transport throughput vs machine limits")
    parser.add_argument("--sizes", nargs="+", default=["16M", "512M"])
    parser.add_argument("--transports", nargs="+", default=available_transports())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
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
