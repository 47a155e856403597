"""Collective transports: KV bytes over torch.distributed point-to-point, `nccl` between GPUs
and `gloo` between host regions (the same code; gloo is how it runs and is tested on CPU).

Each (sender daemon, receiver daemon) pair gets its own two-rank process group, built
without a global world (no init_process_group): the receiver hosts a TCPStore, and every
sender that connects takes a fresh pair number from it and rendezvouses a group under that
prefix (sender rank 0, receiver rank 1). The store also carries the control of each
transfer, so the group only ever moves payload:

    S: store[pair/m<seq>] = DATA headers (dst run, offset, nbytes per chunk) + FIN
    S: send chunk 0, chunk 1, ...           ══ group ══▶  D: recv each chunk into the region
                                                              (claimed) or scratch (discarded)
    S: wait store[pair/a<seq>]              ◀── store ──  D: ACK (status, bytes received)

Authentication (issue 12). Neither the TCPStore nor gloo's pair connections can be hooked,
so the handshake of `handshake.py` runs over the store, before the group forms:

    S: store[pair/hello] = HELLO            D: store[pair/challenge] = CHALLENGE
    S: verifies D's MAC, store[pair/proof] = PROOF      D: verifies S's MAC
    then both rendezvous the group; every manifest and ACK is sealed (HMAC) with the
    session key both derived from the handshake (bound to its kind and sequence number).

Covered: a sender rendezvouses a group, and so sends KV bytes, only with a receiver that
proved the cluster key (a store of a non-member, e.g. an endpoint an attacker named, gets
HELLO and nothing else: `PeerNotMember`, no retry). A receiver joins a group only with a
sender that proved the key, and posts receives into its region only for manifests sealed
by that sender. Not covered: the TCPStore server and gloo's own pair sockets stay
unauthenticated and unencrypted. Anyone who reaches the store can read its keys (nonces,
MACs, manifests: no key material, no KV bytes) and write keys (denial of service, e.g.
hellos that make the receiver wait out `connect_timeout_s` per fake pair); an active
attacker who rewrites the addresses gloo publishes in the store during a rendezvous could
sit in the middle of a pair's payload stream. Transfers that must withstand that use
``checksum=True`` (the receiver verifies the bytes) or tcp/ucx.

Why the store for control: a posted receive cannot be interrupted (gloo's abort does not
wake it, and a timed-out wait closes the pair), so the receiver posts receives only once a
manifest says chunks are coming; while idle it waits on the store with a short timeout and
can stop. The receiver judges every chunk with the shared `TransferTable` (tracking.py):
only chunks of an expected transfer, inside its blocks, reach the region.

Deadlines: the manifest carries the sender's time left; the receiver waits for each chunk
no longer than that (plus a margin), and a wait that times out closes the pair, so no byte
lands after the sender's deadline (+ margin). `cancel` cannot stop a receive in progress
(`cancel_fences_writes` is False): later chunks go to scratch, and the daemon keeps the
blocks of a cancelled transfer until its deadline plus grace, as for shm.

nccl specifics (guarded; needs a CUDA region and torch with NCCL): chunks are device views,
completion is polled (`is_completed`) because NCCL's wait only orders streams, and a group
whose wait timed out is aborted so that its kernels stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from common.logging import Throttled, get_logger
from services.mempool.region import Region
from services.mempool.transport.base import (
    CopyRun,
    PeerNotMember,
    Sender,
    TransferError,
    TransferRejected,
    TransferTimeout,
    check_runs,
    run_blocking,
)
from services.mempool.transport.frame import HEADER_SIZE, AckStatus, FrameError, Header, Kind
from services.mempool.transport.handshake import (
    HandshakeError,
    Initiator,
    Responder,
    resolve_key,
    seal,
    unseal,
)
from services.mempool.transport.tcp import parse_address
from services.mempool.transport.tracking import TrackedReceiver

log = get_logger("mempool.collective")
_throttled = Throttled(log)

CHUNK_BYTES = 64 << 20
# A discarded chunk is received into scratch of this size at most; a manifest announcing a
# larger chunk is refused (our senders never chunk beyond it).
MAX_CHUNK_BYTES = 256 << 20
# An idle receiver thread waits on the store in slices of this length (the store logs each
# timeout); `close` wakes it at once.
_IDLE_WAIT_S = 300.0
# A receiver waits for a chunk this much longer than the sender's announced time left.
_RECV_MARGIN_S = 1.0


class _Backend(ABC):
    """How one torch.distributed backend builds a pair group and waits for its work."""

    name: ClassVar[str]

    @abstractmethod
    def check(self, region: Region) -> None:
        """ValueError unless this backend moves `region`'s kind of memory."""

    @abstractmethod
    def group(self, store: Any, rank: int, timeout_s: float) -> Any:
        """This side's rank of a two-rank group, rendezvoused through `store`."""

    @abstractmethod
    def wait(self, work: Any, timeout_s: float) -> None:
        """Block until `work` is done; raises on timeout or a broken pair."""

    def scratch(self, region: Region, nbytes: int) -> Any:
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, device=region.tensor().device)

    def enter_thread(self, region: Region) -> None:
        """Per-thread setup before the first operation on `region`."""
        return None  # host memory needs none (nccl selects the region's GPU)


