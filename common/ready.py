"""Readiness handshake between the launcher and the processes it starts.

Launcher: a ``ReadyWaiter`` binds a PULL socket; its ``.address`` goes on each child's
command line; ``wait`` returns once every expected instance reported ``Ready``. It raises
``StartupError`` as soon as one instance reported ``Failed`` or died without reporting, or
when the timeout passes; the error names each instance and what became of it.

Child: ``signal_ready(address, Ready(...))`` once everything it serves is bound, or
``signal_ready(address, Failed(...))`` before exiting on a start-up error. It returns once
ZeroMQ has handed the message to the kernel, so a child may exit right after signalling
without losing it.

Liveness: ``wait`` polls the ``alive`` callback every ``POLL_INTERVAL_S`` and drains the
socket once more before calling a process dead, so a ``Failed`` sent just before exiting
is reported as that failure, not as a silent death.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from types import TracebackType

import zmq

from common.codec import DecodeError, encode
from common.logging import get_logger
from common.protocol.ready import Failed, Ready, ReadyMessage
from common.security import CLUSTER
from common.sockets import PullSocket, get_context

POLL_INTERVAL_S = 0.1
# How long a message sent just before a process exited may still be in flight.
_LAST_WORDS_S = 0.2

log = get_logger(__name__)


class StartupError(RuntimeError):
    """Some instances did not come up: ``failed`` (id -> error), ``dead``, ``missing``.

    ``timeout_s`` is set when the wait timed out, None when it stopped early on a failure.
    """

    def __init__(
        self,
        *,
        failed: Mapping[str, str],
        dead: Collection[str],
        missing: Collection[str],
        timeout_s: float | None,
    ) -> None:
        self.failed = dict(sorted(failed.items()))
        self.dead = sorted(dead)
        self.missing = sorted(missing)
        parts = [f"{instance} failed: {error}" for instance, error in self.failed.items()]
        parts += [f"{instance} exited without reporting ready" for instance in self.dead]
        if self.missing:
            # Without a timeout the error is about someone else; these were merely slower.
            waited = "still starting" if timeout_s is None else f"not ready after {timeout_s:g} s"
            parts.append(f"{waited}: {', '.join(self.missing)}")
        super().__init__("startup failed: " + "; ".join(parts))


async def signal_ready(address: str, msg: Ready | Failed, timeout_s: float = 10.0) -> None:
    """Send ``msg`` to the launcher at ``address`` and wait until it has left the process.

    Raises ``TimeoutError`` when the launcher does not take it within ``timeout_s``.
    """
    sock = get_context().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        CLUSTER.apply(sock, bind=False)
    except BaseException:
        sock.close(linger=0)
        raise
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    too_late = TimeoutError(
        f"launcher at {address} did not take the {type(msg).__name__} message "
        f"within {timeout_s:g} s"
    )
    try:
        sock.connect(address)
        # Zero-copy frames, however small: only those does pyzmq track, and the tracker of
        # the last frame says when ZeroMQ is done with the whole message. No reference to
        # the Frames may outlive the send: each holds its message until it is freed.
        send = sock.send_multipart(
            [zmq.Frame(frame, track=True, copy=False) for frame in encode(msg)],
            copy=False,
            track=True,
        )
        try:
            tracker = await asyncio.wait_for(send, timeout_s)
        except asyncio.TimeoutError:
            raise too_late from None
        assert tracker is not None, "a zero-copy send with track=True returns a tracker"
        while not tracker.done:
            if loop.time() >= deadline:
                raise too_late
            await asyncio.sleep(0.005)
    finally:
        sock.close(linger=0)


class ReadyWaiter:
    """The launcher's end of the ready channel.

    Reports are kept per instance id for the waiter's lifetime, so instances may be waited
    for in several groups: a report that arrives while waiting for another group is
    there when its own group is waited for.
    """

    def __init__(self, address: str = "tcp://127.0.0.1:0") -> None:
        self._pull = PullSocket[ReadyMessage](address, ReadyMessage, bind=True)
        self.address = self._pull.address
        self._reports: dict[str, ReadyMessage] = {}

    async def wait(
        self,
        expected: Collection[str],
        timeout_s: float,
        alive: Callable[[], Mapping[str, bool]] | None = None,
    ) -> dict[str, Ready]:
        """Wait for ``Ready`` from every instance id in ``expected``.

        ``alive`` maps instance ids to whether their process still runs; ids it leaves out
        count as alive. Raises ``StartupError`` on the first ``Failed`` or death, or once
        ``timeout_s`` has passed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        wanted = set(expected)
        while True:
            await self._receive(0)
            pending = wanted - self._reports.keys()
            dead = _dead(alive, pending)
            last_words_until = loop.time() + _LAST_WORDS_S
            while dead and loop.time() < last_words_until:
                await self._receive(last_words_until - loop.time())
                dead -= self._reports.keys()
            pending = wanted - self._reports.keys()
            failed = {
                instance: report.error
                for instance in wanted
                if isinstance(report := self._reports.get(instance), Failed)
            }
            if failed or dead:
                raise StartupError(failed=failed, dead=dead, missing=pending - dead, timeout_s=None)
            if not pending:
                return {instance: self._ready(instance) for instance in wanted}
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise StartupError(failed={}, dead=(), missing=pending, timeout_s=timeout_s)
            await self._receive(min(POLL_INTERVAL_S, remaining))

    def _ready(self, instance: str) -> Ready:
        report = self._reports[instance]
        assert isinstance(report, Ready), "wait() raises before returning a Failed instance"
        return report

    async def _receive(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a report, then take every report queued."""
        if not await self._pull.poll(timeout_s):
            return
        while True:
            try:
                report = await self._pull.recv()
            except DecodeError as e:
                log.warning("malformed ready message dropped", error=str(e))
            else:
                self._reports[report.instance_id] = report
            if not await self._pull.poll(0):
                return

    def close(self) -> None:
        self._pull.close()

    def __enter__(self) -> ReadyWaiter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _dead(alive: Callable[[], Mapping[str, bool]] | None, pending: set[str]) -> set[str]:
    if alive is None:
        return set()
    status = alive()
    return {instance for instance in pending if status.get(instance) is False}
