"""The worker's KV connector: the one owner of a request's KV outside the engine.

Shaped like vLLM's `KVConnectorBase_V1`: the worker asks it, on admission, which prefix of
the prompt is already here (`get_prefix`), and, when the request ends, what becomes of its
blocks (`request_finished`), which *returns* the hand-off for the decode instance (a
`KvTransfer`) instead of leaving it in a shared record for someone to read and clear. The
shell then moves it (`send`) and wraps what arrived in a `Continue`.

    prefill worker                                       decode worker
    get_prefix ─▶ KvPrefix (match; fetch first)
    engine: prompt ▶ first token
    request_finished ─▶ Finished(taken, KvTransfer)
    send(transfer) ─▶ KvPrefix at the decode daemon ─Continue─▶ get_prefix ─▶ that KvPrefix
      └ finished_sending: unpin / free our side          engine: the remaining tokens
                                                         request_finished: insert; with
                                                         return_kv_to, the history goes back

Who owns a block, at each moment (exactly one of these):

- the engine: blocks it leased, free or owned by a running request (`Engine.check_integrity`);
- a running request's borrowed prefix (`KvPrefix`): pinned in the daemon's index by its
  handle, or, handle 0, allocated to this worker in the daemon (a plain transfer's
  arrival); given back by `release_prefix` when the request ends, never before;
- the connector, from `request_finished` (the blocks it lists in `Finished.taken`) until
  the daemon's index or free list has them (at once), or, for a `KvTransfer`, until
  `finished_sending`: pinned in our index (`KvTransfer.pinned`) or owned by this worker in
  the daemon. Every `KvTransfer` ends in exactly one `finished_sending` (`send` calls it
  whatever happens to the bytes);
- after `send`, the decode side: what arrived is pinned for, or allocated to, the decode
  worker, which borrows it as its request's prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from common.logging import get_logger
from common.mempool_client import MempoolClient
from common.protocol import worker as wp
from services.worker.request import FinishReason

log = get_logger(__name__)


@dataclass(frozen=True)
class KvPrefix:
    """Whole blocks in one daemon holding the K/V of a request's first
    `len(block_ids) * block_size` tokens: pinned in its index by `handle`, or (handle 0)
    allocated to this worker. Empty: nothing is cached, everything is computed."""

    block_ids: list[int] = field(default_factory=list)
    handle: int = 0


@dataclass(frozen=True)
class KvPlan:
    """What one request does with the KV (the scheduler's caching mode decides it, the
    worker shell builds it from `Generate` or `Continue`):

    - `cache`: match the prompt before computing, insert the history at the end;
    - `fetch`: first pull a longer prefix another instance holds into our index;
    - `handoff` (prefill): keep the prompt's whole blocks for the decode instance;
    - `arrived` (decode): the prompt's KV that came from the prefill side, borrowed as the
      request's prefix; with `return_kv_to` (pd-caching-3) the history goes back there."""

    cache: bool = True
    fetch: wp.Fetch | None = None
    handoff: wp.HandOff | None = None
    arrived: KvPrefix = field(default_factory=KvPrefix)
    return_kv_to: str = ""

    @property
    def keep_blocks(self) -> bool:
        """Whether the engine hands the request's blocks over when it ends."""
        return self.cache or self.handoff is not None


@dataclass(frozen=True)
class KvTransfer:
    """A finished prefill's KV for the decode instance `to`: whole blocks holding `tokens`,
    pinned in our index by `handle` (`pinned`), or (handle 0) owned by this worker in the
    daemon. Empty when the prompt filled no whole block: decode recomputes it."""

    to: wp.HandOff
    tokens: list[int]
    block_ids: list[int]
    handle: int = 0

    @property
    def pinned(self) -> bool:
        return self.handle != 0


@dataclass(frozen=True)
class Finished:
    """What `request_finished` did with a request's blocks: `taken` are those the
    connector now owns (the engine disowns them; it takes the others of its own back), and
    `transfer` the KV waiting for the decode instance, if the request hands off."""

    taken: list[int] = field(default_factory=list)
    transfer: KvTransfer | None = None


