"""Named tensors of a daemon (parameters, activations): put / get / delete / list here,
and send to a peer daemon through the tensor region's data plane.

    S: the tensor's pages may not be freed or reused while it is sent (`sending` count)
    S ──PrepareTensor──▶ D: reserve pages for it, name the transfer
    S ══ bytes (one run of pages) ══▶ D's tensor region
    S ──CommitReceive──▶ D: every byte in -> the pages become the tensor (replacing one of
                            the same name); given up -> the pages are released

Invariant (`check_integrity`): the store's free ranges, its tensors and the pages
reserved by transfers in flight tile the tensor region exactly.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from common.codec import DTYPE_BYTES
from common.errors import ErrorKind
from common.protocol import mempool as mp
from services.mempool.data_plane import DataPlane
from services.mempool.incoming import Incoming
from services.mempool.pool import MemPoolError
from services.mempool.send_leg import Leg, TransferHandler, TransferShared, send_leg
from services.mempool.tensor_store import PAGE_BYTES, TensorEntry, TensorStore, TensorStoreError
from services.mempool.transport import CopyRun


class IncomingTensor(Incoming):
    """A tensor arriving into pages reserved for it (named only by the commit)."""

    def __init__(
        self,
        transfer_id: int,
        plane: DataPlane,
        transport: str,
        timeout_s: float,
        *,
        store: TensorStore,
        entry: TensorEntry,
    ):
        super().__init__(transfer_id, plane, transport, timeout_s)
        self.store = store
        self.entry = entry

    @property
    def expects_bytes(self) -> bool:
        return True

    def check_commit(self, req: mp.CommitReceive) -> None:
        return None  # a tensor's commit carries nothing to check

    def finish(self, req: mp.CommitReceive, nbytes: int) -> mp.Committed:
        e = self.entry
        self.store.commit(e.name, e.dtype, e.shape, e.nbytes, e.first_page)
        return mp.Committed(nbytes=nbytes)

    def discard(self) -> None:
        self.store.release(self.entry.first_page, self.entry.nbytes)


class TensorTransfers(TransferHandler):
    def __init__(self, store: TensorStore, plane: DataPlane, shared: TransferShared):
        super().__init__(plane, shared)
        self.store = store
        self.sending: Counter[str] = Counter()  # names a SendTensor is reading

    # ------------------------------------------------------------------ local
    def put(self, req: mp.PutTensor) -> mp.Ok:
        self._check_not_sending(req.name)
        nbytes = tensor_nbytes(req.dtype, req.shape)
        data = np.asarray(req.data).reshape(-1).view(np.uint8)
        if data.size != nbytes:
            raise MemPoolError(
                f"tensor {req.name!r}: {data.size} bytes sent, {req.dtype}{req.shape} needs {nbytes}",
                kind=ErrorKind.BAD_REQUEST,
            )
        first = self._reserve(nbytes)
        self.plane.region.array[first * PAGE_BYTES : first * PAGE_BYTES + nbytes] = data
        self.store.commit(req.name, req.dtype, tuple(req.shape), nbytes, first)
        return mp.Ok(nbytes)

    def get(self, req: mp.GetTensor) -> mp.TensorData:
        e = self._tensor(req.name)
        data = self.plane.region.array[e.first_page * PAGE_BYTES :][: e.nbytes].copy()
        return mp.TensorData(name=e.name, dtype=e.dtype, shape=list(e.shape), data=data)

    def delete(self, req: mp.DeleteTensor) -> mp.Ok:
        self._tensor(req.name)
        self._check_not_sending(req.name)
        self.store.delete(req.name)
        return mp.Ok()

    def list(self, req: mp.ListTensors) -> mp.TensorList:
        infos = [
            mp.TensorInfo(name=e.name, dtype=e.dtype, shape=list(e.shape), nbytes=e.nbytes)
            for e in self.store.tensors.values()
        ]
        return mp.TensorList(tensors=infos, free_bytes=self.store.arena.free_pages * PAGE_BYTES)

    def check_integrity(self) -> None:
        reserved = [
            (r.entry.first_page, r.entry.num_pages)
            for r in self.incoming.pending.values()
            if isinstance(r, IncomingTensor)
        ]
        self.store.check(reserved)

    # ----------------------------------------------------------- sending side
    async def send(self, req: mp.SendTensor) -> mp.Transferred:
        e = self._tensor(req.name)
        leg = Leg(
            what=f"sending tensor {req.name!r} to {req.dst}",
            prepare=mp.PrepareTensor(
                name=req.dst_name or e.name,
                dtype=e.dtype,
                shape=list(e.shape),
                nbytes=e.nbytes,
                transports=self.plane.offer(req.transport),
                sender_host=self.host_id,
                timeout_s=req.timeout_s,
            ),
            runs=lambda prep: [CopyRun(e.first_page, prep.dst_ids[0], e.num_pages)],
            commit=lambda prep, crc: mp.CommitReceive(prep.transfer_id, checksum=crc),
            checksum=req.checksum,
            timeout_s=req.timeout_s,
        )
        peer = self.peers.get(req.dst)
        self.sending[e.name] += 1  # its pages must not be freed or reused meanwhile
        try:
            sent = await send_leg(leg, peer, self.plane, self.counters)
        finally:
            self.sending[e.name] -= 1
            if not self.sending[e.name]:
                del self.sending[e.name]
        return mp.Transferred(
            dst_ids=sent.prepared.dst_ids,
            nbytes=sent.committed.nbytes,
            seconds=sent.seconds,
            transport=sent.prepared.transport,
        )

    # --------------------------------------------------------- receiving side
    def prepare(self, req: mp.PrepareTensor) -> mp.Prepared:
        nbytes = tensor_nbytes(req.dtype, req.shape)
        if nbytes != req.nbytes:
            raise MemPoolError(
                f"tensor {req.name!r}: {req.nbytes} bytes announced, {req.dtype}{req.shape} is {nbytes}",
                kind=ErrorKind.BAD_REQUEST,
            )
        name = self.plane.choose(req.transports, req.sender_host)
        first = self._reserve(nbytes)
        tid = self.incoming.new_id()
        entry = TensorEntry(
            req.name, req.dtype, tuple(req.shape), nbytes, first, TensorStore.pages_for(nbytes)
        )
        rec = IncomingTensor(tid, self.plane, name, req.timeout_s, store=self.store, entry=entry)
        try:
            rec.receiver.expect(tid, [(first, entry.num_pages)])
        except Exception:
            rec.discard()
            raise
        self.incoming.add(rec, req.timeout_s)
        return mp.Prepared(
            transfer_id=tid, dst_ids=[first], transport=name, endpoint=self.plane.endpoints[name]
        )

    # ---------------------------------------------------------------- helpers
    def _tensor(self, name: str) -> TensorEntry:
        try:
            return self.store.get(name)
        except TensorStoreError as exc:
            raise MemPoolError(str(exc), kind=ErrorKind.UNKNOWN_ID) from None

    def _reserve(self, nbytes: int) -> int:
        try:
            return self.store.reserve(nbytes)
        except TensorStoreError as exc:
            raise MemPoolError(str(exc), kind=ErrorKind.OUT_OF_MEMORY) from None

    def _check_not_sending(self, name: str) -> None:
        if self.sending[name]:
            raise MemPoolError(
                f"tensor {name!r} is being sent; try again when the send ends",
                kind=ErrorKind.REFUSED,
            )


def tensor_nbytes(dtype: str, shape: list[int]) -> int:
    if dtype not in DTYPE_BYTES:
        raise MemPoolError(
            f"unsupported tensor dtype {dtype!r}; supported: {', '.join(DTYPE_BYTES)}",
            kind=ErrorKind.BAD_REQUEST,
        )
    if any(d < 0 for d in shape):
        raise MemPoolError(f"negative dimension in shape {shape}", kind=ErrorKind.BAD_REQUEST)
    return int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype]
