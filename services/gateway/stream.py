"""One request's stream at the gateway (pure): puts the workers' token chunks in order,
detokenizes, watches stop strings and keeps the timings.

In P/D serving the first token comes from the prefill worker and the rest from the decode
worker, on different sockets: chunks carry the `offset` of their first token, and only the
next expected offset is consumed (later ones wait, repeated tokens are skipped). An error
chunk from any leg ends the request at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.detokenizer import IncrementalDetokenizer
from common.protocol import client as cp
from common.protocol import worker as wp
from common.sampling import SamplingParams


@dataclass
class Leg:
    instance_id: str
    address: str


@dataclass
class Update:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    first_token: bool = False  # this update holds the request's first token
    final: cp.Final | None = None
    abort_legs: bool = False  # the gateway ended it (stop string): the workers must stop


class RequestStream:
    def __init__(
        self,
        client_request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        detok: IncrementalDetokenizer,
        received_at: float,
    ):
        self.client_request_id = client_request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.detok = detok
        self.received_at = received_at
        self.last_activity = received_at
        self.legs: list[Leg] = []
        self.output_ids: list[int] = []
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.num_cached_tokens = 0
        self.held: dict[int, wp.TokenChunk] = {}  # chunks that arrived early, by offset
        # Instances whose tokens the client got, in order: a P/D request that ends at its
        # first token (max_tokens 1, eos) never reaches its decode leg.
        self.served_by: list[str] = []
        # The first token to the first one from a second instance (in P/D: the hand-off
        # from prefill to decode, as the client sees it); None until that happens.
        self.handoff_gap_s: float | None = None
        self.finished = False

    def accept(self, chunk: wp.TokenChunk, now: float) -> Update:
        """Consume a chunk (and any held ones it unblocks)."""
        self.last_activity = now
        if chunk.error:
            return Update(final=self.end("error", now, chunk.error))
        if chunk.num_cached_tokens:
            self.num_cached_tokens = chunk.num_cached_tokens
        out = Update()
        if not self.held and chunk.offset == len(self.output_ids):
            # The usual case, one worker streaming in order: nothing to sort or hold.
            self._apply(chunk, now, out)
            return out
        self.held[chunk.offset] = chunk
        while not self.finished:
            nxt = self._take_next()
            if nxt is None:
                break
            self._apply(nxt, now, out)
        return out

    def _take_next(self) -> wp.TokenChunk | None:
        n = len(self.output_ids)
        for off in sorted(self.held):
            c = self.held[off]
            if off <= n and (off + len(c.token_ids) > n or c.finished):
                del self.held[off]
                return c
            if off < n:  # wholly repeated
                del self.held[off]
        return None

    def _apply(self, c: wp.TokenChunk, now: float, out: Update) -> None:
        skip = len(self.output_ids) - c.offset  # tokens of `c` already consumed
        new = c.token_ids[skip:] if skip else c.token_ids
        if new:
            if c.instance_id and c.instance_id not in self.served_by:
                self.served_by.append(c.instance_id)
                if len(self.served_by) == 2 and self.first_at is not None:
                    self.handoff_gap_s = now - self.first_at
            if self.first_at is None:
                self.first_at = now
                out.first_token = True
            self.last_at = now
            self.output_ids.extend(new)
            out.token_ids.extend(new)
            out.text += self.detok.add(new)
            if self.detok.stopped_by is not None:
                out.text += self.detok.finish()
                out.final = self.end("stop", now)
                out.abort_legs = not c.finished
                return
        if c.finished:
            out.text += self.detok.finish()
            out.final = self.end(c.finish_reason or "stop", now)

    def end(self, reason: str, now: float, error: str = "") -> cp.Final:
        """Finish the request now; later chunks are ignored."""
        self.finished = True
        self.held.clear()
        n = len(self.output_ids)
        ttft = (self.first_at - self.received_at) if self.first_at is not None else 0.0
        tpot = (
            (self.last_at - self.first_at) / (n - 1)
            if n > 1 and self.first_at is not None and self.last_at is not None
            else 0.0
        )
        return cp.Final(
            self.client_request_id,
            reason,
            error=error,
            num_prompt_tokens=len(self.prompt_ids),
            num_cached_tokens=self.num_cached_tokens,
            num_output_tokens=n,
            ttft_s=ttft,
            tpot_s=tpot,
            total_s=now - self.received_at,
            instances=self._instances(reason),
        )

    def _instances(self, reason: str) -> list[str]:
        """Who served the request; for a failure, every instance it was placed on."""
        if reason == "error" or not self.served_by:
            return [leg.instance_id for leg in self.legs]
        return list(self.served_by)
