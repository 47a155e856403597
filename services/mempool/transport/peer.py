"""A stand-in destination daemon in its own process, for transport tests and benchmarks.

`PeerProcess.start(...)` runs `python -m services.mempool.transport.peer` in a child process
that creates a `ShmRegion` (filled with `fill`, which also faults its pages in, as in a
long-running daemon), starts a transport Receiver over it, and obeys commands that arrive
over a `multiprocessing.connection` (AF_UNIX, authenticated). That control channel pickles;
it is test and benchmark plumbing only, the transports themselves never do.

    ("expect", transfer_id, runs)             -> ("ok", None)
    ("wait", transfer_id, timeout_s, crc)     -> ("ok", nbytes) | ("error", class name, text)
    ("wait_stamped", transfer_id, timeout_s, crc)
                                              -> ("ok", (nbytes, time.perf_counter() when
                                                  wait_complete returned)); perf_counter is
                                                  CLOCK_MONOTONIC, comparable across processes
    ("cancel", transfer_id)                   -> ("ok", None)
    ("crc", runs)                             -> ("ok", crc32 of those destination runs)
    ("close",)                                -> ("ok", None), then the process exits

The child is a separate process tree rather than a multiprocessing child, so it has its own
resource tracker: a multiprocessing child would share the parent's, and a same-host sender
attaching the child's segment would unregister the child's own registration there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from services.mempool.region import ShmRegion
from services.mempool.transport.base import Receiver, region_crc32
from services.mempool.transport.registry import make_transport

_REPO_ROOT = Path(__file__).resolve().parents[3]


def _receiver(transport: str, receiver_class: str | None, region: ShmRegion) -> Receiver:
    if receiver_class is None:
        receiver, _ = make_transport(transport, region)
        return receiver
    module_name, _, class_name = receiver_class.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    receiver = cls(region)
    if not isinstance(receiver, Receiver):
        raise TypeError(f"{receiver_class} is not a Receiver")
    return receiver


async def _serve(conn: Connection, args: argparse.Namespace) -> None:
    region = ShmRegion.create(args.block_bytes, args.max_blocks)
    try:
        region.array.fill(args.fill)
        receiver = _receiver(args.transport, args.receiver_class, region)
        endpoint = await receiver.start()
    except BaseException:
        region.close()
        raise
    conn.send(("ready", endpoint, region.name))
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    # Woken by the loop itself rather than by a thread blocked in recv(): a shorter command
    # round trip, and no thread that could outlive the loop.
    loop.add_reader(conn.fileno(), readable.set)
    try:
        while True:
            if not conn.poll():
                readable.clear()
                await readable.wait()
                continue
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break  # the parent went away
            op = message[0]
            reply: tuple[Any, ...] = ("ok", None)
            try:
                if op == "expect":
                    receiver.expect(message[1], [(int(a), int(b)) for a, b in message[2]])
                elif op == "wait":
                    reply = ("ok", await receiver.wait_complete(*message[1:4]))
                elif op == "wait_stamped":
                    nbytes = await receiver.wait_complete(*message[1:4])
                    reply = ("ok", (nbytes, time.perf_counter()))
                elif op == "cancel":
                    receiver.cancel(message[1])
                elif op == "crc":
                    reply = ("ok", await asyncio.to_thread(region_crc32, region, message[1]))
                elif op == "close":
                    conn.send(reply)
                    break
                else:
                    reply = ("error", "ValueError", f"unknown command {op!r}")
            except Exception as e:
                reply = ("error", type(e).__name__, str(e))
            conn.send(reply)
    finally:
        loop.remove_reader(conn.fileno())
        await receiver.close()
        region.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", required=True, help="AF_UNIX address of the parent")
    parser.add_argument("--transport", required=True)
    parser.add_argument("--block-bytes", type=int, required=True)
    parser.add_argument("--max-blocks", type=int, required=True)
    parser.add_argument("--fill", type=int, default=0)
    parser.add_argument("--receiver-class", help="module:Class of a custom Receiver")
    args = parser.parse_args(argv)
    authkey = bytes.fromhex(os.environ.pop("MEMSERVE_PEER_AUTHKEY"))
    with Client(args.control, family="AF_UNIX", authkey=authkey) as conn:
        asyncio.run(_serve(conn, args))


class PeerError(Exception):
    """The peer answered a command with an error; `kind` is the exception's class name."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(f"{kind}: {text}")
        self.kind = kind


