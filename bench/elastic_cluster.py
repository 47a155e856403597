"""What the `memserve bench elastic` phases share: the cluster of 2 colocated instances
with a memory budget each, its options, requests streamed through the gateway (each
chunk's arrival time kept) and the admin and status calls on it."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEMBERS = ("colocated-0", "colocated-1")
MIB = 1 << 20


@dataclass(frozen=True)
class Options:
    model: str = "small"
    kv_mib: int = 32
    rounds: int = 4  # drop / restore cycles
    requests: int = 2  # single requests per side per round
    batch: int = 4  # concurrent requests of the batch case (0: none)
    across: int = 2  # requests running across each restore
    prompt_tokens: int = 64
    max_tokens: int = 128
    probe_tokens: int = 16  # the request sent right after the drop
    run_dir: str = ""  # "" = a temporary folder


def param_bytes(model: str) -> int:
    """The whole model's fp32 parameter bytes, from its config.json."""
    from common.model.config import ModelConfig
    from common.model.presets import resolve_model

    return ModelConfig.from_folder(Path(resolve_model(model))).param_bytes("float32")


def settings(
    opts: Options, run_dir: str, token: str, extra: dict[str, dict[str, Any]] | None = None
) -> Any:
    """The cluster: 2 colocated instances of `opts.model`, a budget of parameters +
    `opts.kv_mib` each; `extra` adds or replaces keys section by section."""
    from services.launcher.config import load

    base: dict[str, dict[str, Any]] = {
        "cluster": {
            "run_dir": run_dir,
            "admin_token": token,
            "model": opts.model,
            "mode": "colocated",
            "colocated": len(MEMBERS),
            "restart": False,
        },
        "gateway": {"request_timeout_s": 120},
        "worker": {"engine": {"num_threads": 1}},
        "mempool": {
            "budget_bytes": param_bytes(opts.model) + opts.kv_mib * MIB,
            "tensor_memory_bytes": 1 << 20,
        },
    }
    for section, keys in (extra or {}).items():
        base[section] = {**base.get(section, {}), **keys}
    return load(None, base)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 259) for _ in range(n - 1)]


class Stream:
    """One request through the gateway, collected in the background; `first_at`: when
    its first token came, `arrivals`: when each chunk with tokens came (perf_counter)."""

    def __init__(self, client: Any, p: list[int], max_tokens: int):
        from common.sampling import SamplingParams

        self.tokens = 0
        self.first_at = 0.0
        self.arrivals: list[float] = []
        self.final: Any = None
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.task = asyncio.create_task(self._run(client, p, params))

    async def _run(self, client: Any, p: list[int], params: Any) -> None:
        from common.protocol import client as cp

        async for item in client.stream(p, params):
            if isinstance(item, cp.Chunk):
                if item.token_ids:
                    self.arrivals.append(time.perf_counter())
                    if not self.tokens:
                        self.first_at = self.arrivals[-1]
                self.tokens += len(item.token_ids)
            else:
                self.final = item

    async def done(self, timeout_s: float = 300.0) -> Any:
        await asyncio.wait_for(self.task, timeout_s)
        final = self.final
        if final is None or final.finish_reason != "length":
            raise RuntimeError(f"request ended badly: {final}")
        return final


