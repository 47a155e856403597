"""A stand-in destination daemon in its own process, for transport tests and benchmarks.

`PeerProcess.start(...)` runs `python -m bench.peer` in a child process that creates a
`ShmRegion` (filled with `fill`, which also faults its pages in, as in a long-running
daemon), starts a transport Receiver over it, and obeys commands that arrive over a
`multiprocessing.connection` (AF_UNIX, authenticated). Only `send_bytes`/`recv_bytes` are
used on it, with msgspec msgpack bodies: like the transports themselves, the control
channel never pickles (see common/codec.py). One reply per command, in order:

    Expect(transfer_id, runs)                -> Ok(None)
    Wait(transfer_id, timeout_s, crc)        -> Ok(nbytes) | Failed(class name, text)
    WaitStamped(transfer_id, timeout_s, crc) -> Ok((nbytes, time.perf_counter() when
                                                wait_complete returned)); perf_counter is
                                                CLOCK_MONOTONIC, comparable across processes
    Cancel(transfer_id)                      -> Ok(None)
    Crc(runs)                                -> Ok(crc32 of those destination runs)
    Close()                                  -> Ok(None), then the process exits

The parent names a command by its tag: `peer.call("wait", 1, 30.0, crc)`.

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

import msgspec

from services.mempool.region import ShmRegion
from services.mempool.transport.base import Receiver, region_crc32
from services.mempool.transport.registry import make_transport

_REPO_ROOT = Path(__file__).resolve().parents[1]

Runs = list[tuple[int, int]]  # (first destination block, block count)


# ------------------------------------------------------------------- the control channel
class Expect(msgspec.Struct, tag="expect", array_like=True, frozen=True):
    transfer_id: int
    runs: Runs


class Wait(msgspec.Struct, tag="wait", array_like=True, frozen=True):
    transfer_id: int
    timeout_s: float
    crc: int | None


class WaitStamped(msgspec.Struct, tag="wait_stamped", array_like=True, frozen=True):
    transfer_id: int
    timeout_s: float
    crc: int | None


class Cancel(msgspec.Struct, tag="cancel", array_like=True, frozen=True):
    transfer_id: int


class Crc(msgspec.Struct, tag="crc", array_like=True, frozen=True):
    runs: Runs


class Close(msgspec.Struct, tag="close", array_like=True, frozen=True):
    pass


Command = Expect | Wait | WaitStamped | Cancel | Crc | Close
COMMANDS: dict[str, type[Command]] = {
    "expect": Expect,
    "wait": Wait,
    "wait_stamped": WaitStamped,
    "cancel": Cancel,
    "crc": Crc,
    "close": Close,
}


class Ready(msgspec.Struct, array_like=True, frozen=True):
    """The child's first message: where its receiver listens and its region's name."""

    endpoint: dict[str, str]
    region_name: str


class Ok(msgspec.Struct, tag="ok", array_like=True, frozen=True):
    value: int | tuple[int, float] | None = None


class Failed(msgspec.Struct, tag="error", array_like=True, frozen=True):
    kind: str  # the exception's class name
    text: str


Reply = Ok | Failed

_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(Command)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_ready_decoder = msgspec.msgpack.Decoder(Ready)


# -------------------------------------------------------------------------- the child
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


async def _obey(command: Command, receiver: Receiver, region: ShmRegion) -> Reply:
    """Run one command; an exception becomes a `Failed` reply carrying its class name."""
    try:
        match command:
            case Expect(transfer_id, runs):
                receiver.expect(transfer_id, runs)
            case Wait(transfer_id, timeout_s, crc):
                return Ok(await receiver.wait_complete(transfer_id, timeout_s, crc))
            case WaitStamped(transfer_id, timeout_s, crc):
                nbytes = await receiver.wait_complete(transfer_id, timeout_s, crc)
                return Ok((nbytes, time.perf_counter()))
            case Cancel(transfer_id):
                receiver.cancel(transfer_id)
            case Crc(runs):
                return Ok(await asyncio.to_thread(region_crc32, region, runs))
    except Exception as e:
        return Failed(type(e).__name__, str(e))
    return Ok()


async def _serve(conn: Connection, args: argparse.Namespace) -> None:
    region = ShmRegion.create(args.block_bytes, args.max_blocks)
    try:
        region.array.fill(args.fill)
        receiver = _receiver(args.transport, args.receiver_class, region)
        endpoint = await receiver.start()
    except BaseException:
        region.close()
        raise
    conn.send_bytes(_encoder.encode(Ready(endpoint, region.name)))
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
                body = conn.recv_bytes()
            except (EOFError, OSError):
                break  # the parent went away
            try:
                command = _command_decoder.decode(body)
            except msgspec.DecodeError as e:
                conn.send_bytes(_encoder.encode(Failed("DecodeError", str(e))))
                continue
            if isinstance(command, Close):
                conn.send_bytes(_encoder.encode(Ok()))
                break
            conn.send_bytes(_encoder.encode(await _obey(command, receiver, region)))
    finally:
        loop.remove_reader(conn.fileno())
        await receiver.close()
        region.close()


def ensure_cluster_key() -> str:
    """This process's cluster key (the data-plane handshake needs one): the installed one,
    else the environment's (MEMSERVE_CLUSTER__KEY_FILE / __SECRET_KEY), else a fresh one
    for this bench run. Returns the secret (Z85) for a child's environment."""
    from common import security

    pair = security.installed_key()
    if pair is None:
        cfg = security.ClusterKeyConfig(
            key_file=os.environ.get("MEMSERVE_CLUSTER__KEY_FILE"),
            secret_key=os.environ.get("MEMSERVE_CLUSTER__SECRET_KEY"),
        )
        has_source = cfg.key_file or cfg.secret_key
        pair = security.load_key(cfg) if has_source else security.KeyPair.generate()
        security.install(pair)
    return pair.secret.decode()


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
    ensure_cluster_key()
    with Client(args.control, family="AF_UNIX", authkey=authkey) as conn:
        asyncio.run(_serve(conn, args))