class _Gloo(_Backend):
    name = "gloo"

    def check(self, region: Region) -> None:
        if not region.on_host:
            raise ValueError(f"gloo moves host memory; a {region.kind} region uses nccl")

    def group(self, store: Any, rank: int, timeout_s: float) -> Any:
        import torch.distributed as dist

        return dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=timeout_s))

    def wait(self, work: Any, timeout_s: float) -> None:
        work.wait(datetime.timedelta(seconds=max(0.001, timeout_s)))


class _Nccl(_Backend):
    name = "nccl"

    def check(self, region: Region) -> None:
        if region.on_host:
            raise ValueError("nccl moves device memory; a host region uses gloo, tcp or ucx")

    def group(self, store: Any, rank: int, timeout_s: float) -> Any:
        import torch.distributed as dist

        options = dist.ProcessGroupNCCL.Options()
        options._timeout = datetime.timedelta(seconds=timeout_s)
        return dist.ProcessGroupNCCL(store, rank, 2, options)

    def wait(self, work: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pause = 1e-5
        while not work.is_completed():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"NCCL operation not done after {timeout_s:g}s")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def enter_thread(self, region: Region) -> None:
        import torch

        torch.cuda.set_device(region.tensor().device)


def _store(host: str, port: int, *, master: bool, timeout_s: float) -> Any:
    import torch.distributed as dist

    return dist.TCPStore(
        host,
        port,
        is_master=master,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _close_group(group: Any) -> None:
    for method in ("abort", "shutdown"):
        with contextlib.suppress(Exception):
            getattr(group, method)()
            return


class _Pair:
    """One sender's two-rank group, seen from either side."""

    def __init__(self, prefix: str, store: Any, group: Any, session: bytes) -> None:
        self.prefix = prefix
        self.store = store
        self.group = group
        self.session = session  # seals this pair's manifests and ACKs
        self.seq = 0
        self.broken = False

    def key(self, kind: str, seq: int) -> str:
        return f"{prefix_key(self.prefix)}/{kind}{seq}"


def prefix_key(prefix: str) -> str:
    return f"pair{prefix}"


def _pack_manifest(transfer_id: int, chunks: list[Header], time_left_s: float) -> bytes:
    total = sum(h.nbytes for h in chunks)
    # FIN's offset field carries the sender's time left, in milliseconds.
    fin = Header(Kind.FIN, transfer_id, offset=int(time_left_s * 1000), nbytes=total)
    return b"".join(h.pack() for h in [*chunks, fin])


def _unpack_manifest(data: bytes) -> tuple[list[Header], Header]:
    if not data or len(data) % HEADER_SIZE:
        raise FrameError(f"manifest of {len(data)} bytes is not whole headers")
    headers = [Header.unpack(data[i : i + HEADER_SIZE]) for i in range(0, len(data), HEADER_SIZE)]
    *chunks, fin = headers
    if fin.kind is not Kind.FIN or any(h.kind is not Kind.DATA for h in chunks):
        raise FrameError("a manifest is DATA headers followed by one FIN")
    if any(not 0 < h.nbytes <= MAX_CHUNK_BYTES for h in chunks):
        raise FrameError(f"a chunk outside (0, {MAX_CHUNK_BYTES}] bytes")
    if any(h.transfer_id != fin.transfer_id for h in chunks):
        raise FrameError("chunks of another transfer in a manifest")
    return chunks, fin


class CollectiveReceiver(TrackedReceiver):
    cancel_fences_writes = False
    backend: ClassVar[_Backend]

    def __init__(
        self,
        region: Region,
        *,
        port: int = 0,
        advertise_host: str = "127.0.0.1",
        connect_timeout_s: float = 10.0,
        key: bytes | None = None,
    ) -> None:
        self.backend.check(region)
        super().__init__(region)
        self._key = key
        self.failed_handshakes = 0
        self.port = port
        self.advertise_host = advertise_host
        self.connect_timeout_s = connect_timeout_s
        self._store: Any = None
        self._endpoint: dict[str, str] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pairs: list[_Pair] = []
        self._next_pair = 1

    async def start(self) -> dict[str, str]:
        if self._endpoint is not None:
            return self._endpoint
        self._key = resolve_key(self._key)  # no key, no listener (SecurityError)
        self._start_table()
        self._store = await asyncio.to_thread(
            _store, self.advertise_host, self.port, master=True, timeout_s=self.connect_timeout_s
        )
        self.port = int(self._store.port)
        self._spawn(self._accept, "accept")
        self._endpoint = {self.name: f"{self.advertise_host}:{self.port}"}
        return self._endpoint

    def cancel(self, transfer_id: int) -> None:
        # A receive in progress finishes into the region; later chunks go to scratch.
        self._require_table().cancel(transfer_id)

    async def close(self) -> None:
        self._stop.set()
        if self._table is not None:
            self._table.cancel_all()
        if self._store is not None:
            self._wake()
        # A thread inside a receive ends by its chunk's deadline; it is a daemon thread.
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 2.0)
        self._threads.clear()
        self._pairs.clear()
        self._store = None
        self._endpoint = None

    def _spawn(self, target: Any, what: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=f"{self.name}-{what}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _client(self) -> Any:
        """A store connection of this thread's own: calls on one connection serialize, and
        a thread waits on the store for minutes."""
        return _store(
            self.advertise_host, self.port, master=False, timeout_s=self.connect_timeout_s
        )

    def _wait_key(self, store: Any, key: str) -> bool:
        """Block until `key` is in the store: True, or False once we are closing (`close`
        wakes the waiting threads by setting the keys they wait for)."""
        while not self._stop.is_set():
            try:
                store.wait([key], datetime.timedelta(seconds=_IDLE_WAIT_S))
            except Exception:  # the store's wait raises on its timeout: wait on
                continue
            return not self._stop.is_set()
        return False

    def _wake(self) -> None:
        """Set every key a receiver thread may be waiting for, so that it sees `_stop`."""
        with contextlib.suppress(Exception):
            self._store.set(f"{prefix_key(str(self._next_pair))}/hello", b"")
        for pair in self._pairs:
            with contextlib.suppress(Exception):
                self._store.set(pair.key("m", pair.seq), b"")

    def _accept(self) -> None:
        store = self._client()
        while self._wait_key(store, f"{prefix_key(str(self._next_pair))}/hello"):
            prefix = str(self._next_pair)
            self._next_pair += 1
            self._spawn(self._serve_pair, f"pair{prefix}", prefix)

    def _serve_pair(self, prefix: str) -> None:
        from torch.distributed import PrefixStore

        try:
            self.backend.enter_thread(self.region)
            store = self._client()
            session = self._authenticate(store, prefix)
            if session is None:
                return
            group = self.backend.group(
                PrefixStore(prefix_key(prefix), store), 1, self.connect_timeout_s
            )
        except Exception as e:
            log.warning("pair setup failed", transport=self.name, pair=prefix, error=str(e))
            return
        pair = _Pair(prefix, store, group, session)
        self._pairs.append(pair)
        try:
            while self._wait_key(store, pair.key("m", pair.seq)):
                sealed = store.get(pair.key("m", pair.seq))
                store.delete_key(pair.key("m", pair.seq))
                if self._stop.is_set():
                    break
                # Only the authenticated sender says where the group's bytes go.
                manifest = unseal(pair.session, "manifest", pair.seq, sealed)
                transfer_id, status, received = self._receive(pair, manifest)
                ack = Header(Kind.ACK, transfer_id, nbytes=received, status=status)
                store.set(pair.key("a", pair.seq), seal(pair.session, "ack", pair.seq, ack.pack()))
                pair.seq += 1
        except Exception as e:  # a broken pair (peer gone, timeout, bad manifest) ends here
            if not self._stop.is_set():
                log.warning("pair closed", transport=self.name, pair=prefix, error=str(e))
        finally:
            _close_group(group)

    def _authenticate(self, store: Any, prefix: str) -> bytes | None:
        """The responder's half of the handshake over the store, within
        `connect_timeout_s`: the pair's session key, or None (after a throttled warning)."""
        assert self._key is not None
        base = prefix_key(prefix)
        responder = Responder(self._key, self.name)
        try:
            store.set(f"{base}/challenge", responder.challenge(store.get(f"{base}/hello")))
            store.wait([f"{base}/proof"], datetime.timedelta(seconds=self.connect_timeout_s))
            responder.verify(store.get(f"{base}/proof"))
            return responder.session_key()
        except Exception as e:  # HandshakeError, or the store's wait timing out
            if not self._stop.is_set():
                self.failed_handshakes += 1
                _throttled.warning(
                    f"{self.name}-handshake",
                    "data-plane peer failed the handshake",
                    transport=self.name,
                    pair=prefix,
                    error=str(e) if isinstance(e, HandshakeError) else "no proof in time",
                )
            return None

    def _receive(self, pair: _Pair, manifest: bytes) -> tuple[int, AckStatus, int]:
        table = self._require_table()
        chunks, fin = _unpack_manifest(manifest)
        deadline = time.monotonic() + fin.offset / 1000 + _RECV_MARGIN_S
        tensor = self.region.tensor()
        scratch: Any = None
        for header in chunks:
            claim = table.claim(header, pair, view=False)
            if claim is None:
                if scratch is None or scratch.numel() < header.nbytes:
                    scratch = self.backend.scratch(self.region, header.nbytes)
                target = scratch[: header.nbytes]
            else:
                target = tensor[claim.start : claim.end]
            received = False
            try:
                work = pair.group.recv([target], 0, 0)
                self.backend.wait(work, deadline - time.monotonic())
                received = True
            finally:
                if claim is not None:
                    table.release(claim, received)
        return (fin.transfer_id, *table.fin_status(fin.transfer_id))


class CollectiveSender(Sender):
    backend: ClassVar[_Backend]

    def __init__(
        self,
        retries: int = 2,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        connect_timeout_s: float = 10.0,
        max_workers: int = 4,
        key: bytes | None = None,
    ) -> None:
        super().__init__(retries)
        self._key = key
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}]")
        self.chunk_bytes = chunk_bytes
        self.connect_timeout_s = connect_timeout_s
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix=f"{self.name}-send")
        self._pairs: dict[str, _Pair] = {}
        self._closed = False

    async def send(
        self,
        endpoint: Mapping[str, str],
        transfer_id: int,
        src: Region,
        runs: Sequence[CopyRun],
        *,
        timeout_s: float,
        checksum: bool = False,
    ) -> int | None:
        if self._closed:
            raise TransferError(f"the {self.name} sender is closed")
        address = endpoint.get(self.name)
        if address is None:
            raise ValueError(f"endpoint {dict(endpoint)} has no {self.name} address")
        self.backend.check(src)
        check_runs(src, [(run.src_block, run.num_blocks) for run in runs], "source")
        self._key = resolve_key(self._key)  # no key, no transfer (SecurityError)
        deadline = time.monotonic() + timeout_s
        async with self._peer_turn(address, transfer_id, timeout_s):
            return await self._send_locked(
                address, transfer_id, src, list(runs), deadline, checksum
            )

    async def close(self) -> None:
        self._closed = True
        for pair in self._pairs.values():
            _close_group(pair.group)
        self._pairs.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _send_locked(
        self,
        address: str,
        transfer_id: int,
        src: Region,
        runs: list[CopyRun],
        deadline: float,
        checksum: bool,
    ) -> int | None:
        attempts = self.retries + 1
        last_error: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(min(0.05 * 2**attempt, max(0.0, deadline - time.monotonic())))
            left = deadline - time.monotonic()
            if left <= 0:
                break
            abandon = threading.Event()
            try:
                crc = await run_blocking(
                    self._executor,
                    self._transfer,
                    address,
                    transfer_id,
                    src,
                    runs,
                    deadline,
                    checksum,
                    abandon,
                    timeout_s=left,
                    abandon=abandon,
                    what=f"{self.name} transfer {transfer_id} to {address}",
                )
                return crc if checksum else None
            except (TransferRejected, TransferTimeout):
                self._drop(address)
                raise
            except HandshakeError as e:
                self._drop(address)
                raise PeerNotMember(
                    f"data-plane peer {self.name}://{address} is not a cluster member: {e}"
                ) from None
            except TransferError as e:
                last_error = e
                self._drop(address)
            except Exception as e:  # torch.distributed raises RuntimeError for a broken pair
                last_error = e
                self._drop(address)
        if time.monotonic() >= deadline:
            raise TransferTimeout(
                f"{self.name} transfer {transfer_id} to {address} timed out (last error: {last_error})"
            )
        raise TransferError(
            f"{self.name} transfer {transfer_id} to {address} failed after {attempts} attempts: "
            f"{last_error}"
        ) from last_error

    def _drop(self, address: str) -> None:
        pair = self._pairs.pop(address, None)
        if pair is not None:
            _close_group(pair.group)

    def _connect(self, address: str, left_s: float) -> _Pair:
        """The pair group to `address` (runs in a sender thread; blocks for the rendezvous,
        at most `left_s`)."""
        pair = self._pairs.get(address)
        if pair is not None and not pair.broken:
            try:  # one store round trip: a receiver that restarted closed this connection
                pair.store.check([pair.key("m", pair.seq)])
                return pair
            except Exception:
                self._drop(address)
        from torch.distributed import PrefixStore

        host, port = parse_address(address)
        timeout_s = max(0.1, min(self.connect_timeout_s, left_s))
        # TCPStore retries a refused connection until its timeout; a plain connect fails
        # at once when nobody listens (a dead receiver), so a retry does not wait it out.
        socket.create_connection((host, port), timeout=timeout_s).close()
        store = _store(host, port, master=False, timeout_s=timeout_s)
        prefix = str(store.add("pairs", 1))
        session = self._handshake(store, prefix_key(prefix), timeout_s)
        group = self.backend.group(PrefixStore(prefix_key(prefix), store), 0, timeout_s)
        pair = self._pairs[address] = _Pair(prefix, store, group, session)
        return pair

    def _handshake(self, store: Any, base: str, timeout_s: float) -> bytes:
        """The initiator's half over the store: nothing but HELLO and PROOF is written
        before the receiver proved the key; returns the pair's session key."""
        assert self._key is not None
        initiator = Initiator(self._key, self.name)
        store.set(f"{base}/hello", initiator.hello())
        try:
            store.wait([f"{base}/challenge"], datetime.timedelta(seconds=timeout_s))
        except Exception:  # the store's wait raises on its timeout
            raise HandshakeError("no answer to the handshake in time") from None
        store.set(f"{base}/proof", initiator.proof(store.get(f"{base}/challenge")))
        return initiator.session_key()

    def _transfer(
        self,
        address: str,
        transfer_id: int,
        src: Region,
        runs: list[CopyRun],
        deadline: float,
        checksum: bool,
        abandon: threading.Event,
    ) -> int:
        self.backend.enter_thread(src)
        pair = self._connect(address, deadline - time.monotonic())
        try:
            return self._stream(pair, address, transfer_id, src, runs, deadline, checksum, abandon)
        except BaseException:
            pair.broken = True
            raise

    def _stream(
        self,
        pair: _Pair,
        address: str,
        transfer_id: int,
        src: Region,
        runs: list[CopyRun],
        deadline: float,
        checksum: bool,
        abandon: threading.Event,
    ) -> int:
        bb = src.block_bytes
        chunks: list[tuple[Header, int]] = []  # (header, source byte offset)
        for run in runs:
            size = run.num_blocks * bb
            for offset in range(0, size, self.chunk_bytes):
                nbytes = min(self.chunk_bytes, size - offset)
                header = Header(
                    Kind.DATA, transfer_id, run.dst_block, run.num_blocks, offset, nbytes
                )
                chunks.append((header, run.src_block * bb + offset))
        seq = pair.seq
        pair.seq += 1
        left = deadline - time.monotonic()
        manifest = _pack_manifest(transfer_id, [h for h, _ in chunks], left)
        pair.store.set(pair.key("m", seq), seal(pair.session, "manifest", seq, manifest))
        tensor = src.tensor()
        crc = 0
        total = 0
        for header, start in chunks:
            left = deadline - time.monotonic()
            if left <= 0 or abandon.is_set():
                raise TransferTimeout(
                    f"{self.name} transfer {transfer_id} to {address}: deadline passed"
                )
            payload = tensor[start : start + header.nbytes]
            self.backend.wait(pair.group.send([payload], 1, 0), left)
            if checksum:
                crc = zlib.crc32(_host_bytes(src, start, header.nbytes), crc)
            total += header.nbytes
        ack_key = pair.key("a", seq)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferTimeout(
                f"{self.name} transfer {transfer_id} to {address}: no ACK in time"
            )
        pair.store.wait([ack_key], datetime.timedelta(seconds=left))
        ack = Header.unpack(unseal(pair.session, "ack", seq, pair.store.get(ack_key)))
        pair.store.delete_key(ack_key)
        if ack.kind is not Kind.ACK or ack.transfer_id != transfer_id:
            raise FrameError(f"expected an ACK of transfer {transfer_id}, got {ack}")
        if ack.status != AckStatus.COMPLETE:
            raise TransferRejected(
                f"{self.name} transfer {transfer_id} to {address}: receiver reports "
                f"{AckStatus(ack.status).name} ({ack.nbytes} of {total} bytes)"
            )
        return crc


def _host_bytes(region: Region, start: int, nbytes: int) -> Any:
    """Bytes [start, start + nbytes) of `region`, readable on the host (copied from a GPU)."""
    if region.on_host:
        return region.buffer[start : start + nbytes]
    return region.tensor()[start : start + nbytes].cpu().numpy()


class GlooReceiver(CollectiveReceiver):
    name = "gloo"
    backend = _Gloo()


class GlooSender(CollectiveSender):
    name = "gloo"
    backend = _Gloo()


class NcclReceiver(CollectiveReceiver):
    name = "nccl"
    backend = _Nccl()


class NcclSender(CollectiveSender):
    name = "nccl"
    backend = _Nccl()