class Bench:
    def __init__(self, cluster: Any, client: Any, token: str, opts: Options):
        self.c = cluster
        self.client = client
        self.token = token
        self.opts = opts
        self.seed = 0

    def next_prompt(self) -> list[int]:
        self.seed += 1  # a fresh prompt each time: no prefix-cache hit changes TTFT
        return prompt(self.opts.prompt_tokens, self.seed)

    async def admin(self, *args: str) -> dict[str, Any]:
        from common.admin_client import admin_call

        reply = await admin_call(self.c.admin_address, self.token, args[0], args[1:], 120)
        if not reply.ok:
            raise RuntimeError(f"admin {' '.join(args)}: {reply.error}")
        return dict(reply.result)

    async def worker_status(self, iid: str) -> dict[str, Any]:
        from common.admin_client import admin_call

        reply = await admin_call(self.c.endpoints(iid)["control"], self.token, "status")
        if not reply.ok:
            raise RuntimeError(f"{iid} status: {reply.error}")
        return dict(reply.result)

    async def daemon_info(self, iid: str) -> Any:
        from common.mempool_client import MempoolClient

        client = MempoolClient(self.c.endpoints(f"{iid}-mempool")["rpc"])
        try:
            return await client.info()
        finally:
            client.close()

    async def snapshot(self) -> dict[str, Any]:
        """Per instance: worker status (params, RSS, elastic state) and daemon capacity."""
        out: dict[str, Any] = {}
        for iid in MEMBERS:
            st = await self.worker_status(iid)
            info = await self.daemon_info(iid)
            out[iid] = {
                "worker_param_bytes": st["param_bytes"],
                "rss_bytes": st["rss_bytes"],
                "elastic_state": st["elastic"]["state"],
                "daemon_param_bytes": info.param_bytes,
                "budget_bytes": info.budget_bytes,
                "split": info.split,
                "device_blocks": info.device_blocks,
                "block_bytes": info.block_bytes,
                "block_size": info.block_size,
                "kv_tokens": info.device_blocks * info.block_size,
            }
        return out

    async def single(self, n: int) -> list[Any]:
        """`n` requests one after another, each alone: their Finals."""
        out = []
        for _ in range(n):
            s = Stream(self.client, self.next_prompt(), self.opts.max_tokens)
            out.append(await s.done())
        return out

    async def batch(self) -> list[Any]:
        streams = [
            Stream(self.client, self.next_prompt(), self.opts.max_tokens)
            for _ in range(self.opts.batch)
        ]
        return [await s.done() for s in streams]

    async def drop(self) -> dict[str, Any]:
        """`elastic drop` and, right after it is sent, a new request: the command's
        duration and that request's TTFT, both counted from the drop."""
        t0 = time.perf_counter()
        command = asyncio.create_task(self.admin("elastic", "drop", ",".join(MEMBERS)))
        await asyncio.sleep(0.005)  # the drop's request leaves first
        probe = Stream(self.client, self.next_prompt(), self.opts.probe_tokens)
        group = await command
        done_at = time.perf_counter()
        final = await probe.done()
        return {
            "group_id": group["group_id"],
            "group": group,
            "drop_s": done_at - t0,
            "ttft_from_drop_s": probe.first_at - t0,
            # Routed to a member still serving alone (Prepare does not stop it): the
            # request started there and the group adopted it.
            "first_token_before_group": probe.first_at < done_at,
            "probe_gateway_ttft_s": final.ttft_s,
            "probe_instances": list(final.instances),
        }

    async def restore(self, gid: str, how: str = "live") -> dict[str, Any]:
        """`elastic restore GID live|pause` with `across` requests running: its duration,
        the leader's report (pause, moved / recomputed, bytes moved, the live batches) and
        what the running requests saw: their mean time per token and largest gap between
        tokens while it ran, and their mean time per token before it."""
        streams = [
            Stream(self.client, self.next_prompt(), self.opts.max_tokens)
            for _ in range(self.opts.across)
        ]
        deadline = time.monotonic() + 120
        while not all(s.tokens >= 8 for s in streams):
            if time.monotonic() > deadline or any(s.task.done() for s in streams):
                break
            await asyncio.sleep(0.01)
        running = sum(not s.task.done() for s in streams)
        t0 = time.perf_counter()
        result = await self.admin("elastic", "restore", gid, how)
        t1 = time.perf_counter()
        for s in streams:
            await s.done()
        (r,) = result["restored"]
        during, before = _gaps(streams, t0, t1)
        return {
            "how": how,
            "restore_s": t1 - t0,
            "pause_s": r["pause_s"],
            "moved": r["moved"],
            "recomputed": r["recomputed"],
            "moved_bytes": r["moved_bytes"],
            "moved_live": r.get("moved_live", 0),
            "batches": r.get("batches", 0),
            "stall_max_s": r.get("stall_max_s", 0.0),
            "fallback": r.get("fallback", ""),
            "running": running,
            "tpot_during_ms": 1e3 * statistics.fmean(during) if during else float("nan"),
            "max_gap_ms": 1e3 * max(during) if during else float("nan"),
            "tpot_before_ms": 1e3 * statistics.fmean(before) if before else float("nan"),
        }


def _gaps(streams: list[Stream], t0: float, t1: float) -> tuple[list[float], list[float]]:
    """Per-token gaps of `streams` (a chunk's gap spread over its tokens is not known, so
    one gap per chunk) that end inside [t0, t1] plus the first one after it (the one a
    pause stretches), and those that end before t0."""
    during: list[float] = []
    before: list[float] = []
    for s in streams:
        pairs = list(zip(s.arrivals, s.arrivals[1:], strict=False))
        before += [b - a for a, b in pairs if b < t0]
        inside = [b - a for a, b in pairs if t0 <= b <= t1]
        after = [b - a for a, b in pairs if b > t1][:1]
        during += inside + after
    return during, before


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