# ------------------------------------------------------------------------- the parent
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
                "bench.peer",
                f"--control={listener.address}",
                f"--transport={transport}",
                f"--block-bytes={block_bytes}",
                f"--max-blocks={max_blocks}",
                f"--fill={fill}",
            ]
            if receiver_class is not None:
                command.append(f"--receiver-class={receiver_class}")
            env = dict(os.environ, MEMSERVE_PEER_AUTHKEY=authkey.hex())
            # The same cluster key as ours (the environment, never argv): the data plane
            # shakes hands with it.
            env["MEMSERVE_CLUSTER__SECRET_KEY"] = ensure_cluster_key()
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
            ready = _ready_decoder.decode(conn.recv_bytes())
        except (EOFError, OSError, TimeoutError, msgspec.DecodeError) as e:
            process.kill()
            code = process.wait(10)
            conn.close()
            raise RuntimeError(f"{transport} peer failed to start (exit code {code}): {e}") from e
        return cls(process, conn, ready.endpoint, ready.region_name)

    def call(self, op: str, *args: Any, timeout_s: float = 60.0) -> Any:
        """Send the command tagged `op` with `args` as its fields; return the reply's value."""
        self.submit(op, *args)
        return self.result(timeout_s)

    def submit(self, op: str, *args: Any) -> None:
        """Send a command without waiting; `result` collects the answer (in order)."""
        self.conn.send_bytes(_encoder.encode(COMMANDS[op](*args)))

    def result(self, timeout_s: float = 60.0) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"peer did not answer within {timeout_s:g}s")
        reply = _reply_decoder.decode(self.conn.recv_bytes())
        if isinstance(reply, Failed):
            raise PeerError(reply.kind, reply.text)
        return reply.value

    async def acall(self, op: str, *args: Any, timeout_s: float = 60.0) -> Any:
        """`call` without blocking the caller's event loop (its sender may need it)."""
        return await asyncio.to_thread(self.call, op, *args, timeout_s=timeout_s)

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