class KVConnector(ABC):
    """The worker's KV outside the engine (see the module docstring for who owns what)."""

    @abstractmethod
    async def get_prefix(self, prompt: list[int], plan: KvPlan) -> KvPrefix:
        """On admission: the prefix of `prompt` whose KV is already here (at most all but
        its last token), borrowed by the request until `release_prefix`."""

    @abstractmethod
    async def release_prefix(self, prefix: KvPrefix) -> None:
        """The request no longer reads `prefix`: unpin it, or free it if it was ours."""

    @abstractmethod
    async def request_finished(
        self, tokens: list[int], block_ids: list[int], plan: KvPlan, reason: FinishReason
    ) -> Finished:
        """The request ended; the engine handed over `block_ids` (its borrowed prefix, then
        the blocks it owned), which hold the K/V of `tokens`. A hand-off request that
        produced its first token (`reason` LENGTH) returns its `KvTransfer`."""

    @abstractmethod
    async def send(self, transfer: KvTransfer) -> KvPrefix:
        """Move `transfer` to its decode instance, then `finished_sending`, whatever
        happened. Never raises: what arrived there (empty if the transfer failed, and the
        decode side recomputes), pinned for or allocated to the decode worker."""

    @abstractmethod
    async def finished_sending(self, transfer: KvTransfer) -> None:
        """Our side of `transfer` is no longer needed (sent, or given up): unpin or free."""

    @abstractmethod
    async def close(self) -> None:
        """Stop background work (a return still in flight is given up)."""


