"""The experiment runner: one workload, replayed on each cluster configuration in turn.

For each (mode, policy): start a fresh cluster with `memserve up`'s launcher (cold caches),
warm it up (a few short requests, then every cache flushed, so warm-up leaves nothing to
hit), replay the workload with the open-loop load client, stop the cluster. Every
configuration sees the same workload (same seed, same arrival times).

Modes are the cluster modes plus "colocated-nocache" (colocated with caching off).
Labels are the mode alone when one policy is run, "MODE/POLICY" when several are.

Interrupts: `stop()` (Ctrl-C) ends the running replay, keeps what it measured, starts no
further configuration; the cluster is stopped on the way out of its `async with`. A
cluster that fails to start ends the experiment with that error recorded.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import LoadClient
from bench.paper import comparison_specs
from bench.results import compare, summarize
from bench.workloads.model import Workload
from common.modes import MODES as SERVING_MODES

MODES = list(SERVING_MODES)
POLICIES = ["locality", "least-load", "round-robin", "session"]


@dataclass(frozen=True)
class Shape:
    """One cluster configuration."""

    mode: str
    policy: str = "locality"
    prefill: int = 1
    decode: int = 1
    colocated: int = 2
    label: str = ""

    @property
    def colocated_mode(self) -> bool:
        return not SERVING_MODES[self.mode].disaggregated

    def instances(self) -> dict[str, int]:
        if self.colocated_mode:
            return {"prefill": 0, "decode": 0, "colocated": self.colocated}
        return {"prefill": self.prefill, "decode": self.decode, "colocated": 0}

    def overrides(
        self,
        model: str,
        kv_mib: int,
        run_dir: str,
        timeout_s: float = 300.0,
        fetch: bool = True,
    ) -> dict[str, Any]:
        """Launcher settings: the cluster table, workers sharing the cores fairly, and the
        gateway's silence limit raised to the run's: a request queued behind an overload
        is slow, not lost (dead instances are still failed at once, by InstanceDown).
        `fetch=False` turns off the scheduler's cross-instance KV moves (transfer vs
        recompute), so a request only hits what its own instance holds."""
        cluster: dict[str, Any] = {"model": model, "policy": self.policy, "run_dir": run_dir}
        if self.colocated_mode:
            mode = SERVING_MODES[self.mode]
            cluster |= {"mode": mode.base, "caching": mode.cache, "colocated": self.colocated}
        else:
            cluster |= {"mode": self.mode, "prefill": self.prefill, "decode": self.decode}
        return {
            "cluster": cluster,
            "gateway": {"request_timeout_s": timeout_s},
            "scheduler": {"fetch": fetch},
            "worker": {"engine": {"num_threads": 1}},
            "mempool": {"device_memory_bytes": kv_mib << 20, "tensor_memory_bytes": 1 << 20},
        }


def shapes(
    modes: list[str], policies: list[str], *, prefill: int, decode: int, colocated: int
) -> list[Shape]:
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
    if not modes or not policies:
        raise ValueError("give at least one mode and one policy")
    several = len(policies) > 1
    return [
        Shape(m, p, prefill, decode, colocated, f"{m}/{p}" if several else m)
        for m in modes
        for p in policies
    ]


@dataclass
class Options:
    model: str = "small"
    kv_mib: int = 512
    fetch: bool = True  # the scheduler may move KV between instances
    warmup: int = 4
    timeout_s: float = 300.0
    max_requests: int | None = None
    duration_s: float | None = None
    progress: bool | None = None
    run_root: str = ".memserve/bench"
    # Called with each running cluster after its replay (the gateway figures use it).
    after: Callable[[Shape, Any], Any] | None = None


@dataclass
class Experiment:
    name: str
    workload: Workload
    options: Options
    command: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    interrupted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    _load: LoadClient | None = None

    def stop(self) -> None:
        """Ctrl-C: end the running replay, keep its records, run nothing more."""
        self.interrupted = True
        if self._load is not None:
            self._load.stop()

    async def run(self, configs: list[Shape], log: Callable[[str], None] = print) -> None:
        from common.ready import StartupError

        for shape in configs:
            if self.interrupted:
                break
            try:
                await self._run_one(shape, log)
            except StartupError as exc:
                self.error = f"{shape.label}: the cluster did not start: {exc}"
                log(f"[{shape.label}] {self.error}")
                break

    async def _run_one(self, shape: Shape, log: Callable[[str], None]) -> None:
        from services.launcher.config import load
        from services.launcher.supervisor import Cluster

        opts = self.options
        run_dir = f"{opts.run_root}/{shape.label.replace('/', '-')}"
        settings = load(
            None,
            shape.overrides(opts.model, opts.kv_mib, run_dir, opts.timeout_s, opts.fetch),
        )
        log(f"[{shape.label}] starting a cluster ({_instances(shape)}, model {opts.model})")
        async with Cluster(settings) as cluster:
            await warm_up(cluster, opts.warmup)
            if self.interrupted:
                return
            await self._replay(cluster.gateway, shape.label, shape, log)
            if opts.after is not None and not self.interrupted:
                extra = await opts.after(shape, cluster)
                if extra:
                    self.extra[shape.label] = extra

    async def run_against(self, gateway: str, log: Callable[[str], None] = print) -> None:
        """One replay against a cluster that is already running."""
        await self._replay(gateway, "running-cluster", None, log)

    async def _replay(
        self, gateway: str, label: str, shape: Shape | None, log: Callable[[str], None]
    ) -> None:
        """Replay the workload at `gateway` (stop() ends it) and record the run."""
        opts = self.options
        self._load = LoadClient(
            gateway,
            timeout_s=opts.timeout_s,
            max_requests=opts.max_requests,
            duration_s=opts.duration_s,
            progress=opts.progress,
        )
        try:
            result = await self._load.run(self.workload)
        finally:
            self._load = None
        summary = summarize(result.records, result.wall_s)
        self.runs.append(
            {
                "label": label,
                "mode": shape.mode if shape else "",
                "policy": shape.policy if shape else "",
                "instances": shape.instances() if shape else {},
                "summary": summary,
                "unsent": result.unsent,
                "interrupted": result.interrupted,
                "records": result.records,
            }
        )
        log(
            f"[{label}] {summary['requests']} requests ({summary['errors']} errors, "
            f"{result.unsent} unsent) in {result.wall_s:.1f} s: TTFT mean "
            f"{summary['ttft']['mean_ms']:.0f} ms p99 {summary['ttft']['p99_ms']:.0f} ms, "
            f"JCT mean {summary['jct']['mean_ms']:.0f} ms, "
            f"hit rate {100 * summary['hit_rate']:.1f}%"
        )

    def document(self, machine: dict[str, Any]) -> dict[str, Any]:
        """The results document bench/results.py writes out."""
        by_label = {r["label"]: r for r in self.runs}
        comparisons = []
        for spec in comparison_specs(self.workload.name, list(by_label)):
            c = compare(by_label, spec["name"], spec["base"], spec["new"], spec["paper"])
            if c is not None:
                comparisons.append(c)
        return {
            "name": self.name,
            "workload": {
                "name": self.workload.name,
                "summary": self.workload.summary(),
                "params": self.workload.params,
            },
            "machine": machine,
            "command": self.command,
            "options": {
                k: v for k, v in vars(self.options).items() if k not in ("after", "progress")
            },
            "runs": self.runs,
            "comparisons": comparisons,
            "error": self.error,
            "interrupted": self.interrupted,
            **({"extra": self.extra} if self.extra else {}),
        }


async def warm_up(cluster: Any, requests: int) -> None:
    """A few short requests through every path (model pages, sockets, first batches), then
    every cache flushed, so that the measured run starts from cold caches."""
    from common.client import GatewayClient
    from common.sampling import SamplingParams

    if requests <= 0:
        return
    rng = random.Random(12345)
    client = GatewayClient(cluster.gateway, timeout_s=120)
    try:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        prompts = [[1] + [rng.randrange(35, 130) for _ in range(40)] for _ in range(requests)]
        await asyncio.gather(*(client.complete(p, params) for p in prompts))
    finally:
        client.close()
    reply = await cluster.admin("flush-cache", timeout_s=30)
    if not reply.ok:
        raise RuntimeError(f"flush-cache failed: {reply.error}")
    await asyncio.sleep(0.3)  # the flush's KV events reach the scheduler's trees


def _instances(shape: Shape) -> str:
    return ", ".join(f"{n} {role}" for role, n in shape.instances().items() if n)
