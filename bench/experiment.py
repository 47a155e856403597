"""The experiment runner: one workload, replayed on each cluster configuration in turn.

For each (mode, policy): start a fresh cluster with `memserve up`'s launcher (cold caches),
warm it up (a few short requests, then every cache flushed, so warm-up leaves nothing to
hit), replay the workload with the open-loop load client, stop the cluster. Every
configuration sees the same workload (same seed, same arrival times).

Modes are the cluster modes plus "colocated-nocache" (colocated with caching off), and
the KunServe evaluation's modes (bench/kunserve_modes.py: dp-recompute, dp-swap,
dp-migrate, kunserve, kunserve-recompute, kunserve-norestore), colocated clusters with one
memory budget per instance; while one of those replays, the scheduler's elastic timeline
is sampled (bench/timeline.py) and kept in the run as "elastic".
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

from bench.kunserve_modes import KUNSERVE_MODES, is_kunserve_mode, merged
from bench.kunserve_modes import overrides as kunserve_overrides
from bench.kunserve_results import any_kunserve, kunserve_figures
from bench.loadgen import LoadClient
from bench.paper import comparison_specs
from bench.results import compare, summarize
from bench.timeline import TimelineSampler
from bench.workloads.model import Workload
from common.modes import MODES as SERVING_MODES

MODES = list(SERVING_MODES)  # the default of `--modes`: MemServe's comparisons
ALL_MODES = MODES + list(KUNSERVE_MODES)
POLICIES = ["locality", "least-load", "round-robin", "session"]


# The replays speak the gateway's protocol: no HTTP API process beside it (one fewer
# process on the cores being measured). `extra={"api": {"enabled": True}}` adds it.
NO_HTTP: dict[str, Any] = {"enabled": False}


@dataclass(frozen=True)
class Shape:
    """One cluster configuration."""

    mode: str
    policy: str = "locality"
    prefill: int = 1
    decode: int = 1
    colocated: int = 2
    label: str = ""
    budget_bytes: int = 0  # KunServe modes: [mempool] budget_bytes per instance

    @property
    def kunserve(self) -> bool:
        return is_kunserve_mode(self.mode)

    @property
    def colocated_mode(self) -> bool:
        return self.kunserve or not SERVING_MODES[self.mode].disaggregated

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
        extra: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Launcher settings: the cluster table, workers sharing the cores fairly, and the
        gateway's silence limit raised to the run's: a request queued behind an overload
        is slow, not lost (dead instances are still failed at once, by InstanceDown).
        `fetch=False` turns off the scheduler's cross-instance KV moves (transfer vs
        recompute), so a request only hits what its own instance holds. A KunServe mode
        sizes the KV by the budget instead of `kv_mib` and sets its elastic keys;
        `extra` (--cluster-set) is applied last, table by table."""
        cluster: dict[str, Any] = {"model": model, "policy": self.policy, "run_dir": run_dir}
        if self.kunserve:
            # Caching on, as `memserve up` runs colocated: every mode alike (the burst's
            # prompts are fresh, so it changes no hit; a recomputed request may hit its own).
            cluster |= {"mode": "colocated", "caching": True, "colocated": self.colocated}
            from bench.elastic_cluster import param_bytes

            tables = kunserve_overrides(
                KUNSERVE_MODES[self.mode], self.budget_bytes, param_bytes=param_bytes(model)
            )
            base = merged(
                {
                    "cluster": cluster,
                    "gateway": {"request_timeout_s": timeout_s},
                    "scheduler": {"fetch": fetch},
                    "worker": {"engine": {"num_threads": 1}},
                    "mempool": {"tensor_memory_bytes": 1 << 20},
                    "api": NO_HTTP,
                },
                tables,
            )
            return merged(base, extra or {})
        if self.colocated_mode:
            mode = SERVING_MODES[self.mode]
            cluster |= {"mode": mode.base, "caching": mode.cache, "colocated": self.colocated}
        else:
            cluster |= {"mode": self.mode, "prefill": self.prefill, "decode": self.decode}
        base = {
            "cluster": cluster,
            "gateway": {"request_timeout_s": timeout_s},
            "scheduler": {"fetch": fetch},
            "worker": {"engine": {"num_threads": 1}},
            "mempool": {"device_memory_bytes": kv_mib << 20, "tensor_memory_bytes": 1 << 20},
            "api": NO_HTTP,
        }
        return merged(base, extra or {})


