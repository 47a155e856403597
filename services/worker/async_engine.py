"""In-process async API around the synchronous engine, for tests and the offline CLI.

    generate() --inbox--> driver task --run_in_executor(step)--> Engine
        ^                     |
        +-- per-request queue <-- outputs (+ incremental text, stop strings)

The engine is only ever touched from the driver: `step()` runs in one worker thread
(torch releases the GIL, so the event loop stays responsive), and requests and aborts
queued by callers are applied between steps. A request refused by the engine yields one
final output carrying the error; the others keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from common.detokenizer import IncrementalDetokenizer
from common.errors import InvalidRequestError
from common.logging import get_logger
from common.protocol.elastic import RequestState
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer
from services.worker.engine import Engine, RequestOutput
from services.worker.kv_connector import KvTransfer
from services.worker.request import FinishReason

log = get_logger(__name__)

T = TypeVar("T")


@dataclass
class StreamOutput:
    """One chunk of a request's stream: new tokens, the text they complete, and at the end
    the finish reason (or the error that refused the request)."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    output: RequestOutput | None = field(default=None, repr=False)
    # On the final output of a request whose KV leaves for another instance (a P/D
    # prefill): what `_on_finished` kept for the hand-off. The caller now owns it and must
    # end it (`KVConnector.send` or `finished_sending`).
    kv_transfer: KvTransfer | None = field(default=None, repr=False)
    # The request left this engine (`export`) and goes on elsewhere: the stream ends here
    # without a word to the client (the engine that adopted it streams the rest).
    moved: bool = False


@dataclass
class _Pending:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue[StreamOutput]
    detok: IncrementalDetokenizer | None
    output_ids: list[int] = field(default_factory=list)
    # A request continued from another engine: where its generator stands.
    generator_state: bytes = b""
    # What `_admit` added to `Engine.add_request` (a cache hit), and what the hooks
    # borrowed for it (a worker's `KvPrefix`), given back when the request ends.
    admission: dict[str, Any] = field(default_factory=dict)
    borrowed: Any = None
    # What the caller's hooks need to know about this request (a worker's KV plan).
    context: Any = None
    # A request taken over from another engine (`adopt`): admitted with its state.
    adopted: RequestState | None = None


