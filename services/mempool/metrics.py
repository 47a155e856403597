"""A MemPool daemon's Prometheus metrics (common/metrics.py), refreshed from its pool's
stats and transfer counters every REFRESH_S (`refresh`, on the daemon's event loop).

    memserve:mempool_blocks{tier,state}   state: free | client (leased to the worker) |
                                          index (the prompt tree) | pinned (index blocks a
                                          live match holds; a subset of index) | capacity
    memserve:mempool_transfer_*{transport} the sending side of KV and tensor transfers
"""

from __future__ import annotations

from common.metrics import Metrics
from services.mempool.pool import PoolStats
from services.mempool.transfer_state import TransferCounters

STATES = ("capacity", "free", "client", "index", "pinned")


class MempoolMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = self.gauge(
            "memserve:mempool_blocks",
            "Blocks per tier (device | host) and state (capacity | free | client | index "
            "| pinned).",
            ["tier", "state"],
        )
        self.tree_blocks = self.gauge(
            "memserve:mempool_prompt_tree_blocks",
            "Blocks the prompt tree (the cache index) holds, per tier.",
            ["tier"],
        )
        self.sent_bytes = self.followed(
            "memserve:mempool_transfer_bytes_total",
            "Bytes this daemon sent to other daemons, per transport.",
            ["transport"],
        )
        self.sent_seconds = self.followed(
            "memserve:mempool_transfer_seconds_total",
            "Seconds this daemon's sends took (prepare to commit), per transport.",
            ["transport"],
        )
        self.received_bytes = self.followed(
            "memserve:mempool_received_bytes_total", "Bytes this daemon received."
        )
        self.failed = self.followed(
            "memserve:mempool_transfer_failures_total", "Transfers that failed, either side."
        )
        self.queried = self.followed(
            "memserve:mempool_match_queried_tokens_total", "Tokens looked up by matches."
        )
        self.matched = self.followed(
            "memserve:mempool_match_hit_tokens_total", "Tokens matches found in the index."
        )
        self.evicted = self.followed(
            "memserve:mempool_evicted_blocks_total", "Index blocks evicted (dropped)."
        )
        self.demoted = self.followed(
            "memserve:mempool_demoted_blocks_total", "Index blocks moved device -> host."
        )
        self.promoted = self.followed(
            "memserve:mempool_promoted_blocks_total", "Index blocks moved host -> device."
        )

    def refresh(self, st: PoolStats, counters: TransferCounters) -> None:
        tiers = sorted(st.capacity)
        by_state = {
            "capacity": st.capacity,
            "free": st.free,
            "client": st.client,
            "index": st.index,
            "pinned": st.pinned,
        }
        self.blocks.replace(
            ({"tier": t, "state": s}, by_state[s].get(t, 0)) for t in tiers for s in STATES
        )
        self.tree_blocks.replace(({"tier": t}, st.index.get(t, 0)) for t in tiers)
        for transport, nbytes in counters.sent_bytes.items():
            self.sent_bytes.follow(nbytes, transport=transport)
            self.sent_seconds.follow(counters.sent_seconds.get(transport, 0.0), transport=transport)
        self.received_bytes.follow(counters.bytes_received)
        self.failed.follow(counters.transfers_failed)
        self.queried.follow(st.queried_tokens)
        self.matched.follow(st.matched_tokens)
        self.evicted.follow(st.evicted_blocks)
        self.demoted.follow(st.demoted_blocks)
        self.promoted.follow(st.promoted_blocks)
