"""The asyncio half of a service, written once: the loops it serves until told to stop, and
the background tasks it spawns on the way.

    serve():  loops() run together ──▶ until stop(), or until one returns or fails
                                        ──▶ the others are cancelled and awaited
    close():  closing() ──▶ spawned tasks get `drain_s` to finish, the rest are cancelled
              ──▶ close_sockets()

common/service_main.py runs a service: it calls serve() until SIGINT / SIGTERM (or
serve() returns), then close().

Invariants: when serve() returns, none of its loops runs; when close() returns, no task
spawned through `tasks` runs; a loop or task that fails is logged, never lost (a failed
loop also ends serve() with its exception).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import Any, ClassVar

from common.logging import get_logger

log = get_logger(__name__)


class TaskSet:
    """Background tasks of one owner, each held until it ends.

    asyncio keeps only a weak reference to a running task, so a task nobody holds may be
    collected before it ends; the set holds each one until it is done, then forgets it.
    Nobody awaits these tasks, so a failure is logged here (a cancellation is not one).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "background task failed",
                owner=self.owner,
                task=_name(task),
                error=repr(exc),
                exc_info=exc,
            )

    async def close(self, drain_s: float = 0.0) -> None:
        """Give the tasks up to `drain_s` seconds to finish, cancel the rest, and wait
        until every one has ended (tasks spawned meanwhile included)."""
        if self._tasks and drain_s > 0:
            await asyncio.wait(list(self._tasks), timeout=drain_s)
        while self._tasks:
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


class ServiceShell(ABC):
    """A service's asyncio shell: it owns the sockets and moves messages between them and
    the service's pure core. Subclasses say what they serve (`loops`) and what they close
    (`close_sockets`); `closing` is the hook for failing what is in flight first."""

    kind: ClassVar[str]  # "gateway", "scheduler", ...: names the service in logs
    # How long spawned tasks may run on at close() (e.g. to send aborts and releases).
    drain_s: ClassVar[float] = 0.0

    def __init__(self) -> None:
        self.tasks = TaskSet(self.kind)
        self._stop = asyncio.Event()

    @abstractmethod
    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """The coroutines serve() runs together (receive loops, tickers, RPC servers)."""

    @abstractmethod
    def close_sockets(self) -> None:
        """Close every socket the shell owns (the last step of close())."""

    async def closing(self) -> None:
        """Runs first in close(), while spawned tasks still run: fail what is in flight.
        By default there is nothing to fail."""
        return

    def stop(self, after_s: float = 0.0) -> None:
        """Make serve() return; `after_s` > 0 lets a reply already on its way go out first
        (stopping at once would cancel the handler sending it)."""
        if after_s > 0:
            asyncio.get_running_loop().call_later(after_s, self._stop.set)
        else:
            self._stop.set()

    async def serve(self) -> None:
        """Serve until closed, stop(), or until a loop returns or fails (then raise its
        exception, after logging it)."""
        running = [asyncio.create_task(c) for c in self.loops()]
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([*running, stop], return_when=asyncio.FIRST_COMPLETED)
            for task in running:
                exc = task.exception() if task.done() and not task.cancelled() else None
                if exc is not None:
                    log.error(f"{self.kind} loop failed", loop=_name(task), error=repr(exc))
                    raise exc
        finally:
            for t in [*running, stop]:
                t.cancel()
            await asyncio.gather(*running, stop, return_exceptions=True)

    async def close(self) -> None:
        """closing(), then the spawned tasks (given `drain_s`), then the sockets."""
        await self.closing()
        await self.tasks.close(self.drain_s)
        self.close_sockets()


def _name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", task.get_name())
