"""KV block transfers between daemons: the sending side (`Transfer`, `TransferWithInsert`,
also from the sender's own index) and the receiving side (`PrepareReceive`, and what a
commit does with the blocks).

    S: source blocks readable (client-owned, or indexed and pinned) -> busy + pinned
    S ──PrepareReceive──▶ D: match the skip_cached prefix (pinned), allocate the rest, or
                             take the given dst ids; mark them busy; name the transfer
    S ══ bytes ════════▶ D's region, straight into the destination blocks
    S ──CommitReceive───▶ D: every byte in -> insert (+ pin, + keep the tail for pin_owner)

Invariants: source blocks stay busy and pinned on S until the leg ends, success or not;
destination blocks stay busy on D until the record ends, and the skip_cached prefix stays
pinned by the record until the commit has inserted it (or the record is given up).
"""

from __future__ import annotations

from common.errors import ErrorKind
from common.logging import get_logger
from common.protocol import mempool as mp
from services.mempool.data_plane import DataPlane
from services.mempool.incoming import Incoming
from services.mempool.pool import InvalidBlocks, MemPool, MemPoolError
from services.mempool.pool_requests import parse_tokens
from services.mempool.prompt_tree import Tier
from services.mempool.send_leg import Leg, TransferHandler, TransferShared, send_leg
from services.mempool.transport import coalesce

log = get_logger(__name__)

# The owner of the sender's pin on its own cached prefix (TransferWithInsert.from_index).
FROM_INDEX_OWNER = "transfer:from-index"