class AsyncEngine:
    def __init__(
        self, engine: Engine, tokenizer: Tokenizer | None = None, stall_timeout_s: float = 30.0
    ):
        """`stall_timeout_s`: how long the head of the queue may wait for KV memory while
        nothing runs (memory held by cached or handed-out blocks) before it is failed."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.stall_timeout_s = stall_timeout_s
        self._stalled_since: float | None = None
        self._inbox: list[_Pending] = []
        self._aborts: list[str] = []
        self._fail_message: str | None = None
        self._streams: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._driver: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        # pause(): the driver parks between steps until resume() (a group forming or
        # dissolving swaps the engine underneath); requests keep queueing meanwhile.
        self._paused = False
        self._parked = asyncio.Event()
        self._resumed = asyncio.Event()
        self._between: list[Callable[[], None]] = []  # run on the engine between steps
        # A request whose blocks a live migration is reading (services/worker/migration.py):
        # its end waits for the event, so its blocks are not handed on mid-transfer.
        self.finish_gates: dict[str, asyncio.Event] = {}

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        context: Any = None,
        *,
        generator_state: bytes = b"",
    ) -> AsyncIterator[StreamOutput]:
        """Stream a request's outputs; `context` is handed to the hooks (`_Pending.context`).
        `generator_state` continues a sampled request another engine started
        (`RequestOutput.generator_state`), so it draws what that engine would have drawn."""
        params = params or SamplingParams()
        rid = request_id or f"req-{next(self._ids)}"
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("a text prompt needs a tokenizer")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop)
        pending = _Pending(
            rid,
            prompt_ids,
            params,
            asyncio.Queue(),
            detok,
            generator_state=generator_state,
            context=context,
        )
        self._inbox.append(pending)
        self._ensure_driver()
        self._wake.set()
        async for out in self._stream(pending):
            yield out

    async def _stream(self, pending: _Pending) -> AsyncIterator[StreamOutput]:
        rid = pending.request_id
        try:
            while True:
                out = await pending.queue.get()
                yield out
                if out.finished:
                    return
        finally:
            if self._streams.get(rid) is pending:  # the caller left early: free its blocks
                self._aborts.append(rid)
                self._wake.set()
            elif pending in self._inbox:  # left before admission: never start it
                self._inbox.remove(pending)

    async def adopt(self, state: RequestState, context: Any = None) -> AsyncIterator[StreamOutput]:
        """Stream the rest of a request another engine exported (`Engine.adopt`): its
        tokens so far are in `state`; only new tokens come out of this stream."""
        pending = _Pending(
            state.request_id,
            list(state.prompt_token_ids),
            state.params,
            asyncio.Queue(),
            None,
            output_ids=list(state.output_token_ids),
            context=context,
            adopted=state,
        )
        self._inbox.append(pending)
        self._ensure_driver()
        self._wake.set()
        async for out in self._stream(pending):
            yield out

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    def call_between_steps(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine between two steps (before new requests are admitted):
        the engine is only ever touched there, never while a step runs."""
        self._between.append(fn)
        self._ensure_driver()
        self._wake.set()

    async def run_between_steps(self, fn: Callable[[], T]) -> T:
        """`fn()` on the engine between two steps (as `call_between_steps`); its result."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)

        self.call_between_steps(run)
        return await fut

    async def pause(self) -> None:
        """Return once no step runs and none will until `resume()`."""
        self._paused = True
        self._resumed.clear()
        driver = self._driver
        if driver is None or driver.done():
            return
        self._wake.set()
        parked = asyncio.ensure_future(self._parked.wait())
        try:  # a driver that died (it never parks) must not hold the caller forever
            await asyncio.wait({parked, driver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            parked.cancel()

    def resume(self) -> None:
        self._paused = False
        self._resumed.set()
        self._wake.set()

    async def export(self, *, keep_kv: bool = False) -> list[tuple[RequestState, Any]]:
        """While paused: every request leaves (running, waiting, then not yet admitted), as
        (state, its hooks' context); each stream ends with a `moved` output. The caller
        hands the states to the engine that goes on with them."""
        assert self._paused, "export only while paused"
        # Aborts that arrived while paused end their requests here: an aborted request
        # must not leave to be adopted (and run to its end) elsewhere.
        aborts, self._aborts = set(self._aborts), []
        for rid in aborts:
            ended = self.engine.abort(rid)
            if ended is not None:
                await self._deliver(ended)
        out: list[tuple[RequestState, Any]] = []
        for state in self.engine.export_requests(keep_kv=keep_kv):
            p = self._streams.pop(state.request_id, None)
            if p is None:
                continue
            await self._exported(p)
            p.queue.put_nowait(StreamOutput(state.request_id, [], finished=True, moved=True))
            out.append((state, p.context))
        inbox, self._inbox = self._inbox, []
        for p in inbox:
            if p.request_id in aborts:
                p.queue.put_nowait(
                    StreamOutput(
                        p.request_id, [], finished=True, finish_reason=FinishReason.ABORT.value
                    )
                )
                continue
            state = p.adopted or RequestState(
                request_id=p.request_id,
                prompt_token_ids=p.prompt_ids,
                output_token_ids=[],
                params=p.params,
                reply_to="",
                generator_state=p.generator_state,
            )
            p.queue.put_nowait(StreamOutput(p.request_id, [], finished=True, moved=True))
            out.append((state, p.context))
        return out

    async def export_one(self, request_id: str, *, keep_kv: bool = False) -> RequestState | None:
        """While paused: one admitted request leaves (`Engine.export_request`); its stream
        ends with a `moved` output. None when it is not in the engine (finished, refused,
        or not admitted yet)."""
        assert self._paused, "export only while paused"
        p = self._streams.get(request_id)
        if p is None:
            return None
        state = self.engine.export_request(request_id, keep_kv=keep_kv)
        if state is None:
            return None
        del self._streams[request_id]
        await self._exported(p)
        p.queue.put_nowait(StreamOutput(request_id, [], finished=True, moved=True))
        return state

    async def hand_over(self, request_id: str) -> bool:
        """A request that left the engine inside a step (a pipeline's `park`) goes on
        elsewhere: its stream ends with a `moved` output. False when it has no stream here."""
        p = self._streams.pop(request_id, None)
        if p is None:
            return False
        await self._exported(p)
        p.queue.put_nowait(StreamOutput(request_id, [], finished=True, moved=True))
        return True

    def fail_all(self, message: str) -> None:
        """End every request with `message` (between steps: the driver owns the engine)."""
        self._fail_message = message
        self._wake.set()

    async def close(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        self._executor.shutdown(wait=True)

    def _ensure_driver(self) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._paused:
                self._parked.set()
                await self._resumed.wait()
                self._parked.clear()
                continue
            # Clear before draining: a request queued while the hooks await (a match RPC)
            # sets the event again, so the wait below cannot miss it.
            self._wake.clear()
            await self._apply_inbox()
            if not self.engine.has_unfinished():
                await self._on_idle()
                if not (
                    self._inbox
                    or self._aborts
                    or self._fail_message
                    or self._paused
                    or self._between
                ):
                    await self._wake.wait()
                continue
            try:
                await self._before_step()
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
                for out in outputs:
                    await self._deliver(out)
            except Exception as exc:  # a failed step must end every stream, never hang one
                log.error("engine step failed; ending every request", error=str(exc), exc_info=True)
                await self._fail_all(f"engine error: {type(exc).__name__}: {exc}")
                continue
            if outputs or self.engine.scheduler.running or self.engine.swaps_pending():
                self._stalled_since = None
                continue
            # Nothing fits (memory held elsewhere): wait for a change instead of spinning,
            # and fail the head of the queue if that never comes, rather than hang its client.
            now = loop.time()
            self._stalled_since = self._stalled_since or now
            if now - self._stalled_since > self.stall_timeout_s:
                self._stalled_since = None
                head = self.engine.stalled_head()
                failed = (
                    None if head is None else self.engine.abort(head.request_id, FinishReason.ERROR)
                )
                if failed is not None:
                    await self._deliver(
                        failed,
                        error=f"not enough free KV memory to start this request "
                        f"within {self.stall_timeout_s:g} s",
                    )
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.05)

    # Hooks for engines whose memory lives elsewhere (services/worker/mempool_engine.py).
    async def _admit(self, p: _Pending) -> dict[str, Any]:
        """Extra `Engine.add_request` arguments for a new request (a cached prefix)."""
        return {}

    async def _refused(self, p: _Pending) -> None:
        """The engine refused a request that `_admit` prepared: undo the admission."""

    async def _before_step(self) -> None:
        """Runs before every step, with no step in flight."""

    async def _on_finished(self, p: _Pending, out: RequestOutput) -> KvTransfer | None:
        """A request ended (its final output, blocks included when it kept them). Returns
        the KV it hands to another instance, if any (on the stream's final output)."""
        return None

    async def _on_idle(self) -> None:
        """Nothing to run: a chance to give resources back."""

    async def _exported(self, p: _Pending) -> None:
        """A request left this engine (`export`): undo what the hooks hold for it."""

    async def _fail_all(self, message: str) -> None:
        for rid, p in list(self._streams.items()):
            out = self.engine.abort(rid, FinishReason.ERROR)
            del self._streams[rid]
            if out is not None:
                with contextlib.suppress(Exception):
                    await self._on_finished(p, out)
            p.queue.put_nowait(
                StreamOutput(
                    rid, [], finished=True, finish_reason=FinishReason.ERROR.value, error=message
                )
            )

    def fail_adopted_inbox(self, message: str) -> None:
        """End every adopted request still waiting in the inbox (a group broke: the KV they
        bring is gone), and drop the engine actions queued for them. New requests stay."""
        self._between.clear()
        keep: list[_Pending] = []
        for p in self._inbox:
            if p.adopted is None:
                keep.append(p)
                continue
            p.queue.put_nowait(
                StreamOutput(
                    p.request_id,
                    [],
                    finished=True,
                    finish_reason=FinishReason.ERROR.value,
                    error=message,
                )
            )
        self._inbox = keep

    async def _apply_inbox(self) -> None:
        between, self._between = self._between, []
        for fn in between:
            try:
                fn()
            except Exception as exc:  # one bad action must not stop the driver
                log.error("between-steps action failed", error=str(exc), exc_info=True)
        inbox, self._inbox = self._inbox, []
        for p in inbox:
            try:
                if p.request_id in self._streams:
                    raise InvalidRequestError(f"request id {p.request_id!r} is already in use")
                if p.adopted is not None:
                    self.engine.adopt(p.adopted)
                else:
                    p.admission = await self._admit(p)
                    self.engine.add_request(
                        p.request_id,
                        p.prompt_ids,
                        p.params,
                        generator_state=p.generator_state,
                        **p.admission,
                    )
            except Exception as exc:  # refused, or the admission hook failed (daemon down)
                with contextlib.suppress(Exception):
                    await self._refused(p)
                if not isinstance(exc, InvalidRequestError):
                    log.warning("request admission failed", request_id=p.request_id, error=str(exc))
                p.queue.put_nowait(
                    StreamOutput(
                        p.request_id,
                        [],
                        finished=True,
                        finish_reason=FinishReason.ERROR.value,
                        error=str(exc),
                    )
                )
                continue
            self._streams[p.request_id] = p
        if self._fail_message is not None:
            message, self._fail_message = self._fail_message, None
            await self._fail_all(message)
        aborts, self._aborts = self._aborts, []
        for rid in aborts:
            out = self.engine.abort(rid)
            if out is not None:
                await self._deliver(out)

    async def _deliver(self, out: RequestOutput, error: str | None = None) -> None:
        p = self._streams.get(out.request_id)
        if p is None:
            return
        p.output_ids.extend(out.new_token_ids)
        text = ""
        finished, reason, final = out.finished, out.finish_reason, out
        transfer = None
        if p.detok is not None:
            text = p.detok.add(out.new_token_ids)
            if p.detok.stopped_by is not None:
                if not finished:  # a stop string matched: end the request in the engine now
                    aborted = self.engine.abort(out.request_id, FinishReason.STOP)
                    assert aborted is not None
                    final = aborted
                finished, reason = True, FinishReason.STOP
            if finished:
                text += p.detok.finish()
        if finished:
            gate = self.finish_gates.get(out.request_id)
            if gate is not None:
                await gate.wait()
            del self._streams[out.request_id]
            try:
                transfer = await self._on_finished(p, final)
            except Exception as exc:  # the stream must still end (its KV was not kept)
                log.warning("end-of-request hook failed", request_id=p.request_id, error=str(exc))
                reason, error = FinishReason.ERROR, f"could not keep the request's KV: {exc}"
        stream = StreamOutput(
            out.request_id,
            out.new_token_ids,
            text,
            finished,
            None if reason is None else reason.value,
            error=error,
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            output=out,
            kv_transfer=transfer,
        )
        p.queue.put_nowait(stream)