class MempoolConnector(KVConnector):
    """The connector over this instance's MemPool daemon: the index holds what is cached,
    the daemons move the bytes (transfer_with_insert / transfer), one RPC each."""

    def __init__(
        self,
        client: MempoolClient,
        *,
        owner: str,
        block_size: int,
        mempool_address: str = "",
        transfer_timeout_s: float = 10.0,
    ):
        self.client = client
        self.owner = owner
        self.block_size = block_size
        self.mempool_address = mempool_address
        self.transfer_timeout_s = transfer_timeout_s
        self.peers: dict[str, MempoolClient] = {}
        self.background: set[asyncio.Task[None]] = set()
        self.returned_kv = 0  # pd-caching-3 returns that succeeded

    def peer(self, address: str) -> MempoolClient:
        client = self.peers.get(address)
        if client is None:
            client = self.peers[address] = MempoolClient(address)
        return client

    # ------------------------------------------------------------- admission
    async def get_prefix(self, prompt: list[int], plan: KvPlan) -> KvPrefix:
        if plan.arrived.block_ids:  # decode: the prompt's KV came from the prefill side
            return plan.arrived
        if not plan.cache:
            return KvPrefix()
        if plan.fetch is not None:
            await self._fetch(prompt, plan.fetch)
        m = await self.client.match(prompt, owner=self.owner, max_tokens=len(prompt) - 1)
        return KvPrefix(m.block_ids, m.handle) if m.handle else KvPrefix()

    async def _fetch(self, prompt: list[int], fetch: wp.Fetch) -> None:
        """Pull a prefix from `fetch.mempool` into our index; on failure, compute it."""
        src = self.peer(fetch.mempool)
        try:
            m = await src.match(prompt[: fetch.num_tokens], owner=f"fetch:{self.owner}")
        except Exception as exc:
            log.warning(
                "fetch: match at the source failed", source=fetch.instance_id, error=str(exc)
            )
            return
        if not m.handle:
            return
        try:
            await src.transfer_with_insert(
                self.mempool_address,
                prompt[: m.num_tokens],
                m.block_ids,
                timeout_s=self.transfer_timeout_s,
                skip_cached=True,
            )
        except Exception as exc:
            log.warning("fetch failed; computing instead", source=fetch.instance_id, error=str(exc))
        finally:
            with contextlib.suppress(Exception):
                await src.release(m.handle)

    async def release_prefix(self, prefix: KvPrefix) -> None:
        if prefix.handle:
            await self.client.release(prefix.handle)
        elif prefix.block_ids:
            await self.client.free_mem(prefix.block_ids)

    # ------------------------------------------------------------------ end
    async def request_finished(
        self, tokens: list[int], block_ids: list[int], plan: KvPlan, reason: FinishReason
    ) -> Finished:
        if plan.handoff is not None and reason == FinishReason.LENGTH:
            return await self._keep_for_handoff(tokens, block_ids, plan.handoff, plan.cache)
        if not plan.cache:  # a hand-off request that ended early (abort, error, eos)
            return Finished()
        # The index takes the whole new blocks; the daemon frees duplicates and the tail.
        inserted = await self.client.insert(tokens, block_ids)
        if plan.return_kv_to and inserted.num_indexed_tokens:
            history = tokens[: inserted.num_indexed_tokens]
            self._spawn(self._return_kv(history, plan.return_kv_to))
        return Finished(taken=list(block_ids))

    async def _keep_for_handoff(
        self, tokens: list[int], block_ids: list[int], to: wp.HandOff, cache: bool
    ) -> Finished:
        """Prefill done: keep the prompt's whole blocks for the decode instance."""
        bs = self.block_size
        whole = len(tokens) // bs
        if cache:
            # Indexed and pinned in one call; under a block nothing is: decode recomputes.
            r = await self.client.insert(tokens, block_ids, pin_owner=self.owner)
            pinned = len(r.index_block_ids) * bs
            transfer = KvTransfer(to, tokens[:pinned], r.index_block_ids, r.handle)
            return Finished(taken=list(block_ids), transfer=transfer)
        # No cache: the whole blocks stay this worker's in the daemon until they are sent;
        # the partial tail goes back to the engine.
        send = block_ids[:whole]
        return Finished(taken=list(send), transfer=KvTransfer(to, tokens[: whole * bs], send))

    # --------------------------------------------------------------- hand-off
    async def send(self, transfer: KvTransfer) -> KvPrefix:
        to = transfer.to
        arrived = KvPrefix()
        try:
            if transfer.block_ids and to.insert:
                t = await self.client.transfer_with_insert(
                    to.mempool,
                    transfer.tokens,
                    transfer.block_ids,
                    pin_owner=to.instance_id,
                    timeout_s=self.transfer_timeout_s,
                    skip_cached=True,
                )
                arrived = KvPrefix(t.index_block_ids, t.handle)
            elif transfer.block_ids:
                t = await self.client.transfer(
                    to.mempool,
                    transfer.block_ids,
                    [],
                    owner=to.instance_id,
                    timeout_s=self.transfer_timeout_s,
                )
                arrived = KvPrefix(t.dst_ids)
        except Exception as exc:  # the decode side recomputes the prompt
            log.warning(
                "KV hand-off failed; decode recomputes", decode=to.instance_id, error=str(exc)
            )
        finally:
            await self.finished_sending(transfer)
        return arrived

    async def finished_sending(self, transfer: KvTransfer) -> None:
        try:
            await self.release_prefix(KvPrefix(transfer.block_ids, transfer.handle))
        except Exception as exc:  # the daemon frees this worker's blocks when it restarts
            log.warning("could not release a sent hand-off", error=str(exc))

    async def _return_kv(self, tokens: list[int], dst: str) -> None:
        """pd-caching-3: send the request's history (decode-phase KV included) back to the
        prefill daemon, which indexes it. One call: our daemon matches `tokens` in its own
        index, sends only the blocks `dst` lacks and releases its pin."""
        await self.client.return_kv(dst, tokens, timeout_s=self.transfer_timeout_s)
        self.returned_kv += 1

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background transfer failed", error=str(t.exception()))

        task.add_done_callback(done)

    async def close(self) -> None:
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        for peer in self.peers.values():
            peer.close()
