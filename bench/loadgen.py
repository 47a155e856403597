"""The load client: replays a workload against a gateway, open loop.

Sessions start at their arrival times whatever the cluster's state (open loop: a slow
cluster builds a queue, it does not slow the arrivals). Inside a session the turns are a
conversation: turn i+1 is sent `think_s` after turn i's answer is complete, in the same
gateway session, so the gateway prepends the history and the scheduler sees the session id.

Bounds: `max_requests` (no turn starts after that many were sent) and `duration_s` (no turn
starts after that long; requests still running `grace_s` later are cancelled). `stop()`
ends a run early the same way (Ctrl-C): what was measured is kept, `interrupted` is set.

One record per request, timings as the gateway measured them (`Final`: TTFT and TPOT
from the request's receipt, total = JCT) plus the client's own wall time:
    session, turn, sent_s, ttft_s, tpot_s, jct_s, client_s, prompt, cached, output,
    instances, error ("" = served)
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench.workloads.model import Session, Workload


@dataclass
class LoadResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    started_wall: float = 0.0  # time.time() when the replay started (sent_s counts from it)
    interrupted: bool = False
    unsent: int = 0  # requests of the workload never sent (bounds, stop, a failed turn)


class LoadClient:
    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 120.0,
        max_requests: int | None = None,
        duration_s: float | None = None,
        grace_s: float = 30.0,
        progress: bool | None = None,
    ):
        self.address = address
        self.timeout_s = timeout_s
        self.max_requests = max_requests
        self.duration_s = duration_s
        self.grace_s = grace_s
        # A bar only on a terminal unless asked for: logs and CI output stay readable.
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.result = LoadResult()
        self._stopping = asyncio.Event()
        self._exhausted = asyncio.Event()  # bounds reached and nothing in flight
        self._sent = 0
        self._in_flight = 0
        self._t0 = 0.0

    def stop(self) -> None:
        """Start no more requests and cancel the running ones (Ctrl-C)."""
        self.result.interrupted = True
        self._stopping.set()

    async def run(self, workload: Workload) -> LoadResult:
        from common.client import GatewayClient

        total = workload.num_requests()
        if self.max_requests is not None:
            total = min(total, self.max_requests)
        bar = _bar(total, workload.name) if self.progress else None
        client = GatewayClient(self.address, timeout_s=self.timeout_s)
        self._t0 = time.perf_counter()
        self.result.started_wall = time.time()
        tasks = [asyncio.create_task(self._session(client, s, bar)) for s in workload.sessions]
        everything = asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._until_done(everything)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            client.close()
            if bar is not None:
                bar.close()
            self.result.wall_s = time.perf_counter() - self._t0
            self.result.unsent = workload.num_requests() - len(self.result.records)
        return self.result

    async def _until_done(self, everything: asyncio.Future[Any]) -> None:
        waits = [
            asyncio.ensure_future(self._stopping.wait()),
            asyncio.ensure_future(self._exhausted.wait()),
        ]
        try:
            limit = None if self.duration_s is None else self.duration_s + self.grace_s
            await asyncio.wait(
                [everything, *waits], timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()

    def _may_send(self) -> bool:
        if self._stopping.is_set():
            return False
        if self.max_requests is not None and self._sent >= self.max_requests:
            return False
        elapsed = time.perf_counter() - self._t0
        return self.duration_s is None or elapsed < self.duration_s

    async def _session(self, client: Any, session: Session, bar: Any) -> None:
        from common.client import GatewayError, GatewayTimeout
        from common.sampling import SamplingParams

        if self.duration_s is not None and session.arrival_s >= self.duration_s:
            return  # it would arrive after the run
        await asyncio.sleep(max(0.0, self._t0 + session.arrival_s - time.perf_counter()))
        if not self._may_send():
            return
        sid = await client.open_session()
        try:
            for i, turn in enumerate(session.turns):
                if i and turn.think_s:
                    await asyncio.sleep(turn.think_s)
                if not self._may_send():
                    return
                self._sent += 1
                self._in_flight += 1
                params = SamplingParams(max_tokens=turn.max_tokens, ignore_eos=True)
                sent = time.perf_counter()
                record: dict[str, Any] = {
                    "session": session.session_id,
                    "turn": i,
                    "sent_s": sent - self._t0,
                }
                try:
                    done = await client.complete(list(turn.tokens), params, session_id=sid)
                    record |= _timings(done.final)
                except GatewayError as exc:
                    record |= _timings(exc.final)
                except GatewayTimeout as exc:
                    record |= {"error": f"timeout: {exc}"}
                record["client_s"] = time.perf_counter() - sent
                self._in_flight -= 1
                if not self._in_flight and not self._may_send():
                    self._exhausted.set()  # sessions still asleep would send nothing
                self.result.records.append(_complete(record))
                if bar is not None:
                    bar.update(1)
                if record["error"]:
                    return  # the session's history is now not what its next turn assumes
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close_session(sid), 5)


def _timings(final: Any) -> dict[str, Any]:
    return {
        "ttft_s": final.ttft_s,
        "tpot_s": final.tpot_s,
        "jct_s": final.total_s,
        "prompt": final.num_prompt_tokens,
        "cached": final.num_cached_tokens,
        "output": final.num_output_tokens,
        "instances": list(final.instances),
        "error": final.error if final.finish_reason == "error" else "",
    }


def _complete(record: dict[str, Any]) -> dict[str, Any]:
    """Every record has every field (a timed-out request has no gateway timings)."""
    nan = float("nan")
    defaults = {"ttft_s": nan, "tpot_s": nan, "jct_s": nan, "prompt": 0, "cached": 0}
    return {**defaults, "output": 0, "instances": [], "error": "", **record}


def _bar(total: int, name: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra is not installed: no bar
        return None
    return tqdm(total=total, desc=name, unit="req", file=sys.stderr, leave=False)
