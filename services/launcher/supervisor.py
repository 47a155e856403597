"""Start a planned cluster as child processes, wait for every readiness handshake, and stop
it cleanly (reverse start order: SIGTERM, then SIGKILL after `stop_timeout_s`).

Each child is `python -m services.cli <kind> --ready ADDR`, configured by environment
variables (plan.env_for) and logging to `<run_dir>/<instance>.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.admin_client import admin_call
from common.logging import get_logger
from common.protocol.admin import AdminReply
from common.ready import ReadyWaiter, StartupError
from services.launcher.config import ClusterSettings
from services.launcher.keys import prepare_key
from services.launcher.plan import ProcSpec, env_for, plan

log = get_logger(__name__)


@dataclass
class Child:
    spec: ProcSpec
    proc: subprocess.Popen[bytes]
    log_path: Path
    endpoints: dict[str, str] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class Cluster:
    """A running cluster. `start()` returns once every process is ready (or raises
    `StartupError` after stopping what did start)."""

    def __init__(self, settings: ClusterSettings):
        self.settings = settings
        self.cfg = settings.cluster
        self.admin_token = self.cfg.admin_token or secrets.token_urlsafe(16)
        self.specs = plan(settings, self.admin_token)
        self.key_env = prepare_key(self.cfg)
        self.children: dict[str, Child] = {}
        self.run_dir = Path(self.cfg.run_dir)
        self.waiter: ReadyWaiter | None = None

    @property
    def gateway(self) -> str:
        return self.children["gateway"].endpoints["clients"]

    @property
    def admin_address(self) -> str:
        return self.children["scheduler"].endpoints["admin"]

    async def admin(self, command: str, *args: str, timeout_s: float = 10.0) -> AdminReply:
        """An admin command on the scheduler, with this cluster's token."""
        return await admin_call(
            self.admin_address, self.admin_token, command, args, timeout_s=timeout_s
        )

    def endpoints(self, instance_id: str) -> dict[str, str]:
        return self.children[instance_id].endpoints

    async def start(self) -> Cluster:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.waiter = ReadyWaiter()
        try:
            for stage in sorted({s.stage for s in self.specs}):
                group = [s for s in self.specs if s.stage == stage]
                for spec in group:
                    self._spawn(spec)
                ids = [s.instance_id for s in group]
                ready = await self.waiter.wait(
                    ids,
                    timeout_s=self.cfg.ready_timeout_s,
                    alive=lambda: {i: c.alive for i, c in self.children.items()},
                )
                for instance, report in ready.items():
                    self.children[instance].endpoints = dict(report.endpoints)
        except BaseException as exc:
            if isinstance(exc, StartupError):
                exc.args = (f"{exc}; logs in {self.run_dir}",)
            await self.stop()
            raise
        return self

    def _spawn(self, spec: ProcSpec) -> None:
        assert self.waiter is not None
        settings = dict(spec.settings)
        for key, (instance, endpoint) in spec.links.items():
            settings[key] = self.children[instance].endpoints[endpoint]
        env = {
            **os.environ,
            **self.key_env,
            **env_for(spec.kind, {"instance_id": spec.instance_id, **settings}),
        }
        env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        log_path = self.run_dir / f"{spec.instance_id}.log"
        with log_path.open("ab") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", spec.kind, "--ready", self.waiter.address],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops them in order
            )
        self.children[spec.instance_id] = Child(spec, proc, log_path)

    def exited(self) -> list[Child]:
        return [c for c in self.children.values() if not c.alive]

    async def wait(self, stop: asyncio.Event) -> str:
        """Run until `stop` is set or the scheduler or gateway exits (an admin `shutdown`
        ends with both). Returns why. Workers or daemons that die are reported, and the
        cluster keeps serving on the others (the scheduler drops them)."""
        reported: set[str] = set()
        while not stop.is_set():
            for child in self.exited():
                if child.spec.instance_id in reported:
                    continue
                reported.add(child.spec.instance_id)
                code = child.proc.returncode
                if child.spec.kind in ("scheduler", "gateway"):
                    return f"{child.spec.instance_id} exited with code {code}"
                log.warning(
                    "process exited",
                    instance=child.spec.instance_id,
                    code=code,
                    log=str(child.log_path),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        return "stop requested"

    async def stop(self) -> None:
        """Gateway first (no new requests), then workers, daemons and the scheduler."""
        for stage in sorted({s.stage for s in self.specs}, reverse=True):
            group = [c for c in self.children.values() if c.spec.stage == stage]
            for c in group:
                if c.alive:
                    c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.cfg.stop_timeout_s
            for c in group:
                try:
                    await asyncio.to_thread(c.proc.wait, max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("process did not stop; killing it", instance=c.spec.instance_id)
                    c.proc.kill()
                    await asyncio.to_thread(c.proc.wait)
        if self.waiter is not None:
            self.waiter.close()
            self.waiter = None

    async def __aenter__(self) -> Cluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
