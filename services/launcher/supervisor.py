"""Start a planned cluster as child processes, wait for every readiness handshake, keep
it running, and stop it cleanly (reverse start order: SIGTERM, then SIGKILL after
`stop_timeout_s`).

Each child is `python -m services.cli <kind> --ready ADDR`, configured by environment
variables (plan.env_for) and logging to `<run_dir>/<instance>.log`.

Supervision (`wait`): a child that crashes (restart.py says which exits are crashes) is
started again after its backoff, on the endpoints it had (plan.pinned): its peers'
ZeroMQ sockets reconnect by themselves, and the gateway's client address stays the
same. Each restart waits for its readiness handshake on a ReadyWaiter of its own, in a
task of its own, so one slow restart holds up neither the others nor the watch. A
scheduler or gateway that exits 0 (an admin `shutdown`) still ends the cluster.
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
from common.service_main import LAUNCHER_PID_ENV
from services.launcher import scrape
from services.launcher.config import ClusterSettings
from services.launcher.keys import prepare_key
from services.launcher.plan import ProcSpec, env_for, pinned, plan, stable_endpoints
from services.launcher.restart import Backoff, Verdict, verdict

log = get_logger(__name__)


@dataclass
class Child:
    spec: ProcSpec
    proc: subprocess.Popen[bytes]
    log_path: Path
    endpoints: dict[str, str] = field(default_factory=dict)
    backoff: Backoff = field(default_factory=Backoff)
    started: float = field(default_factory=time.monotonic)
    reported: bool = False  # its exit was logged and it stays down

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
        self._restarts: dict[str, asyncio.Task[None]] = {}  # instance -> its restart
        self.restarts = 0  # restarts that reached the readiness handshake

    @property
    def gateway(self) -> str:
        return self.children["gateway"].endpoints["clients"]

    @property
    def http(self) -> str | None:
        """The OpenAI HTTP API's base URL (None when `[api] enabled = false`)."""
        api = self.children.get("api")
        return api.endpoints.get("http") if api is not None else None

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

    @property
    def scrape_config(self) -> Path:
        """Prometheus's scrape config of this cluster (services/launcher/scrape.py)."""
        return self.run_dir / scrape.FILE_NAME

    def metrics_targets(self) -> list[tuple[str, str, str]]:
        """(host:port, instance id, kind) of every child serving /metrics."""
        return scrape.targets((i, c.spec.kind, c.endpoints) for i, c in self.children.items())

    def write_scrape_config(self) -> None:
        scrape.write(self.scrape_config, scrape.render(self.metrics_targets()))

    def explain(self, exc: StartupError) -> None:
        """Add where the logs are to `exc`, and for each process that died before
        reporting, the last line of its log: it says why only there (a traceback's
        error, or its last structured record)."""
        words = [f"{i}: {self._last_line(i)}" for i in exc.dead if self._last_line(i)]
        last = "".join(f"\n  {w}" for w in words)
        exc.args = (f"{exc}; logs in {self.run_dir}{last}",)

    def _last_line(self, instance: str, limit: int = 400) -> str:
        """The last non-empty line of `instance`'s log (at most `limit` characters)."""
        try:
            with open(self.run_dir / f"{instance}.log", "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
                tail = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        return lines[-1][:limit] if lines else ""

    async def start(self) -> Cluster:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.waiter = ReadyWaiter()
        try:
            for stage in sorted({s.stage for s in self.specs}):
                group = [s for s in self.specs if s.stage == stage]
                for spec in group:
                    self._spawn(spec, dict(spec.settings), self.waiter.address)
                ids = [s.instance_id for s in group]
                ready = await self.waiter.wait(
                    ids,
                    timeout_s=self.cfg.ready_timeout_s,
                    alive=lambda: {i: c.alive for i, c in self.children.items()},
                )
                for instance, report in ready.items():
                    self.children[instance].endpoints = dict(report.endpoints)
            self.write_scrape_config()
        except BaseException as exc:
            if isinstance(exc, StartupError):
                self.explain(exc)
            await self.stop()
            raise
        return self

    def _spawn(self, spec: ProcSpec, settings: dict[str, object], ready: str) -> Child:
        for key, (instance, endpoint) in spec.links.items():
            settings[key] = self.children[instance].endpoints[endpoint]
        env = {
            **os.environ,
            **self.key_env,
            **env_for(spec.kind, {"instance_id": spec.instance_id, **settings}),
        }
        env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        env[LAUNCHER_PID_ENV] = str(os.getpid())  # the child's watch on us (service_main)
        log_path = self.run_dir / f"{spec.instance_id}.log"
        with log_path.open("ab") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", spec.kind, "--ready", ready],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops them in order
            )
        old = self.children.get(spec.instance_id)
        child = Child(spec, proc, log_path)
        if old is not None:  # a restart: same endpoints expected, same backoff history
            child.endpoints, child.backoff = old.endpoints, old.backoff
        else:
            child.backoff = Backoff(
                self.cfg.restart_backoff_s,
                self.cfg.restart_backoff_max_s,
                self.cfg.restart_stable_s,
            )
        self.children[spec.instance_id] = child
        return child

    def exited(self) -> list[Child]:
        return [c for c in self.children.values() if not c.alive]

    def restarting(self) -> list[str]:
        """Instances waiting for, or in, a restart."""
        return sorted(self._restarts)

    async def wait(self, stop: asyncio.Event) -> str:
        """Run until `stop` is set, or until the scheduler or gateway exits 0 (an admin
        `shutdown` ends with both). Returns why. A child that crashes is restarted (with
        `cluster.restart`; restart.py); a worker or daemon that exits 0 is reported and
        stays down, and the cluster keeps serving on the others (the scheduler drops it)."""
        while not stop.is_set():
            for child in self.exited():
                instance = child.spec.instance_id
                if child.reported or instance in self._restarts:
                    continue
                code = child.proc.returncode
                match verdict(child.spec.kind, code, self.cfg.restart):
                    case Verdict.STOP_CLUSTER:
                        return f"{instance} exited with code {code}"
                    case Verdict.REPORT:
                        child.reported = True
                        log.warning(
                            "process exited", instance=instance, code=code, log=str(child.log_path)
                        )
                    case Verdict.RESTART:
                        delay = child.backoff.next_delay(time.monotonic() - child.started)
                        log.warning(
                            "process crashed; restarting it",
                            instance=instance,
                            code=code,
                            attempt=child.backoff.attempt,
                            backoff_s=delay,
                            log=str(child.log_path),
                        )
                        self._restarts[instance] = asyncio.create_task(
                            self._restart(instance, delay), name=f"restart-{instance}"
                        )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        return "stop requested"

    async def _restart(self, instance: str, delay: float) -> None:
        """Start `instance` again after `delay`, until one start reaches its readiness
        handshake (each failed start backs off further). Cancelled by `stop()`; the child
        it started is in `children` from its spawn on, so `stop()` ends it."""
        try:
            while True:
                await asyncio.sleep(delay)
                if await self._respawn(instance):
                    return
                child = self.children[instance]
                delay = child.backoff.next_delay(0.0)
                log.warning(
                    "restart failed; trying again",
                    instance=instance,
                    attempt=child.backoff.attempt,
                    backoff_s=delay,
                    log=str(child.log_path),
                )
        finally:
            self._restarts.pop(instance, None)

    async def _respawn(self, instance: str) -> bool:
        old = self.children[instance]
        down_since = time.monotonic()
        with ReadyWaiter() as waiter:  # its own: the cluster's waiter keeps the old Ready
            child = self._spawn(old.spec, pinned(old.spec, old.endpoints), waiter.address)
            try:
                ready = await waiter.wait(
                    [instance],
                    timeout_s=self.cfg.ready_timeout_s,
                    alive=lambda: {instance: child.alive},
                )
            except StartupError as exc:
                log.warning("restart did not come up", instance=instance, error=str(exc))
                if child.alive:
                    child.proc.kill()
                await asyncio.to_thread(child.proc.wait)
                return False
        endpoints = dict(ready[instance].endpoints)
        if stable_endpoints(old.spec.kind, endpoints) != stable_endpoints(
            old.spec.kind, old.endpoints
        ):
            log.warning("restarted on other endpoints", instance=instance, endpoints=endpoints)
        child.endpoints = endpoints
        child.started = time.monotonic()
        self.restarts += 1
        self.write_scrape_config()  # (its port is pinned; a changed one is followed too)
        log.info(
            "process restarted",
            instance=instance,
            pid=child.proc.pid,
            attempt=child.backoff.attempt,
            ready_after_s=round(child.started - down_since, 3),
        )
        return True

    async def stop(self) -> None:
        """Pending restarts are cancelled first; then the gateway (no new requests), the
        workers, the daemons and the scheduler."""
        restarts = list(self._restarts.values())
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
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
