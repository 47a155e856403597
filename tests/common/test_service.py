"""The service scaffold: a TaskSet holds its tasks until they end, logs the ones that fail
and cancels what is left at close; a ServiceShell serves its loops until stop(), or until
one ends or fails, and closes in order (in-flight work, spawned tasks, sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from structlog.testing import capture_logs

from common.service import ServiceShell, TaskSet


async def test_a_task_set_forgets_what_ended_and_logs_what_failed() -> None:
    tasks = TaskSet("test")
    done = asyncio.Event()

    async def fine() -> None:
        done.set()

    async def boom() -> None:
        raise ValueError("boom")

    with capture_logs() as logs:
        ok, failed = tasks.spawn(fine()), tasks.spawn(boom())
        assert len(tasks) == 2
        await asyncio.gather(ok, failed, return_exceptions=True)
        await asyncio.sleep(0)  # the done callbacks run after the awaiting task resumes
    assert len(tasks) == 0 and done.is_set()
    [failure] = [e for e in logs if e["event"] == "background task failed"]
    assert failure["owner"] == "test" and "boom" in failure["error"]
    assert failure["task"].endswith("boom")


async def test_close_lets_tasks_finish_within_the_drain_then_cancels_the_rest() -> None:
    tasks = TaskSet("test")
    finished: list[str] = []
    cancelled: list[str] = []

    async def work(name: str, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
            finished.append(name)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    tasks.spawn(work("quick", 0.0))
    tasks.spawn(work("stuck", 60.0))
    with capture_logs() as logs:
        await tasks.close(drain_s=5.0)  # returns once "quick" ends: nothing waits for 5 s
    assert (finished, cancelled, len(tasks)) == (["quick"], ["stuck"], 0)
    assert logs == []  # a cancellation is not a failure


class Shell(ServiceShell):
    kind = "test"

    def __init__(self, *loops: Coroutine[Any, Any, None]) -> None:
        super().__init__()
        self._loops = list(loops)
        self.steps: list[str] = []

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        return self._loops

    async def closing(self) -> None:
        self.steps.append(f"closing with {len(self.tasks)} task(s)")

    def close_sockets(self) -> None:
        self.steps.append(f"sockets with {len(self.tasks)} task(s)")


async def forever(ran: list[str], name: str) -> None:
    ran.append(name)
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        ran.append(f"{name} cancelled")
        raise


async def test_serve_runs_every_loop_until_stop_and_close_goes_in_order() -> None:
    ran: list[str] = []
    shell = Shell(forever(ran, "a"), forever(ran, "b"))
    serving = asyncio.create_task(shell.serve())
    await asyncio.sleep(0.01)
    shell.tasks.spawn(asyncio.sleep(3600))
    shell.stop(after_s=0.01)
    await asyncio.wait_for(serving, 5)
    assert sorted(ran) == ["a", "a cancelled", "b", "b cancelled"]
    await shell.close()
    assert shell.steps == ["closing with 1 task(s)", "sockets with 0 task(s)"]


async def test_a_loop_that_fails_ends_serve_with_its_error_and_is_logged() -> None:
    ran: list[str] = []

    async def broken() -> None:
        raise RuntimeError("loop bug")

    shell = Shell(forever(ran, "a"), broken())
    with capture_logs() as logs, pytest.raises(RuntimeError, match="loop bug"):
        await asyncio.wait_for(shell.serve(), 5)
    assert ran == ["a", "a cancelled"]
    [failure] = [e for e in logs if e["event"] == "test loop failed"]
    assert failure["loop"].endswith("broken") and "loop bug" in failure["error"]


async def test_a_loop_that_returns_ends_serve() -> None:
    ran: list[str] = []

    async def short() -> None:
        ran.append("short")

    await asyncio.wait_for(Shell(forever(ran, "a"), short()).serve(), 5)
    assert sorted(ran) == ["a", "a cancelled", "short"]