def shapes(
    modes: list[str],
    policies: list[str],
    *,
    prefill: int,
    decode: int,
    colocated: int,
    budget_bytes: int = 0,
) -> list[Shape]:
    for m in modes:
        if m not in ALL_MODES:
            raise ValueError(f"unknown mode {m!r}; known: {', '.join(ALL_MODES)}")
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
    if not modes or not policies:
        raise ValueError("give at least one mode and one policy")
    several = len(policies) > 1
    return [
        Shape(
            m,
            p,
            prefill,
            decode,
            colocated,
            f"{m}/{p}" if several else m,
            budget_bytes if is_kunserve_mode(m) else 0,
        )
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
    # --cluster-set: SECTION.KEY=VALUE settings every cluster gets, last.
    cluster_set: dict[str, dict[str, Any]] = field(default_factory=dict)
    timeline_poll_s: float = 0.25  # KunServe modes: how often the elastic timeline is read
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
            shape.overrides(
                opts.model, opts.kv_mib, run_dir, opts.timeout_s, opts.fetch, opts.cluster_set
            ),
        )
        log(f"[{shape.label}] starting a cluster ({_instances(shape)}, model {opts.model})")
        async with Cluster(settings) as cluster:
            await warm_up(cluster, opts.warmup)
            if self.interrupted:
                return
            sampler = None
            if shape.kunserve:
                sampler = TimelineSampler(cluster, opts.timeline_poll_s).start()
            await self._replay(cluster.gateway, shape.label, shape, log, sampler)
            if opts.after is not None and not self.interrupted:
                extra = await opts.after(shape, cluster)
                if extra:
                    self.extra[shape.label] = extra

    async def run_against(self, gateway: str, log: Callable[[str], None] = print) -> None:
        """One replay against a cluster that is already running."""
        await self._replay(gateway, "running-cluster", None, log)

    async def _replay(
        self,
        gateway: str,
        label: str,
        shape: Shape | None,
        log: Callable[[str], None],
        sampler: TimelineSampler | None = None,
    ) -> None:
        """Replay the workload at `gateway` (stop() ends it) and record the run; with a
        sampler, the elastic timeline of the replay too."""
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
            if sampler is not None:
                await sampler.stop()
        summary = summarize(result.records, result.wall_s)
        run: dict[str, Any] = {
            "label": label,
            "mode": shape.mode if shape else "",
            "policy": shape.policy if shape else "",
            "instances": shape.instances() if shape else {},
            "summary": summary,
            "unsent": result.unsent,
            "interrupted": result.interrupted,
            "started_wall": result.started_wall,
            "records": result.records,
        }
        if shape is not None and shape.kunserve:
            run["budget_bytes"] = shape.budget_bytes
        if sampler is not None:
            run["elastic"] = sampler.summary(
                result.started_wall, result.started_wall + result.wall_s
            )
        self.runs.append(run)
        log(
            f"[{label}] {summary['requests']} requests ({summary['errors']} errors, "
            f"{result.unsent} unsent) in {result.wall_s:.1f} s: TTFT mean "
            f"{summary['ttft']['mean_ms']:.0f} ms p99 {summary['ttft']['p99_ms']:.0f} ms, "
            f"JCT mean {summary['jct']['mean_ms']:.0f} ms, "
            f"hit rate {100 * summary['hit_rate']:.1f}%"
        )
        if "elastic" in run:
            e = run["elastic"]
            log(
                f"[{label}] elastic: {e['drops']} drops, {e['restores']} restores, "
                f"{e['migrations']} migrations, {e['fallbacks']} fallbacks, "
                f"{e['exchanged_bytes'] / (1 << 20):.1f} MiB exchanged, "
                f"groups served {e['group_s']:.1f} s"
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
            **({"kunserve": kunserve_figures(self.runs)} if any_kunserve(self.runs) else {}),
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
