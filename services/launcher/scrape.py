"""The Prometheus scrape config of a running cluster (pure): one job `memserve`, one
static target per process that reports a `metrics` endpoint in its Ready (any kind: the
services, the api process), labelled with its instance id and kind.

    scrape_configs:
      - job_name: memserve
        metrics_path: /metrics
        static_configs:
          - targets: ["127.0.0.1:40123"]
            labels: {instance: "worker-0", kind: "worker"}

The launcher writes it to `<run_dir>/prometheus.yml` once the cluster is up and again
after each restart (a restart keeps its port, plan.REBIND; the file follows anyway).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

FILE_NAME = "prometheus.yml"
SCRAPE_INTERVAL_S = 5


def targets(children: Iterable[tuple[str, str, dict[str, str]]]) -> list[tuple[str, str, str]]:
    """(host:port, instance id, kind) of every (instance id, kind, endpoints) that reports
    an http `metrics` endpoint, in the order given."""
    out = []
    for instance, kind, endpoints in children:
        url = endpoints.get("metrics", "")
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.netloc:
            out.append((parts.netloc, instance, kind))
    return out


def render(found: list[tuple[str, str, str]], interval_s: int = SCRAPE_INTERVAL_S) -> str:
    """The YAML text (strings written as JSON strings, which YAML reads alike)."""
    lines = [
        "# Written by `memserve up`: every process's /metrics (rewritten on a restart).",
        "global:",
        f"  scrape_interval: {interval_s}s",
        "scrape_configs:",
        "  - job_name: memserve",
        "    metrics_path: /metrics",
        "    static_configs:",
    ]
    for target, instance, kind in found:
        lines += [
            f"      - targets: [{json.dumps(target)}]",
            f"        labels: {{instance: {json.dumps(instance)}, kind: {json.dumps(kind)}}}",
        ]
    if not found:
        lines[-1] = "    static_configs: []"
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    """Replace `path` atomically (a Prometheus reloading it never reads half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
