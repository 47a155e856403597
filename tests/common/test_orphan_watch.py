"""A launched service stops when its launcher is gone (common/service_main.py): the
launcher is the pid it wrote into the environment, so one killed while the service was
still starting is noticed as well (it used to be read when serving began, by which time
the service could already have been re-parented: it then lived on)."""

from __future__ import annotations

import asyncio
import os

import pytest

from common.service_main import LAUNCHER_PID_ENV, launcher_pid, stop_when_orphaned


def test_the_launcher_is_the_pid_it_wrote_else_the_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LAUNCHER_PID_ENV, "4242")
    assert launcher_pid() == 4242
    monkeypatch.setenv(LAUNCHER_PID_ENV, "not a pid")
    assert launcher_pid() == os.getppid()
    monkeypatch.delenv(LAUNCHER_PID_ENV)
    assert launcher_pid() == os.getppid()


async def test_a_launcher_gone_before_the_watch_began_stops_the_service() -> None:
    stop = asyncio.Event()
    gone = os.getppid() + 1_000_000  # not our parent: it died, and we were re-parented
    await asyncio.wait_for(stop_when_orphaned(stop, gone, interval_s=0.01), 5)
    assert stop.is_set()


async def test_a_live_launcher_is_watched_not_left() -> None:
    stop = asyncio.Event()
    watch = asyncio.create_task(stop_when_orphaned(stop, os.getppid(), interval_s=0.01))
    await asyncio.sleep(0.1)  # ten looks at the parent
    assert not watch.done() and not stop.is_set()
    watch.cancel()
