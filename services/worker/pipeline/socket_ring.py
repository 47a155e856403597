"""The ring between the workers of a group, over the cluster's (CURVE) ZeroMQ sockets.

Every member binds one PULL (`Member.stage`, bound when it prepares); the leader's
receives `StageResult`s, a follower's `StageBatch`es. Each member PUSHes to the next
rank's PULL (the last follower to the leader's).

The leader's engine steps in an executor thread while the sockets belong to the event
loop, so `SocketRing` hands each send and receive to the loop and waits for it there: the
loop stays free for streams and control messages while a batch is around the ring.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from concurrent.futures import ThreadPoolExecutor

import torch

from common.codec import DecodeError
from common.logging import get_logger
from common.protocol.stage import StageBatch, StageMessage, StageResult
from common.sockets import PullSocket, PushSocket
from services.worker.pipeline.ring import StageTimeout
from services.worker.pipeline.stage import StageServer, StaleBatch

log = get_logger(__name__)

_SEND_TIMEOUT_S = 10.0


class SocketRing:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        push: PushSocket[StageMessage],
        pull: PullSocket[StageMessage],
    ):
        self.loop = loop
        self.push = push
        self.pull = pull

    def send(self, batch: StageBatch) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.push.send(batch), self.loop)
        try:
            fut.result(_SEND_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise StageTimeout(f"stage 1 did not take a batch in {_SEND_TIMEOUT_S:g} s") from None
        except concurrent.futures.CancelledError:
            # The ring was closed under the send (the group broke). Raised as an ordinary
            # error: a CancelledError would reach the engine's driver as its own cancellation.
            raise StageTimeout("the ring closed while a batch was being sent") from None

    def recv(self, timeout_s: float) -> StageResult:
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self.pull.recv(), timeout_s), self.loop
        )
        try:
            msg = fut.result()
        except (TimeoutError, asyncio.TimeoutError):
            raise StageTimeout(
                f"no result from the group's last stage within {timeout_s:g} s"
            ) from None
        except concurrent.futures.CancelledError:
            raise StageTimeout("the ring closed while waiting for a result") from None
        except Exception as exc:  # the socket closed under the receive
            raise StageTimeout(f"the ring failed: {exc}") from None
        if not isinstance(msg, StageResult):
            raise StageTimeout(f"the leader's stage socket got a {type(msg).__name__}")
        return msg

    def close(self) -> None:
        self.push.close()


async def serve_stage(
    stage: StageServer,
    pull: PullSocket[StageMessage],
    push: PushSocket[StageMessage],
    executor: ThreadPoolExecutor,
) -> None:
    """A follower's loop: batches in, its layers, on to the next hop. A failed batch goes
    on as a `StageResult` with the error, so the leader fails that step at once rather
    than wait for a timeout; results passing through (a middle stage) are forwarded."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            msg = await pull.recv()
        except DecodeError as exc:
            log.warning("malformed stage message dropped", error=str(exc))
            continue
        if isinstance(msg, StageResult):
            await push.send(msg)
            continue
        try:
            out = await loop.run_in_executor(executor, stage.run, msg)
        except StaleBatch as exc:
            log.warning("stage batch of another group dropped", error=str(exc))
            continue
        except Exception as exc:
            log.error("stage failed a batch", step=msg.step, error=str(exc), exc_info=True)
            out = StageResult(msg.epoch, msg.step, msg.mb, torch.zeros(0), error=str(exc))
        await push.send(out)
