"""Best-effort calls from the scheduler to other processes: MemPool daemons (release a
dead worker's blocks, cache stats, flush) and workers' control sockets (shutdown).

Every call has a short timeout and runs concurrently with its siblings; a daemon or worker
that is dead or slow becomes an error entry in the result (or a log line), never an
exception: the scheduler's loop must not wait on, or fail with, anyone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from common.logging import get_logger
from common.mempool_client import MempoolClient
from common.protocol.admin import AdminReply, AdminRequest
from common.sockets import RpcClient

log = get_logger(__name__)

# Evict "everything": the daemon's evict stops when nothing evictable is left.
_ALL_BLOCKS = 2**31 - 1


async def release_owner(mempool: str, owner: str, timeout_s: float) -> None:
    """Free every block and pin `owner` (a worker dropped for silence) holds at `mempool`."""
    client = MempoolClient(mempool, timeout_s=timeout_s)
    try:
        freed = await client.release_owner(owner)
        log.info("freed the blocks of a dropped instance", instance=owner, blocks=freed)
    except Exception as exc:
        log.warning("release_owner failed", instance=owner, mempool=mempool, error=str(exc))
    finally:
        client.close()


async def each_daemon(
    daemons: Mapping[str, str],
    call: Callable[[MempoolClient], Awaitable[dict[str, Any]]],
    timeout_s: float,
) -> dict[str, dict[str, Any]]:
    """`call` on every daemon (instance id -> RPC address) at once; failures are entries."""

    async def one(mempool: str) -> dict[str, Any]:
        client = MempoolClient(mempool, timeout_s=timeout_s)
        try:
            return await call(client)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            client.close()

    ids = list(daemons)
    results = await asyncio.gather(*(one(daemons[i]) for i in ids))
    return dict(zip(ids, results, strict=True))


async def cache_stats(daemons: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    """Each daemon's index counters and hit rate (matched / queried tokens), and the
    cluster's over the daemons that answered."""

    async def stats(client: MempoolClient) -> dict[str, Any]:
        st = await client.stats(timeout_s=timeout_s)
        return {
            "daemon": st.instance_id,
            "hit_rate": _ratio(st.matched_tokens, st.queried_tokens),
            "match_calls": st.match_calls,
            "match_hits": st.match_hits,
            "matched_tokens": st.matched_tokens,
            "queried_tokens": st.queried_tokens,
            "index_blocks": dict(st.index),
            "free_blocks": dict(st.free),
            "capacity_blocks": dict(st.capacity),
            "evicted_blocks": st.evicted_blocks,
            "bytes_sent": st.bytes_sent,
            "bytes_received": st.bytes_received,
            "transfers_failed": st.transfers_failed,
        }

    per = await each_daemon(daemons, stats, timeout_s)
    ok = [s for s in per.values() if "error" not in s]
    matched = sum(s["matched_tokens"] for s in ok)
    queried = sum(s["queried_tokens"] for s in ok)
    return {
        "instances": per,
        "cluster": {
            "hit_rate": _ratio(matched, queried),
            "matched_tokens": matched,
            "queried_tokens": queried,
            "daemons": len(per),
            "unreachable": len(per) - len(ok),
        },
    }


async def flush_cache(daemons: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    """Every daemon evicts every unpinned cached block, on both tiers."""

    async def flush(client: MempoolClient) -> dict[str, Any]:
        # Evicting the device tier demotes to the host tier where there is room, so the
        # host tier is flushed after it; a round that moves nothing off the device ends it.
        device = host = 0
        for _ in range(4):
            d = await client.evict(_ALL_BLOCKS, tier=0)
            h = await client.evict(_ALL_BLOCKS, tier=1)
            device, host = device + d, host + h
            if d == 0:
                break
        return {"device_blocks": device, "host_blocks": host}

    return {"instances": await each_daemon(daemons, flush, timeout_s)}


async def stop_workers(controls: Mapping[str, str], token: str, timeout_s: float) -> dict[str, str]:
    """Send `shutdown` to every worker's control socket; per worker "stopping" or why not."""

    async def stop(control: str) -> str:
        client: RpcClient[AdminRequest, AdminReply] = RpcClient(control, AdminRequest, AdminReply)
        try:
            reply = await client.call(AdminRequest(token, "shutdown"), timeout_s)
            return "stopping" if reply.ok else reply.error
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            client.close()

    ids = list(controls)
    results = await asyncio.gather(*(stop(controls[i]) for i in ids))
    return dict(zip(ids, results, strict=True))


def _ratio(num: int, den: int) -> float:
    return round(num / den, 4) if den else 0.0
