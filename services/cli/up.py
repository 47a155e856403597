"""`memserve up --config deploy/local.toml`: start a whole cluster on this machine, print
where to connect, restart any process that crashes (services/launcher/supervisor.py), and
stop it cleanly on Ctrl-C / SIGTERM (or an admin `shutdown`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from common.cli_errors import fail
from common.config import ConfigError
from common.ready import StartupError
from services.cli import local_cluster


def add_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="start a whole cluster on this machine")
    p.add_argument("--config", default=None, help="cluster file (e.g. deploy/local.toml)")
    p.add_argument("--mode", default=None, help="override cluster.mode")
    p.add_argument("--policy", default=None, help="override cluster.policy")
    p.add_argument("--model", default=None, help="override cluster.model")
    p.add_argument("--prefill", type=int, default=None)
    p.add_argument("--decode", type=int, default=None)
    p.add_argument("--colocated", type=int, default=None)
    p.set_defaults(func=run)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("mode", "policy", "model", "prefill", "decode", "colocated")
    values = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    return {"cluster": values} if values else {}


def run(args: argparse.Namespace) -> int:
    from services.launcher.config import load

    try:
        settings = load(args.config, overrides(args))
    except (ConfigError, ValueError) as exc:
        return fail(str(exc))
    try:
        return asyncio.run(_up(settings))
    except StartupError as exc:
        return fail(str(exc))


async def _up(settings: Any) -> int:
    from services.launcher.config import kv_capacity
    from services.launcher.supervisor import Cluster

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cluster = Cluster(settings)
    start = asyncio.create_task(cluster.start())
    waiting = asyncio.create_task(stop.wait())
    await asyncio.wait([start, waiting], return_when=asyncio.FIRST_COMPLETED)
    if not start.done():  # Ctrl-C while starting
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        await cluster.stop()
        return 130
    waiting.cancel()
    start.result()
    c = settings.cluster
    roles = ", ".join(f"{i}" for i in cluster.children if i not in ("scheduler", "gateway", "api"))
    print(f"memserve cluster up: mode {c.mode}, policy {c.policy}, model {c.model}", flush=True)
    print(f"  gateway   {cluster.gateway}   (memserve chat --gateway {cluster.gateway})")
    if cluster.http:
        print(f"  http      {cluster.http}   (OpenAI API: /v1/chat/completions)")
    state = local_cluster.write(cluster.run_dir, _state(settings, cluster))
    # The token is a secret: it goes to the 0600 state file, never to the terminal.
    print(f"  admin     {cluster.admin_address}   (token in {state})")
    print(f"  instances {roles}")
    geometry, blocks = kv_capacity(settings)
    print(
        f"  kv        {blocks} blocks of {geometry.block_size} tokens per instance "
        f"({geometry.block_bytes:,} bytes each, {geometry.dtype})"
    )
    if c.restart:
        print(
            f"  restarts  a crashed process, on its addresses "
            f"(backoff {c.restart_backoff_s:g}-{c.restart_backoff_max_s:g} s)"
        )
    key = cluster.key_env.get("MEMSERVE_CLUSTER__KEY_FILE", "from MEMSERVE_CLUSTER__SECRET_KEY")
    print(f"  key       {key}")
    n = len(cluster.metrics_targets())
    print(f"  metrics   {n} targets, scrape config {cluster.scrape_config}")
    print(f"  logs      {cluster.run_dir}/", flush=True)
    print(f"  clients   memserve admin status | memserve chat   (they read {state})", flush=True)
    try:
        why = await cluster.wait(stop)
    finally:
        local_cluster.remove(cluster.run_dir)
        await cluster.stop()
    print(f"memserve cluster stopped ({why})", flush=True)
    return 0


def _state(settings: Any, cluster: Any) -> local_cluster.LocalCluster:
    """What `memserve admin` / `chat` / `generate` need to find this cluster."""
    endpoints = [child.endpoints for child in cluster.children.values()]
    return local_cluster.LocalCluster(
        pid=os.getpid(),
        gateway=cluster.gateway,
        admin_address=cluster.admin_address,
        admin_token=cluster.admin_token,
        model=settings.cluster.model,
        mode=settings.cluster.mode,
        http=cluster.http or "",
        metrics=[e["metrics"] for e in endpoints if "metrics" in e],
    )