class PeerProcess:
    """Parent-side handle of a peer process."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        conn: Connection,
        endpoint: dict[str, str],
        region_name: str,
    ) -> None:
        self.process = process
        self.conn = conn
        self.endpoint = endpoint
        self.region_name = region_name

    @classmethod
    def start(
        cls,
        transport: str,
        block_bytes: int,
        max_blocks: int,
        *,
        fill: int = 0,
        receiver_class: str | None = None,
        timeout_s: float = 60.0,
    ) -> PeerProcess:
        authkey = secrets.token_bytes(16)
        with Listener(family="AF_UNIX", authkey=authkey) as listener:
            command = [
                sys.executable,
                "-m",
                "services.mempool.transport.peer",
                f"--control={listener.address}",
                f"--transport={transport}",
                f"--block-bytes={block_bytes}",
                f"--max-blocks={max_blocks}",
                f"--fill={fill}",
            ]
            if receiver_class is not None:
                command.append(f"--receiver-class={receiver_class}")
            env = dict(os.environ, MEMSERVE_PEER_AUTHKEY=authkey.hex())
            env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(_REPO_ROOT), env.get("PYTHONPATH")) if p
            )
            process = subprocess.Popen(command, env=env, cwd=_REPO_ROOT)
            # accept() has no timeout: a watchdog connection unblocks it if the child dies.
            conn = _accept(listener, process, timeout_s)
        try:
            if not conn.poll(timeout_s):
                raise TimeoutError(f"{transport} peer did not start within {timeout_s:g}s")
            _, endpoint, region_name = conn.recv()
        except (EOFError, OSError, TimeoutError) as e:
            process.kill()
            code = process.wait(10)
            conn.close()
            raise RuntimeError(f"{transport} peer failed to start (exit code {code}): {e}") from e
        return cls(process, conn, endpoint, region_name)

    def call(self, *message: Any, timeout_s: float = 60.0) -> Any:
        self.submit(*message)
        return self.result(timeout_s)

    def submit(self, *message: Any) -> None:
        """Send a command without waiting; `result` collects the answer (in order)."""
        self.conn.send(message)

    def result(self, timeout_s: float = 60.0) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"peer did not answer within {timeout_s:g}s")
        reply = self.conn.recv()
        if reply[0] == "error":
            raise PeerError(reply[1], reply[2])
        return reply[1]

    async def acall(self, *message: Any, timeout_s: float = 60.0) -> Any:
        """`call` without blocking the caller's event loop (its sender may need it)."""
        return await asyncio.to_thread(self.call, *message, timeout_s=timeout_s)

    def kill(self) -> None:
        """SIGKILL; the child's resource tracker unlinks the orphaned segment."""
        self.process.kill()
        self.process.wait(10)
        self.conn.close()

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, EOFError, TimeoutError, PeerError):
                self.call("close", timeout_s=10.0)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.conn.close()


def _accept(listener: Listener, process: subprocess.Popen[bytes], timeout_s: float) -> Connection:
    """The child's control connection; fails fast if the child exits first."""
    accepted: list[Connection] = []
    done = threading.Event()

    def accept() -> None:
        # Listener.accept has no timeout; if the child never connects this daemon thread
        # stays blocked until the process exits, which costs nothing.
        with contextlib.suppress(OSError, EOFError):
            accepted.append(listener.accept())
        done.set()

    threading.Thread(target=accept, name="peer-accept", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(0.05):
        if process.poll() is not None:
            raise RuntimeError(f"peer process exited with code {process.returncode}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait(10)
            raise TimeoutError(f"peer process did not connect within {timeout_s:g}s")
    if not accepted:
        raise RuntimeError("peer process connection failed")
    return accepted[0]


if __name__ == "__main__":
    main()
