"""Async client of a MemPool daemon (the `mempool` channel), for workers, the scheduler,
peers and admin tools. Token ids may be given as lists or int32 arrays; they travel as
int32 bytes. Every refused call raises `common.sockets.RpcError` with the daemon's reason;
match on its `kind` (`common.errors.ErrorKind`), never on the message."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import numpy as np

from common.protocol import mempool as mp
from common.sockets import RpcClient
from common.tokens import TokenLike, as_token_bytes

TokenIds = TokenLike
R = TypeVar("R", bound=msgspec.Struct)


def torch_uint8() -> Any:
    import torch  # only callers that move tensors pay for importing torch

    return torch.uint8


class MempoolClient:
    def __init__(self, address: str, timeout_s: float = 10.0):
        self.address = address
        self.timeout_s = timeout_s
        self._rpc = RpcClient(address, mp.MempoolRequest, mp.MempoolReply)

    async def call(self, req: Any, timeout_s: float | None = None) -> Any:
        return await self._rpc.call(req, timeout_s=timeout_s or self.timeout_s)

    async def _ask(self, req: Any, reply_type: type[R], timeout_s: float | None = None) -> R:
        """`call` for a request whose answer is one reply type (else `RpcError`)."""
        return await self._rpc.call_for(req, reply_type, timeout_s or self.timeout_s)

    async def alloc_mem(self, n: int, tier: int = 0, owner: str = "") -> list[int]:
        return (await self._ask(mp.AllocMem(n, tier, owner), mp.Blocks)).block_ids

    async def free_mem(self, block_ids: list[int], tier: int = 0) -> None:
        await self.call(mp.FreeMem(block_ids, tier))

    async def swap_out(self, block_ids: list[int]) -> list[int]:
        return (await self._ask(mp.SwapOut(block_ids), mp.Blocks)).block_ids

    async def swap_in(self, block_ids: list[int]) -> list[int]:
        return (await self._ask(mp.SwapIn(block_ids), mp.Blocks)).block_ids

    async def insert(
        self, tokens: TokenIds, block_ids: list[int], tier: int = 0, pin_owner: str = ""
    ) -> mp.Inserted:
        """Index the tokens' whole blocks; with `pin_owner`, also pin them (`.handle`)."""
        req = mp.Insert(as_token_bytes(tokens), block_ids, tier, pin_owner)
        return await self._ask(req, mp.Inserted)

    async def match(
        self, tokens: TokenIds, owner: str = "", promote: bool = True, max_tokens: int = -1
    ) -> mp.Matched:
        req = mp.Match(as_token_bytes(tokens), owner, promote, max_tokens)
        return await self._ask(req, mp.Matched)

    async def release(self, handle: int) -> None:
        await self.call(mp.Release(handle))

    async def chown(self, block_ids: list[int], owner: str, *, expect: str = "") -> int:
        """Device client blocks pass to `owner` (only if `expect` holds them, when given)."""
        return (await self._ask(mp.Chown(block_ids, owner, expect), mp.Ok)).count

    async def release_owner(self, owner: str) -> int:
        """Free every block and pin `owner` holds (a client that died); returns blocks freed."""
        return (await self._ask(mp.ReleaseOwner(owner), mp.Ok)).count

    async def evict(self, n: int, tier: int = 0) -> int:
        return (await self._ask(mp.Evict(n, tier), mp.Ok)).count

    async def delete(self, tokens: TokenIds) -> int:
        return (await self._ask(mp.Delete(as_token_bytes(tokens)), mp.Ok)).count

    async def transfer(
        self,
        dst: str,
        src_ids: list[int],
        dst_ids: list[int],
        *,
        transport: str = "",
        checksum: bool = False,
        timeout_s: float = 30.0,
        owner: str = "",
    ) -> mp.Transferred:
        req = mp.Transfer(dst, src_ids, dst_ids, transport, checksum, timeout_s, owner)
        return await self._ask(req, mp.Transferred, timeout_s + 5.0)

    async def transfer_with_insert(
        self,
        dst: str,
        tokens: TokenIds,
        src_ids: list[int],
        *,
        pin_owner: str = "",
        transport: str = "",
        checksum: bool = False,
        timeout_s: float = 30.0,
        skip_cached: bool = False,
    ) -> mp.Transferred:
        req = mp.TransferWithInsert(
            dst=dst,
            tokens=as_token_bytes(tokens),
            src_ids=src_ids,
            pin_owner=pin_owner,
            transport=transport,
            checksum=checksum,
            timeout_s=timeout_s,
            skip_cached=skip_cached,
        )
        return await self._ask(req, mp.Transferred, timeout_s + 5.0)

    async def return_kv(
        self,
        dst: str,
        tokens: TokenIds,
        *,
        timeout_s: float = 30.0,
        skip_cached: bool = True,
        pin_owner: str = "",
        transport: str = "",
        checksum: bool = False,
    ) -> mp.Transferred:
        """Send this daemon's own cached KV of `tokens` (the longest cached prefix, in whole
        blocks) to the daemon at `dst`, which indexes it: one call, where a client would
        otherwise match, transfer_with_insert and release. With `skip_cached` (default)
        only the blocks `dst` lacks move. Nothing cached here: an empty `Transferred`."""
        req = mp.TransferWithInsert(
            dst=dst,
            tokens=as_token_bytes(tokens),
            src_ids=[],
            pin_owner=pin_owner,
            transport=transport,
            checksum=checksum,
            timeout_s=timeout_s,
            skip_cached=skip_cached,
            from_index=True,
        )
        return await self._ask(req, mp.Transferred, timeout_s + 5.0)

    async def stats(self, timeout_s: float | None = None) -> mp.StatsReply:
        return await self._ask(mp.Stats(), mp.StatsReply, timeout_s)

    async def check_integrity(self) -> mp.IntegrityReply:
        return await self._ask(mp.CheckIntegrity(), mp.IntegrityReply)

    async def set_params(self, nbytes: int) -> mp.BudgetReply:
        """Report the worker's resident parameter bytes; refused (REFUSED) if they do not
        fit the instance's budget beside its KV capacity."""
        return await self._ask(mp.SetParams(nbytes), mp.BudgetReply)

    async def split(self, g: int, grow: bool = True) -> mp.SplitState:
        """KunServe split mode: device blocks become g sub-blocks each (see `mp.Split`);
        with `grow` and a budget, capacity grows into what the budget allows."""
        return await self._ask(mp.Split(g, grow), mp.SplitState)

    async def merge(self) -> mp.SplitState:
        """Back to whole blocks; refused (REFUSED) while any aligned run is mixed."""
        return await self._ask(mp.Merge(), mp.SplitState)

    async def shrink(self, target: int) -> mp.SplitState:
        """Lower the device ceiling to `target` (current units); `.pending_shrink` lists
        the live ids above it."""
        return await self._ask(mp.Shrink(target), mp.SplitState)

    async def info(self) -> mp.InfoReply:
        return await self._ask(mp.Info(), mp.InfoReply)

    async def index_snapshot(
        self, max_blocks: int = mp.SNAPSHOT_MAX_BLOCKS, timeout_s: float | None = None
    ) -> mp.IndexSnapshotReply:
        """The daemon's index as chained block hashes (see `mp.IndexSnapshot`)."""
        return await self._ask(mp.IndexSnapshot(max_blocks), mp.IndexSnapshotReply, timeout_s)

    # Named tensors: torch tensors of any dtype (bfloat16 too) travel as raw bytes.
    async def put_tensor(self, name: str, tensor: Any) -> None:
        t = tensor.detach().contiguous().cpu()
        data = t.view(-1).view(torch_uint8()).numpy()
        await self.call(
            mp.PutTensor(name, str(t.dtype).removeprefix("torch."), list(t.shape), data)
        )

    async def get_tensor(self, name: str) -> Any:
        import torch

        r = await self._ask(mp.GetTensor(name), mp.TensorData)
        raw = torch.from_numpy(np.array(r.data, dtype=np.uint8, copy=True))
        return raw.view(getattr(torch, r.dtype)).reshape(r.shape)

    async def delete_tensor(self, name: str) -> None:
        await self.call(mp.DeleteTensor(name))

    async def list_tensors(self) -> mp.TensorList:
        return await self._ask(mp.ListTensors(), mp.TensorList)

    async def send_tensor(
        self,
        dst: str,
        name: str,
        dst_name: str = "",
        *,
        transport: str = "",
        checksum: bool = False,
        timeout_s: float = 30.0,
    ) -> mp.Transferred:
        req = mp.SendTensor(dst, name, dst_name, transport, checksum, timeout_s)
        return await self._ask(req, mp.Transferred, timeout_s + 5.0)

    def close(self) -> None:
        self._rpc.close()
