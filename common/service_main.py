"""How every service process runs: start, announce readiness, serve until SIGINT/SIGTERM,
close. The services only say how to start and what they serve (a `ServiceShell`,
common/service.py, or anything with `serve` and `close`).

    start() ──ok──▶ Ready(endpoints) to the launcher ──▶ serve() ... signal ──▶ close()
       │                                                    └─fails─▶ close(), logged, exit 1
       └──fails──▶ Failed(error) to the launcher, and the error propagates (exit code 1)
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from common import security
from common.logging import get_logger, setup_logging
from common.protocol.ready import Failed, Ready
from common.ready import signal_ready
from common.security import ClusterKeyConfig

log = get_logger(__name__)


class Service(Protocol):
    async def serve(self) -> None: ...

    async def close(self) -> None: ...


async def run_service(
    kind: str,
    instance_id: str,
    start: Callable[[], Awaitable[tuple[Service, dict[str, str]]]],
    ready_address: str | None = None,
) -> None:
    launcher = launcher_pid()  # first: the launcher may die while the service starts
    try:
        service, endpoints = await start()
    except Exception as exc:
        if ready_address:
            await signal_ready(
                ready_address, Failed(kind, instance_id, f"{type(exc).__name__}: {exc}")
            )
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(service.serve())
    orphaned = None
    if ready_address:
        await signal_ready(ready_address, Ready(kind, instance_id, os.getpid(), endpoints))
        orphaned = asyncio.create_task(stop_when_orphaned(stop, launcher))
    log.info(f"{kind} serving", instance=instance_id, **endpoints)
    try:
        await asyncio.wait(
            [serving, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        if orphaned is not None:
            orphaned.cancel()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await service.close()
        failed = _failure(serving)
        if failed is None:
            log.info(f"{kind} stopped", instance=instance_id)
    if failed is not None:
        # A service never exits quietly: its reason is logged and the exit code is 1 (a
        # launcher that sees 0 takes it for an ordered stop).
        log.error(f"{kind} failed", instance=instance_id, error=repr(failed))
        raise failed


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    """What a finished task raised (None while it runs, or when it returned or was
    cancelled)."""
    if not task.done() or task.cancelled():
        return None
    return task.exception()


def lock_process(key: ClusterKeyConfig) -> None:
    """Install the cluster key `key` names, before the service makes any socket (raises
    `SecurityError` when there is none, or it is unreadable)."""
    security.install(security.load_key(key))


def run_main(kind: str, log_level: str, main: Coroutine[Any, Any, None]) -> None:
    """JSON logs, uvloop where available, then the service's coroutine."""
    setup_logging(kind, json=True, level=log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        pass
    asyncio.run(main)


# Set by a launcher in its children's environment: its own pid.
LAUNCHER_PID_ENV = "MEMSERVE_LAUNCHER_PID"


def launcher_pid() -> int:
    """The process that launched this one: the pid its launcher wrote into the environment
    (known even if the launcher died before this process got this far), else the parent
    now."""
    try:
        return int(os.environ[LAUNCHER_PID_ENV])
    except (KeyError, ValueError):
        return os.getppid()


async def stop_when_orphaned(stop: asyncio.Event, launcher: int, interval_s: float = 0.5) -> None:
    """A launched service outlives no launcher: once its parent is no longer `launcher`
    (killed without stopping us, a crash: we were re-parented), we stop as if told to.
    `launcher` is taken when the process starts, not when serving does: a launcher killed
    in between was taken for the parent, and the service lived on."""
    while os.getppid() == launcher:
        await asyncio.sleep(interval_s)
    log.warning("launcher gone; stopping", launcher_pid=launcher)
    stop.set()
