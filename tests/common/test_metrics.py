"""common/metrics.py and the pieces around it: the instruments, the HTTP server (served,
parsed by prometheus_client's own parser, closed), one real service's scrape (the
scheduler, in this process: names, labels, a placement counted), the scrape config the
launcher writes, and a restart's pinned metrics port."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import Metrics, check_address, serve, split_address
from common.protocol import scheduler as sp
from services.launcher import scrape
from services.launcher.plan import ProcSpec, pinned
from services.scheduler.config import SchedulerConfig
from tests.scheduler.harness import FakeClock, running
from tests.scheduler.helpers import heartbeat, prompt

# Label names a memserve sample may carry: small fixed sets, never ids of requests.
ALLOWED_LABELS = {"instance_id", "role", "model_name", "finished_reason", "tier", "state"}
ALLOWED_LABELS |= {"transport", "policy", "kind", "le"}


def families(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return {f.name: f for f in text_string_to_metric_families(reply.read().decode())}


def test_instruments_export_what_they_counted() -> None:
    m = Metrics({"role": "decode"})
    done = m.counter("memserve:done_total", "ended", ["finished_reason"])
    done.inc(finished_reason="stop")
    done.inc(2, finished_reason="length")
    size = m.gauge("memserve:blocks", "blocks", ["tier"])
    size.replace([({"tier": "device"}, 5), ({"tier": "host"}, 1)])
    size.replace([({"tier": "device"}, 4)])  # host went away
    wait = m.histogram("memserve:wait_seconds", "waits", [0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 3.0):
        wait.observe(v)
    total = m.followed("memserve:swaps_total", "swaps")
    for t in (3, 5, 2, 4):  # 2: its owner was rebuilt and counts from 0 again
        total.follow(t)
    total.follow(6, generation="next")  # a new owner: all 6 are new
    server = serve(m, "127.0.0.1:0")
    assert server is not None
    try:
        got = families(server.url)
    finally:
        server.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in got.values() for s in f.samples
    }
    r = ("role", "decode")
    assert samples[("memserve:done_total", (("finished_reason", "length"), r))] == 2
    assert samples[("memserve:done_total", (("finished_reason", "stop"), r))] == 1
    assert samples[("memserve:blocks", (r, ("tier", "device")))] == 4
    assert ("memserve:blocks", (r, ("tier", "host"))) not in samples
    buckets = {
        s.labels["le"]: s.value for s in got["memserve:wait_seconds"].samples if "le" in s.labels
    }
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4}  # le is inclusive, cumulative
    assert samples[("memserve:wait_seconds_sum", (r,))] == pytest.approx(3.65)
    assert samples[("memserve:swaps_total", (r,))] == 5 + 4 + 6  # never went down
    assert got["memserve:done"].type == "counter"


def test_instruments_refuse_bad_names_labels_and_decrements() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="memserve:"):
        m.gauge("vllm:x", "x")
    c = m.counter("memserve:x_total", "x", ["tier"])
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(request_id="r-1")
    with pytest.raises(ValueError, match="cannot go down"):
        c.inc(-1, tier="device")
    with pytest.raises(ValueError, match="twice"):
        m.counter("memserve:x", "again")


def test_a_multiprocess_dir_in_the_environment_changes_nothing(tmp_path: Path) -> None:
    """prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, here naming a
    folder that does not exist) is not used: a process still serves its own values."""
    code = (
        "from common.metrics import Metrics, serve\n"
        "import urllib.request\n"
        "m = Metrics(); m.counter('memserve:x_total', 'x').inc(3)\n"
        "s = serve(m, '127.0.0.1:0'); assert s is not None\n"
        "print(urllib.request.urlopen(s.url).read().decode()); s.close()\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "absent")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "memserve:x_total 3.0" in out.stdout
    assert not (tmp_path / "absent").exists()


def test_addresses() -> None:
    assert split_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert split_address("[::1]:9100") == ("::1", 9100)
    assert split_address(":9100") == ("0.0.0.0", 9100)
    for bad in ("localhost", "tcp://127.0.0.1:0", "h:99999", "h:x"):
        with pytest.raises(ValueError, match="host:port"):
            split_address(bad)
    check_address("worker.metrics_address", "")  # off
    with pytest.raises(ValueError, match="worker.metrics_address"):
        check_address("worker.metrics_address", "nowhere")
    assert serve(Metrics(), "") is None


def test_close_frees_the_port_and_a_wildcard_advertises_loopback() -> None:
    server = serve(Metrics(), "0.0.0.0:0")
    assert server is not None
    assert server.url.startswith("http://127.0.0.1:")
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    families(server.url)
    server.close()
    with pytest.raises(urllib.error.URLError):
        families(server.url)
    again = serve(Metrics(), f"0.0.0.0:{port}")  # free again: a restart binds it
    assert again is not None and again.url == server.url
    again.close()


async def test_a_scheduler_serves_its_own_metrics() -> None:
    cfg = SchedulerConfig(admin_token="t", heartbeat_timeout_s=5.0).validate()
    async with running(cfg, FakeClock()) as h:
        url = h.svc.endpoints()["metrics"]
        assert url.startswith("http://127.0.0.1:")
        await h.register(heartbeat("colocated-0"))
        placed = await h.rpc.call(sp.Place("r-secret-1", prompt(40), 8), timeout_s=10)
        assert isinstance(placed, sp.Placement)
        got = await asyncio.to_thread(families, url)
        for _ in range(100):  # until the gauges' refresh (every second) saw the instance
            if got["memserve:scheduler_instances"].samples:
                break
            await asyncio.sleep(0.1)
            got = await asyncio.to_thread(families, url)
    for name, fam in got.items():
        assert name.startswith("memserve:"), name
        for s in fam.samples:
            assert set(s.labels) <= ALLOWED_LABELS, s
            assert "r-secret-1" not in s.labels.values(), s
    placements = got["memserve:scheduler_placements"].samples
    assert [(s.labels, s.value) for s in placements] == [
        ({"policy": cfg.policy, "role": "colocated"}, 1.0)
    ]
    up = {
        (s.labels["role"], s.labels["state"]): s.value
        for s in got["memserve:scheduler_instances"].samples
    }
    assert up == {("colocated", "up"): 1.0}
    assert got["memserve:kunserve_groups"].samples == []  # no group formed
    # The port is free once the service closed.
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(families, url)


def test_the_scrape_config_lists_every_process_that_serves_metrics() -> None:
    children = [
        (
            "scheduler",
            "scheduler",
            {"rpc": "tcp://x:1", "metrics": "http://127.0.0.1:9101/metrics"},
        ),
        ("worker-0", "worker", {"metrics": "http://[::1]:9102/metrics"}),
        (
            "api",
            "api",
            {"http": "http://127.0.0.1:8000", "metrics": "http://127.0.0.1:8000/metrics"},
        ),
        ("quiet", "mempool", {"rpc": "tcp://x:2"}),  # metrics off
    ]
    found = scrape.targets(children)
    assert found == [
        ("127.0.0.1:9101", "scheduler", "scheduler"),
        ("[::1]:9102", "worker-0", "worker"),
        ("127.0.0.1:8000", "api", "api"),
    ]
    text = scrape.render(found)
    assert "job_name: memserve" in text and "metrics_path: /metrics" in text
    assert '- targets: ["[::1]:9102"]' in text
    assert 'labels: {instance: "worker-0", kind: "worker"}' in text
    assert "static_configs: []" in scrape.render([])


def test_a_restart_pins_its_metrics_port() -> None:
    spec = ProcSpec(
        "worker", "w", 2, {"address": "tcp://127.0.0.1:0", "metrics_address": "127.0.0.1:0"}
    )
    got = pinned(
        spec, {"requests": "tcp://127.0.0.1:4100", "metrics": "http://127.0.0.1:9109/metrics"}
    )
    assert got == {"address": "tcp://127.0.0.1:4100", "metrics_address": "127.0.0.1:9109"}
