"""How the leader's microbatches travel around a group: `send` a `StageBatch` to stage 1,
`recv` the `StageResult` the last stage sends back. Results come back in the order the
batches were sent (every hop is FIFO).

`LocalRing` runs the other stages in this process, one after the other, when a batch is
sent: the in-process group of the tests and of `memserve bench` runs, with the same
messages (encoded and decoded, so tensors cross as they would over a socket) as the
ZeroMQ ring between workers (services/worker/pipeline/socket_ring.py).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from common.codec import Decoder, encode
from common.protocol.stage import StageBatch, StageMessage, StageResult
from services.worker.pipeline.stage import StageServer


class StageTimeout(RuntimeError):
    """The ring did not return a batch in time: a stage is dead or stuck."""


class Ring(Protocol):
    def send(self, batch: StageBatch) -> None: ...

    def recv(self, timeout_s: float) -> StageResult: ...

    def close(self) -> None: ...


class LocalRing:
    def __init__(self, stages: list[StageServer]):
        if not stages or not stages[-1].last:
            raise ValueError("a ring needs at least one stage, the last returning results")
        self.stages = stages
        self._results: deque[StageResult] = deque()
        self._dec: Decoder[StageMessage] = Decoder(StageMessage)

    def _hop(self, msg: StageBatch | StageResult) -> StageBatch | StageResult:
        # Frames are copied to bytes, as a socket would: nothing aliases the sender's tensors.
        return self._dec.decode([bytes(f) for f in encode(msg)])

    def send(self, batch: StageBatch) -> None:
        msg: StageBatch | StageResult = self._hop(batch)
        for stage in self.stages:
            assert isinstance(msg, StageBatch)
            msg = self._hop(stage.run(msg))
        assert isinstance(msg, StageResult)
        self._results.append(msg)

    def recv(self, timeout_s: float) -> StageResult:
        if not self._results:
            raise StageTimeout("no batch in flight")
        return self._results.popleft()

    def close(self) -> None:
        self._results.clear()