def _blocks_for(tokens: bytes, block_size: int) -> int:
    return -(-(len(tokens) // 4) // block_size)


class IncomingBlocks(Incoming):
    """KV blocks arriving: `ids` receive the bytes (allocated here when `owned`, else a
    client's); `skip_ids` are this daemon's own cached blocks for the leading part of the
    tokens, pinned by `skip_handle` until the commit inserts them with the received ones."""

    def __init__(
        self,
        transfer_id: int,
        plane: DataPlane,
        transport: str,
        timeout_s: float,
        *,
        pool: MemPool,
        ids: list[int],
        owned: bool,
        skip_ids: list[int],
        skip_handle: int,
    ):
        super().__init__(transfer_id, plane, transport, timeout_s)
        self.pool = pool
        self.ids = ids
        self.owned = owned
        self.skip_ids = skip_ids
        self.skip_handle = skip_handle

    @property
    def expects_bytes(self) -> bool:
        return bool(self.ids)

    def check_commit(self, req: mp.CommitReceive) -> None:
        tokens = parse_tokens(req.tokens)
        have = len(self.skip_ids) + len(self.ids)
        if tokens and _blocks_for(tokens, self.pool.block_size) != have:
            raise InvalidBlocks(f"{len(tokens) // 4} tokens do not fit the {have} blocks received")

    def finish(self, req: mp.CommitReceive, nbytes: int) -> mp.Committed:
        self.pool.unmark_busy(self.ids)
        tokens = bytes(req.tokens)
        if not tokens:
            self._unpin_skipped()
            return mp.Committed(nbytes=nbytes)
        all_ids = self.skip_ids + self.ids
        owner = req.pin_owner or None
        try:
            # The pin promotes: every block handed to the new owner must be on the device.
            r = self.pool.insert(tokens, all_ids, Tier.DEVICE, tail_owner=owner, pin_owner=owner)
        except MemPoolError:
            self.pool.free_mem(self.ids, Tier.DEVICE)
            raise
        finally:
            self._unpin_skipped()
        tail = all_ids[r.num_indexed_tokens // self.pool.block_size :] if owner else []
        return mp.Committed(
            nbytes=nbytes,
            num_indexed_tokens=r.num_indexed_tokens,
            index_block_ids=r.index_block_ids,
            handle=r.handle,
            tail_ids=tail,
        )

    def discard(self) -> None:
        self._unpin_skipped()
        self.pool.unmark_busy(self.ids)
        if self.owned:
            self.pool.free_mem(self.ids, Tier.DEVICE)

    def _unpin_skipped(self) -> None:
        if self.skip_handle:
            handle, self.skip_handle = self.skip_handle, 0
            self.pool.release(handle)


class BlockTransfers(TransferHandler):
    def __init__(self, pool: MemPool, plane: DataPlane, shared: TransferShared):
        super().__init__(plane, shared)
        self.pool = pool

    @property
    def block_bytes(self) -> int:
        """One device block now: read from the region at every leg, never cached, because
        split mode (split_mode.py) changes it in place. Two daemons in different split
        modes thus announce different sizes and the receiver refuses the transfer."""
        return self.plane.region.block_bytes

    # ----------------------------------------------------------- sending side
    async def transfer(self, req: mp.Transfer) -> mp.Transferred:
        return await self._send(req.dst, req.src_ids, req.dst_ids, b"", req, owner=req.owner)

    async def transfer_with_insert(self, req: mp.TransferWithInsert) -> mp.Transferred:
        tokens = parse_tokens(req.tokens)
        if not req.from_index:
            return await self._send_with_insert(req, tokens, req.src_ids)
        if req.src_ids:
            raise MemPoolError(
                "from_index sends this daemon's own cached blocks: give no src_ids",
                kind=ErrorKind.BAD_REQUEST,
            )
        hit = self.pool.match(tokens, FROM_INDEX_OWNER, promote=True)
        if not hit.handle:
            return mp.Transferred(dst_ids=[], nbytes=0, seconds=0.0, transport="")
        try:
            return await self._send_with_insert(req, tokens[: hit.num_tokens * 4], hit.block_ids)
        finally:
            self.pool.release(hit.handle)

    async def _send_with_insert(
        self, req: mp.TransferWithInsert, tokens: bytes, src_ids: list[int]
    ) -> mp.Transferred:
        need = _blocks_for(tokens, self.pool.block_size)
        if len(src_ids) != need:
            raise InvalidBlocks(f"{len(tokens) // 4} tokens need {need} blocks, got {len(src_ids)}")
        return await self._send(
            req.dst, src_ids, [], tokens, req, pin_owner=req.pin_owner, skip_cached=req.skip_cached
        )

    async def _send(
        self,
        dst: str,
        src_ids: list[int],
        dst_ids: list[int],
        tokens: bytes,
        req: mp.Transfer | mp.TransferWithInsert,
        *,
        owner: str = "",
        pin_owner: str = "",
        skip_cached: bool = False,
    ) -> mp.Transferred:
        if dst_ids and len(dst_ids) != len(src_ids):
            raise InvalidBlocks(
                f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks"
            )
        self.pool.check_readable(src_ids)
        offered = self.plane.offer(req.transport)
        whole = len(tokens) // (4 * self.pool.block_size) * 4 * self.pool.block_size
        leg = Leg(
            what=f"transfer to {dst}",
            prepare=mp.PrepareReceive(
                num_blocks=len(src_ids),
                dst_ids=dst_ids,
                transports=offered,
                sender_host=self.host_id,
                block_bytes=self.block_bytes,
                timeout_s=req.timeout_s,
                owner=owner,
                skip_tokens=tokens[:whole] if skip_cached else b"",
            ),
            runs=lambda prep: coalesce(src_ids[prep.skip :], prep.dst_ids),
            commit=lambda prep, crc: mp.CommitReceive(
                prep.transfer_id, tokens=tokens, pin_owner=pin_owner, checksum=crc
            ),
            checksum=req.checksum,
            timeout_s=req.timeout_s,
        )
        peer = self.peers.get(dst)
        # Until the bytes are out, nobody may free, swap, insert or evict the source blocks.
        self.pool.mark_busy(src_ids)
        pin = self.pool.pin_blocks(src_ids, owner="transfer")
        try:
            sent = await send_leg(leg, peer, self.plane, self.counters)
        finally:
            self.pool.unmark_busy(src_ids)
            if pin:
                self.pool.release(pin)
        prep, done = sent.prepared, sent.committed
        return mp.Transferred(
            dst_ids=prep.dst_ids,
            nbytes=done.nbytes,
            seconds=sent.seconds,
            transport=prep.transport,
            num_indexed_tokens=done.num_indexed_tokens,
            index_block_ids=done.index_block_ids,
            handle=done.handle,
            tail_ids=done.tail_ids,
            skipped_blocks=prep.skip,
        )

    # --------------------------------------------------------- receiving side
    def prepare(self, req: mp.PrepareReceive) -> mp.Prepared:
        if req.block_bytes and req.block_bytes != self.block_bytes:
            raise MemPoolError(
                f"block size mismatch: sender {req.block_bytes} bytes, receiver "
                f"{self.block_bytes} (a different model, layer range or split mode)",
                kind=ErrorKind.REFUSED,
            )
        name = self.plane.choose(req.transports, req.sender_host)
        tid = self.incoming.new_id()
        if req.dst_ids:
            if len(req.dst_ids) != req.num_blocks:
                raise InvalidBlocks(
                    f"{req.num_blocks} blocks announced, {len(req.dst_ids)} destination ids"
                )
            self.pool.check_client(req.dst_ids, Tier.DEVICE)
            ids, owned = list(req.dst_ids), False
            skip_ids: list[int] = []
            skip_handle = 0
        else:
            ids, skip_ids, skip_handle = self._allocate(req, tid)
            owned = True
        rec = IncomingBlocks(
            tid,
            self.plane,
            name,
            req.timeout_s,
            pool=self.pool,
            ids=ids,
            owned=owned,
            skip_ids=skip_ids,
            skip_handle=skip_handle,
        )
        if ids:
            try:
                rec.receiver.expect(tid, [(r.dst_block, r.num_blocks) for r in coalesce(ids, ids)])
            except Exception:
                rec.discard()
                raise
        # Bytes will land here: the blocks' owner may not free or reuse them meanwhile.
        self.pool.mark_busy(ids)
        self.incoming.add(rec, req.timeout_s)
        return mp.Prepared(
            transfer_id=tid,
            dst_ids=ids,
            transport=name,
            endpoint=self.plane.endpoint(name),
            skip=len(skip_ids),
        )

    def _allocate(self, req: mp.PrepareReceive, tid: int) -> tuple[list[int], list[int], int]:
        """(blocks to receive into, cached blocks skipped, the pin on those): with
        skip_tokens, this daemon's cached prefix of them is pinned and not received."""
        skip_ids: list[int] = []
        skip_handle = 0
        if req.skip_tokens:
            hit = self.pool.match(parse_tokens(req.skip_tokens), f"transfer:{tid}", promote=True)
            skip_ids, skip_handle = hit.block_ids[: req.num_blocks], hit.handle
        try:
            ids = self.pool.alloc_mem(
                req.num_blocks - len(skip_ids), Tier.DEVICE, owner=req.owner or f"transfer:{tid}"
            )
        except Exception:
            if skip_handle:
                self.pool.release(skip_handle)
            raise
        return ids, skip_ids, skip_handle
