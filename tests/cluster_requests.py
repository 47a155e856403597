"""Helpers for cluster tests that stream requests and compare them to the single-process
reference (tests/test_kunserve_*.py, test_migration_cluster.py): prompts, the reference
tokens, a background stream, admin and worker-status calls, bounded waits."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

from common.admin_client import admin_call
from common.client import GatewayClient
from common.mempool_client import MempoolClient
from common.protocol import client as cp
from common.protocol.admin import AdminReply
from common.sampling import SamplingParams
from services.launcher.config import load
from services.launcher.supervisor import Cluster
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from tests.daemons import assert_idle_and_intact

TOKEN = "test-token"
MEMBERS = ("colocated-0", "colocated-1")
TINY_PARAM_BYTES = 3_218_944
BLOCK_BYTES = 32 * 1024  # tiny, block 16, fp32, all layers

Workload = dict[str, tuple[list[int], SamplingParams]]


def colocated_pair(tmp_path: Path, *, kv_blocks: int = 0, **sections: dict[str, Any]) -> Any:
    """Launcher settings of 2 colocated `tiny` instances on loopback (1 torch thread per
    worker); `kv_blocks` > 0 gives each a memory budget of the parameters plus that many
    KV blocks; `sections` (cluster=..., scheduler=..., worker=...) override per table."""
    shape: dict[str, dict[str, Any]] = {
        "cluster": {
            "run_dir": str(tmp_path / "run"),
            "admin_token": TOKEN,
            "mode": "colocated",
            "colocated": 2,
        },
        "scheduler": {"heartbeat_timeout_s": 1.5},
        "gateway": {"request_timeout_s": 30},
        "worker": {"heartbeat_interval_s": 0.25, "engine": {"num_threads": 1}},
        "mempool": {"tensor_memory_bytes": 1 << 20},
    }
    if kv_blocks:
        shape["mempool"]["budget_bytes"] = TINY_PARAM_BYTES + kv_blocks * BLOCK_BYTES
    for table, values in sections.items():
        shape[table] = {**shape[table], **values}
    return load(None, shape)


def prompt(n: int, seed: int) -> list[int]:
    """`n` byte tokens after a BOS, depending only on `seed`."""
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 259) for _ in range(n - 1)]


def reference(requests: Workload) -> dict[str, list[int]]:
    """Tokens of the single-process engine (seeded requests draw from their own seed)."""
    engine = Engine.from_config(EngineConfig(model="tiny", num_kv_blocks=1024))
    for rid, (p, params) in requests.items():
        engine.add_request(rid, p, params)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return out


class Stream:
    """One request through the gateway, collected in the background."""

    def __init__(self, client: GatewayClient, p: list[int], params: SamplingParams):
        self.tokens: list[int] = []
        self.final: cp.Final | None = None
        self.task = asyncio.create_task(self._run(client, p, params))

    async def _run(self, client: GatewayClient, p: list[int], params: SamplingParams) -> None:
        async for item in client.stream(p, params):
            if isinstance(item, cp.Chunk):
                self.tokens.extend(item.token_ids)
            else:
                self.final = item


async def admin(c: Cluster, command: str, *args: str) -> AdminReply:
    return await admin_call(c.admin_address, TOKEN, command, args, timeout_s=60)


async def worker_status(c: Cluster, iid: str) -> dict[str, Any]:
    reply = await admin_call(c.endpoints(iid)["control"], TOKEN, "status")
    assert reply.ok, reply.error
    return reply.result


async def until(cond: Any, timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def daemons_idle_and_intact(c: Cluster, ids: tuple[str, ...] = MEMBERS) -> None:
    for iid in ids:
        client = MempoolClient(c.endpoints(f"{iid}-mempool")["rpc"])
        try:
            await assert_idle_and_intact(client, iid)
        finally:
            client.close()


async def all_idle_and_intact(c: Cluster) -> None:
    """Every live MemPool daemon of `c`: no pin held, check_integrity passes."""
    for iid, child in c.children.items():
        if child.spec.kind != "mempool" or not child.alive:
            continue
        client = MempoolClient(child.endpoints["rpc"])
        try:
            await assert_idle_and_intact(client, iid)
        finally:
            client.close()
