"""What the MemPool daemon's and the scheduler's metrics make of their state (pure: real
`MemPool` stats and transfer counters, a real `GlobalScheduler` and its KunServe groups),
read back through each one's own registry."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.mempool.metrics import MempoolMetrics
from services.mempool.pool import MemPool
from services.mempool.transfer_state import TransferCounters
from services.scheduler.config import SchedulerConfig
from services.scheduler.core import GlobalScheduler
from services.scheduler.elastic import DISSOLVED, SERVING, Group
from services.scheduler.metrics import SchedulerMetrics


def samples(registry: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()  # type: ignore[arg-type]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_mempool_blocks_per_tier_and_state_and_transfers_per_transport() -> None:
    pool = MemPool(4, device_blocks=10, host_blocks=6)
    pool.alloc_mem(3, owner="w")
    counters = TransferCounters()
    counters.sent("shm", 4096, 0.5)
    counters.sent("tcp", 100, 0.25)
    m = MempoolMetrics()
    m.refresh(pool.stats(), counters)
    counters.sent("shm", 4096, 0.5)
    m.refresh(pool.stats(), counters)  # totals follow, never counted twice
    got = samples(m.registry)

    def blocks(tier: str, state: str) -> float:
        return got[("memserve:mempool_blocks", (("state", state), ("tier", tier)))]

    assert (blocks("device", "capacity"), blocks("device", "free")) == (10, 7)
    assert blocks("device", "client") == 3 and blocks("device", "index") == 0
    assert (blocks("host", "capacity"), blocks("host", "free")) == (6, 6)
    sent = "memserve:mempool_transfer_bytes_total"
    assert got[(sent, (("transport", "shm"),))] == 8192
    assert got[(sent, (("transport", "tcp"),))] == 100
    assert got[("memserve:mempool_transfer_seconds_total", (("transport", "shm"),))] == 1.0


def test_scheduler_counts_groups_lent_bytes_and_each_exchange_once() -> None:
    core = GlobalScheduler(SchedulerConfig(admin_address="").validate())
    m = SchedulerMetrics()
    m.refresh(core)
    assert samples(m.registry)[("memserve:kunserve_lent_bytes", ())] == 0
    group = Group("g1", 1, ["a", "b"], SERVING, began_at=0.0, formed_at=1.0, freed_bytes=1000)
    core.elastic.groups["g1"] = group
    m.refresh(core)
    m.refresh(core)
    got = samples(m.registry)
    assert got[("memserve:kunserve_groups", (("state", SERVING),))] == 1
    assert got[("memserve:kunserve_lent_bytes", ())] == 1000
    assert got[("memserve:kunserve_exchanges_total", (("kind", "drop"),))] == 1
    group.state = DISSOLVED
    m.refresh(core)
    m.refresh(core)
    got = samples(m.registry)
    assert got[("memserve:kunserve_groups", (("state", DISSOLVED),))] == 1
    assert ("memserve:kunserve_groups", (("state", SERVING),)) not in got
    assert got[("memserve:kunserve_lent_bytes", ())] == 0  # given back
    assert got[("memserve:kunserve_exchanges_total", (("kind", "drop"),))] == 1
    assert got[("memserve:kunserve_exchanges_total", (("kind", "restore"),))] == 1
