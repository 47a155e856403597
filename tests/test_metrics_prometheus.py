"""Metrics end to end: a real P/D cluster (every kind of process) serves a few requests;
every process's /metrics is scraped over HTTP and parsed with prometheus_client's parser
(names, labels, and every metric the Grafana dashboard queries exists); then a real
Prometheus, started on the scrape config the launcher wrote, scrapes every target and
its answers match what was served (tokens, requests, placements, blocks)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from common.client import Completion, GatewayClient
from common.sampling import SamplingParams
from services.launcher.config import load
from services.launcher.supervisor import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "memserve.json"
DEVICE_BLOCKS = 64
SHARED = [1, *range(40, 88)]  # 49 tokens: three whole blocks for the second turn to hit
PROMPTS = [[*SHARED, 7, 8, 9], [*SHARED, 7, 8, 9], [1, *range(100, 130)]]
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
# Labels an exported sample may carry; anything else (a request id, a prompt) is a leak.
ALLOWED_LABELS = {
    *("instance_id", "role", "model_name", "finished_reason", "tier", "state"),
    *("transport", "policy", "kind", "le", "route", "status"),
}
# What each kind must export (a family name, as the parser names it).
MUST = {
    "gateway": {"memserve:generation_tokens", "memserve:time_to_first_token_seconds"},
    "worker": {"memserve:kv_cache_usage_perc", "memserve:prefix_cache_hits"},
    "mempool": {"memserve:mempool_blocks", "memserve:mempool_transfer_bytes"},
    "scheduler": {"memserve:scheduler_placements", "memserve:kunserve_groups"},
    "api": {"memserve:http_requests", "memserve:http_request_duration_seconds"},
}


class Served:
    def __init__(self, cluster: Cluster, done: list[Completion]) -> None:
        self.cluster = cluster
        self.done = done


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    run = tmp_path_factory.mktemp("metrics")
    settings = load(
        None,
        {
            "cluster": {"mode": "pd-caching-3", "run_dir": str(run), "restart": False},
            "worker": {"engine": {"num_threads": 1}},
            "mempool": {"device_blocks": DEVICE_BLOCKS, "tensor_memory_bytes": 1 << 20},
        },
    )
    async with Cluster(settings) as cluster:
        async with GatewayClient(cluster.gateway, timeout_s=60) as client:
            done = [await client.complete(p, PARAMS) for p in PROMPTS]
        yield Served(cluster, done)


def scrape(url: str) -> dict[str, Any]:
    """Families by name, parsed from one GET of `url`."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def exported_names(families: dict[str, Any]) -> set[str]:
    """The series names a family gives PromQL (a counter's `_total`, a histogram's
    `_bucket` / `_count` / `_sum`), whether or not it has samples yet."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    return {f"{name}{s}" for name, f in families.items() for s in suffixes.get(f.type, [""])}


def targets(cluster: Cluster) -> Iterator[tuple[str, str, str]]:
    for iid, child in cluster.children.items():
        yield iid, child.spec.kind, child.endpoints["metrics"]


async def test_every_process_exports_counts_only(served: Served) -> None:
    """Each process serves its own /metrics on loopback; the names are memserve:'s, the
    labels from the small fixed sets; the gateway's totals match what was served."""
    kinds = set()
    for iid, kind, url in targets(served.cluster):
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), (iid, url)
        families = await asyncio.to_thread(scrape, url)
        assert MUST[kind] <= set(families), (iid, sorted(families))
        for name, fam in families.items():
            assert name.startswith("memserve:"), (iid, name)
            for sample in fam.samples:
                assert set(sample.labels) <= ALLOWED_LABELS, (iid, sample)
        if kind == "worker":
            sample = families["memserve:kv_cache_usage_perc"].samples[0]
            assert sample.labels == {"instance_id": iid, "role": iid[:-2], "model_name": "tiny"}
        kinds.add(kind)
    assert kinds == set(MUST)
    gateway = await asyncio.to_thread(scrape, served.cluster.endpoints("gateway")["metrics"])
    out = sum(c.final.num_output_tokens for c in served.done)
    assert out == len(PROMPTS) * PARAMS.max_tokens
    assert gateway["memserve:generation_tokens"].samples[0].value == out


