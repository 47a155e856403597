"""Readiness handshake with real child processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from common.protocol.ready import Failed, Ready
from common.ready import ReadyWaiter, StartupError, signal_ready

pytestmark = pytest.mark.integration

CHILD = """
import asyncio, os, sys
from common.protocol.ready import Failed, Ready
from common.ready import signal_ready
from common.security import install, read_key_file

install(read_key_file(os.environ["MEMSERVE_CLUSTER__KEY_FILE"]))
address, instance, mode = sys.argv[1:4]
if mode == "ready":
    msg = Ready(service="worker", instance_id=instance, pid=os.getpid(),
                endpoints={"rpc": "tcp://127.0.0.1:7001"})
    asyncio.run(signal_ready(address, msg, timeout_s=5))
elif mode == "failed":
    msg = Failed(service="worker", instance_id=instance, error="CUDA out of memory on gpu 0")
    asyncio.run(signal_ready(address, msg, timeout_s=5))
    sys.exit(1)
else:
    sys.exit(3)
"""


@pytest.fixture
def waiter() -> Iterator[ReadyWaiter]:
    with ReadyWaiter() as w:
        yield w


def spawn(address: str, instance: str, mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", CHILD, address, instance, mode])


def alive_of(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, bool]:
    return {instance: proc.poll() is None for instance, proc in procs.items()}


async def test_children_report_ready(waiter: ReadyWaiter) -> None:
    procs = {name: spawn(waiter.address, name, "ready") for name in ("w0", "w1")}
    try:
        ready = await waiter.wait(procs, timeout_s=20, alive=lambda: alive_of(procs))
    finally:
        for proc in procs.values():
            proc.wait(timeout=10)
    assert set(ready) == {"w0", "w1"}
    for name, msg in ready.items():
        assert msg == Ready(
            service="worker",
            instance_id=name,
            pid=procs[name].pid,
            endpoints={"rpc": "tcp://127.0.0.1:7001"},
        )


async def test_child_that_dies_silently_is_named_quickly(waiter: ReadyWaiter) -> None:
    procs = {"w0": spawn(waiter.address, "w0", "ready"), "w1": spawn(waiter.address, "w1", "die")}
    start = time.monotonic()
    try:
        with pytest.raises(StartupError) as info:
            await waiter.wait(procs, timeout_s=30, alive=lambda: alive_of(procs))
    finally:
        for proc in procs.values():
            proc.wait(timeout=10)
    assert time.monotonic() - start < 10  # long before the 30 s timeout
    assert info.value.dead == ["w1"]
    assert "w1 exited without reporting ready" in str(info.value)
    assert "w0" not in info.value.dead


async def test_failed_message_carries_the_error(waiter: ReadyWaiter) -> None:
    procs = {"w0": spawn(waiter.address, "w0", "failed")}
    try:
        with pytest.raises(StartupError) as info:
            await waiter.wait(procs, timeout_s=20, alive=lambda: alive_of(procs))
    finally:
        procs["w0"].wait(timeout=10)
    # The child exits right after signalling: its message still wins over its death.
    assert info.value.failed == {"w0": "CUDA out of memory on gpu 0"}
    assert info.value.dead == []
    assert str(info.value) == "startup failed: w0 failed: CUDA out of memory on gpu 0"


async def test_timeout_names_missing_instances(waiter: ReadyWaiter) -> None:
    start = time.monotonic()
    with pytest.raises(StartupError, match=r"not ready after 0.3 s: a, b") as info:
        await waiter.wait(["b", "a"], timeout_s=0.3)
    assert 0.3 <= time.monotonic() - start < 2
    assert info.value.missing == ["a", "b"]


async def test_groups_waited_for_one_after_another(waiter: ReadyWaiter) -> None:
    await signal_ready(waiter.address, Ready(service="s", instance_id="later", pid=1))
    await signal_ready(waiter.address, Ready(service="s", instance_id="first", pid=2))
    assert await waiter.wait(["first"], timeout_s=5) == {
        "first": Ready(service="s", instance_id="first", pid=2)
    }
    # Reported while the first group was awaited; kept for its own wait.
    assert await waiter.wait(["later"], timeout_s=0.01) == {
        "later": Ready(service="s", instance_id="later", pid=1)
    }


async def test_signal_ready_times_out_without_launcher(tmp_path: object) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not take the Failed message within 0.2 s"):
        await signal_ready(
            f"ipc://{tmp_path}/nobody", Failed(service="s", instance_id="x", error="e"), 0.2
        )
    assert time.monotonic() - start < 2