async def test_the_dashboard_queries_only_exported_metrics(served: Served) -> None:
    exported: set[str] = set()
    for _, _, url in targets(served.cluster):
        exported |= exported_names(await asyncio.to_thread(scrape, url))
    model = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in model["panels"] for t in p.get("targets", []) if t.get("expr")]
    used = {m for e in exprs for m in re.findall(r"memserve:[A-Za-z0-9_:]+", e)}
    assert len(used) >= 15, used
    assert used <= exported, sorted(used - exported)
    assert {"${datasource}", "$datasource"} & {
        str(p.get("datasource", {}).get("uid")) for p in model["panels"]
    }


# ------------------------------------------------------------------ a real Prometheus
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(base: str, path: str, **query: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]


async def until(what: str, check: Any, timeout_s: float = 90.0) -> Any:
    """Poll `check()` until it returns something truthy (Prometheus scrapes on its own
    schedule); fail naming `what` if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        got = await asyncio.to_thread(check)
        if got:
            return got
        if loop.time() > deadline:
            raise AssertionError(f"Prometheus never reported {what}")
        await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("the prometheus binary is not installed (.ci/run installs Debian's)")
    return found


async def test_prometheus_scrapes_every_process(
    served: Served, prometheus_bin: str, tmp_path: Path
) -> None:
    cluster = served.cluster
    config = cluster.scrape_config
    assert config.is_file()
    text = config.read_text()
    assert "job_name: memserve" in text and text.count("targets:") == len(cluster.children)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:

        def all_up() -> list[dict[str, Any]] | None:
            try:
                active = api(base, "/api/v1/targets")["activeTargets"]
            except OSError:
                return None  # not listening yet
            ok = len(active) == len(cluster.children) and all(t["health"] == "up" for t in active)
            return active if ok else None

        active = await until("every target up", all_up)
        assert {(t["labels"]["instance"], t["labels"]["kind"]) for t in active} == {
            (iid, c.spec.kind) for iid, c in cluster.children.items()
        }

        def value(query: str) -> float | None:
            result = api(base, "/api/v1/query", query=query)["result"]
            return float(result[0]["value"][1]) if result else None

        def equals(query: str, expected: float) -> bool:
            return value(query) == expected

        out = sum(c.final.num_output_tokens for c in served.done)
        prompt = sum(c.final.num_prompt_tokens for c in served.done)
        cached = sum(c.final.num_cached_tokens for c in served.done)
        n = len(served.done)
        assert cached > 0  # the second turn hit the first one's prefix
        expect = {
            "sum(memserve:generation_tokens_total)": out,
            "sum(memserve:prompt_tokens_total)": prompt,
            "sum(memserve:prompt_tokens_cached_total)": cached,
            'sum(memserve:request_success_total{finished_reason="length"})': n,
            "sum(memserve:e2e_request_latency_seconds_count)": n,
            "sum(memserve:time_to_first_token_seconds_count)": n,
            "sum(memserve:pd_handoff_gap_seconds_count)": n,
            'sum(memserve:scheduler_placements_total{role="prefill"})': n,
            'sum(memserve:scheduler_placements_total{role="decode"})': n,
            'sum(memserve:prefix_cache_queries_total{role="prefill"})': prompt,
            'sum(memserve:prefix_cache_hits_total{role="prefill"})': cached,
            'count(memserve:mempool_blocks{tier="device",state="capacity"} == 64)': 2,
            "sum(memserve:num_requests_inflight)": 0,
            'sum(memserve:scheduler_instances{state="up"})': 2,
        }
        for query, expected in expect.items():
            await until(f"{query} == {expected}", lambda q=query, e=expected: equals(q, e))
        # Cached prefixes hold device blocks: the usage gauge of some worker is above 0.
        await until("kv usage > 0", lambda: value("max(memserve:kv_cache_usage_perc)"))
        await until(
            "KV moved by a transport",
            lambda: value('sum(memserve:mempool_transfer_bytes_total{transport="shm"})'),
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
