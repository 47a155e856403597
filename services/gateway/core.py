"""The gateway's bookkeeping (pure: no sockets, no event loop): admission, the prompt of
each request, the table of requests in flight, and what ending one means for its session
and the counters. `service.py` does the talking; this decides.

    Complete ──admit──▶ Request (or a refusal: Final "error")
                          │ placed(Placement) ─▶ Generate for the first worker; legs known
                          │ stream.accept(TokenChunk) ... (stream.py)
                          ▼
                        finish(Final) ─▶ session history, served / failed

Invariants:

* A request is in `requests` from `admit` until `finish`, exactly once; `by_client` maps
  (client peer, client request id) to the gateway id of each of them and of nothing else,
  so a client's request ids are unique among its requests in flight.
* At most `max_inflight` requests are in flight; `admit` refuses the next one with
  "overloaded" at once (bounded admission: nothing queues at the gateway).
* At most `max_inflight_per_client` of them (counting those `hold` keeps while their text
  is tokenized) belong to one client; `inflight_of` counts them per client exactly.
* Every bound is judged by `check` before any tokenizing: ids of at most `max_id_bytes`,
  prompt text of at most `max_prompt_bytes`, fewer token ids than `max_model_len`,
  `max_tokens` at most `max_tokens_limit` (the model's context window).
* A prompt is never empty, holds only ids of the vocabulary, and is shorter than
  `max_model_len` (at least one output token fits).
* A session has at most one turn in flight; a turn that ends with stop or length makes
  its prompt and output the session's history, so the next turn's prompt starts with
  exactly the tokens whose KV the workers cached. A failed or cancelled turn changes
  nothing.
* A request whose instance died (InstanceDown, or its first worker unreachable) before
  its first token is re-placed (`unplace`, then Place again avoiding the dead instances)
  at most `max_replacements` times, invisibly to its client; after its first token it
  fails with an error naming the instance (its output cannot be resumed elsewhere).
* The gateway follows which instance streams each request (`follow`): a chunk from an
  instance the request has no leg on (its pipeline group's leader took it over at a
  drop, or its home member at a restore) moves the streaming leg there, same request
  id, offsets going on; from then on the old instance's death no longer fails it and the
  new one's does. A late chunk of the instance it just left (an offset before the move)
  is consumed by offset and moves nothing back.
* A Place or Release the scheduler did not answer is owed a Release (`owe_release`),
  sent once the scheduler answers again; at most MAX_OWED are remembered (the
  scheduler's own gateway-liveness and TTL cover the rest).
* `served` counts requests ended by stop or length; `failed` those refused or ended by an
  error; a cancelled request (abort) is neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.detokenizer import IncrementalDetokenizer
from common.errors import InvalidRequestError
from common.protocol import client as cp
from common.protocol import scheduler as sp
from common.protocol import worker as wp
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer
from services.gateway.config import PROMPT_BYTES_PER_TOKEN, PROMPT_BYTES_SLACK
from services.gateway.sessions import Sessions
from services.gateway.stream import Leg, RequestStream

DEFAULT_MAX_TOKENS = SamplingParams().max_tokens
MAX_OWED = 10_000  # releases remembered while the scheduler does not answer
MAX_ADDRESSES = 4096  # instances whose request address is remembered (from placements)


@dataclass(eq=False)
class Request:
    """One request in flight. `rid` is the gateway's id (what workers and the scheduler
    see), unique across clients; the client's own id is `stream.client_request_id`."""

    rid: str
    peer: bytes  # the client's ROUTER identity
    stream: RequestStream
    session_id: str = ""
    route_key: str = ""  # routes like a session, without its history (Complete.route_key)
    pd: bool = False  # prefill and decode on different instances (Placement.handoff)
    prefill_released: bool = False  # Release(phase="prefill") sent
    # Instances it was taken off before its first token (dead or unreachable): never
    # placed there again.
    avoid: list[str] = field(default_factory=list)
    # The instance its stream last moved away from, and the offset the move came at.
    left: tuple[str, int] | None = None

    @property
    def placed(self) -> bool:
        return bool(self.stream.legs)

    def has_leg_on(self, instance_id: str) -> bool:
        return any(leg.instance_id == instance_id for leg in self.stream.legs)


class GatewayCore:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        vocab_size: int,
        max_model_len: int,
        max_inflight: int,
        sessions: Sessions,
        id_prefix: str,
        reply_to: str,
        max_inflight_per_client: int | None = None,
        max_id_bytes: int = 128,
        max_prompt_bytes: int | None = None,
        max_tokens_limit: int | None = None,
        max_replacements: int = 2,
        gateway_id: str = "",
        started_at: float = 0.0,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_inflight = max_inflight
        self.max_inflight_per_client = max_inflight_per_client or max_inflight
        self.max_id_bytes = max_id_bytes
        self.max_prompt_bytes = max_prompt_bytes or (
            PROMPT_BYTES_PER_TOKEN * max_model_len + PROMPT_BYTES_SLACK
        )
        # No output outgrows the model's context window, so a larger max_tokens is a
        # mistake (or an attack). Unset: never below the default, which is always allowed.
        self.max_tokens_limit = max_tokens_limit or max(max_model_len, DEFAULT_MAX_TOKENS)
        self.sessions = sessions
        self.id_prefix = id_prefix  # unique per gateway run: ids never repeat after a restart
        self.reply_to = reply_to  # where workers push this gateway's token chunks
        self.max_replacements = max_replacements
        # This incarnation, named in every Place: the scheduler drops its charges if it dies.
        self.gateway_id = gateway_id
        self.started_at = started_at
        self.owed: dict[str, None] = {}  # request ids owed a Release (insertion order)
        self.requests: dict[str, Request] = {}
        # Instance id -> request address, from placements: where a moved leg's Abort goes.
        self.addresses: dict[str, str] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}
        # Requests that passed `check` and whose text is being tokenized: (peer, client
        # request id) -> cancelled meanwhile.
        self.pending: dict[tuple[bytes, str], bool] = {}
        self.inflight_of: dict[bytes, int] = {}  # requests (and pending ones) per client
        self.served = 0
        self.failed = 0
        self._next_id = 0

    # ---------------------------------------------------------------- admission
    def check(self, peer: bytes, req: cp.Complete) -> cp.Final | None:
        """The refusal of `req` by its bounds alone, or None: nothing here tokenizes or
        scans more than a few bytes of the request, so a huge one costs next to nothing.

        An id over `max_id_bytes` is never echoed back: its refusal carries no id."""
        if _utf8_len(req.request_id, self.max_id_bytes) > self.max_id_bytes:
            return self._refuse(req, f"request_id longer than {self.max_id_bytes} bytes", "")
        if _utf8_len(req.session_id, self.max_id_bytes) > self.max_id_bytes:
            return self._refuse(req, f"session_id longer than {self.max_id_bytes} bytes")
        if _utf8_len(req.route_key, self.max_id_bytes) > self.max_id_bytes:
            return self._refuse(req, f"route_key longer than {self.max_id_bytes} bytes")
        key = (peer, req.request_id)
        if key in self.by_client or key in self.pending:
            return self._refuse(req, f"request id {req.request_id!r} is already in flight")
        inflight = len(self.requests) + len(self.pending)
        if inflight >= self.max_inflight:
            return self._refuse(
                req,
                f"overloaded: {inflight} requests in flight "
                f"(max_inflight {self.max_inflight}); retry later",
            )
        mine = self.inflight_of.get(peer, 0)
        if mine >= self.max_inflight_per_client:
            return self._refuse(
                req,
                f"overloaded: this client has {mine} requests in flight "
                f"(max_inflight_per_client {self.max_inflight_per_client}); retry later",
            )
        try:
            if (req.prompt is None) == (req.token_ids is None):
                raise InvalidRequestError("give exactly one of prompt (text) and token_ids")
            if req.prompt is not None:
                n = _utf8_len(req.prompt, self.max_prompt_bytes)
                if n > self.max_prompt_bytes:
                    raise InvalidRequestError(
                        f"prompt too long: over {self.max_prompt_bytes} bytes of text "
                        f"(max_prompt_bytes; max_model_len {self.max_model_len})"
                    )
            elif len(req.token_ids or ()) >= self.max_model_len:
                raise InvalidRequestError(
                    f"prompt too long: {len(req.token_ids or ())} tokens, limit "
                    f"{self.max_model_len - 1} (max_model_len {self.max_model_len} leaves "
                    "room for one output token)"
                )
            req.params.validate()
            if req.params.max_tokens > self.max_tokens_limit:
                raise InvalidRequestError(
                    f"max_tokens too large: {req.params.max_tokens}, limit "
                    f"{self.max_tokens_limit} (the model's context window)"
                )
        except InvalidRequestError as exc:
            return self._refuse(req, str(exc))
        return None

    def needs_bos(self, req: cp.Complete) -> bool:
        """Whether `req`'s text would be tokenized with the tokenizer's specials now: only
        as a conversation's first turn (see `prompt_ids`)."""
        s = self.sessions.sessions.get(req.session_id) if req.session_id else None
        return s is None or not s.history

    def hold(self, peer: bytes, req: cp.Complete) -> None:
        """Count `req` (which passed `check`) in flight while its text is tokenized off the
        event loop: its id stays taken and it counts towards the caps until `unhold`."""
        self.pending[(peer, req.request_id)] = False
        self.inflight_of[peer] = self.inflight_of.get(peer, 0) + 1

    def unknown_of(self, peer: bytes, client_request_ids: list[str]) -> list[str]:
        """Those of `peer`'s request ids (the first `MAX_PING_IDS`) that are neither held
        nor in flight here: their client waits for an answer that will never come."""
        return [
            crid
            for crid in client_request_ids[: cp.MAX_PING_IDS]
            if (peer, crid) not in self.by_client and (peer, crid) not in self.pending
        ]

    def cancel_held(self, peer: bytes, client_request_id: str) -> bool:
        """Mark a held request cancelled (it is answered "abort" once unheld)."""
        key = (peer, client_request_id)
        if key not in self.pending:
            return False
        self.pending[key] = True
        return True

    def unhold(self, peer: bytes, req: cp.Complete) -> bool:
        """Stop holding `req`; return whether it was cancelled meanwhile."""
        self._uncount(peer)
        return self.pending.pop((peer, req.request_id))

    def admit(
        self,
        peer: bytes,
        req: cp.Complete,
        now: float,
        encoded: tuple[list[int], bool] | None = None,
    ) -> Request | cp.Final:
        """Register `req` (received at `now`) or refuse it with the Final to send back.

        `encoded` is the prompt text already tokenized off the event loop, and whether
        with the specials (`needs_bos` when it was asked). Judged in arrival order: the
        bounds, a duplicate id and overload are checked before the prompt is built, so a
        refusal never touches the request's session."""
        refusal = self.check(peer, req)
        if refusal is not None:
            return refusal
        history: list[int] = []
        try:
            if req.session_id:
                history = self.sessions.begin_turn(req.session_id, now)
        except InvalidRequestError as exc:
            return self._refuse(req, str(exc))
        try:
            ids = self.prompt_ids(req, history, encoded)
        except InvalidRequestError as exc:
            if req.session_id:  # give the turn back: the session stays as it was
                self.sessions.end_turn(req.session_id, None, now)
            return self._refuse(req, str(exc))
        rid = f"{self.id_prefix}-{self._next_id}"
        self._next_id += 1
        detok = IncrementalDetokenizer(self.tokenizer, ids, req.params.stop)
        r = Request(rid, peer, RequestStream(req.request_id, ids, req.params, detok, now))
        r.session_id = req.session_id
        r.route_key = req.route_key
        self.requests[rid] = r
        self.by_client[(peer, req.request_id)] = rid
        self.inflight_of[peer] = self.inflight_of.get(peer, 0) + 1
        return r

    def prompt_ids(
        self,
        req: cp.Complete,
        history: list[int],
        encoded: tuple[list[int], bool] | None = None,
    ) -> list[int]:
        """The request's prompt: the session's history, then the new text or token ids.

        The tokenizer adds its BOS only to a conversation's first turn: a later turn
        continues the history, and a BOS in the middle would change the model's input.
        `encoded` is used when it was made with the specials this turn needs; else (the
        session's history changed while it was tokenized) the text is tokenized here."""
        if req.prompt is not None:
            if encoded is not None and encoded[1] == (not history):
                new = encoded[0]
            else:
                new = self.tokenizer.encode(req.prompt, add_special_tokens=not history)
        else:
            new = list(req.token_ids or ())
            bad = [t for t in new if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
                )
        if not new:
            raise InvalidRequestError("the prompt is empty")
        ids = history + new if history else new
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt too long: {len(ids)} tokens, limit {self.max_model_len - 1} "
                f"(max_model_len {self.max_model_len} leaves room for one output token)"
            )
        return ids

    def _refuse(self, req: cp.Complete, error: str, request_id: str | None = None) -> cp.Final:
        self.failed += 1
        rid = req.request_id if request_id is None else request_id
        return cp.Final(rid, "error", error=error)

    def _uncount(self, peer: bytes) -> None:
        n = self.inflight_of[peer] - 1
        if n:
            self.inflight_of[peer] = n
        else:
            del self.inflight_of[peer]

    # ---------------------------------------------------------------- placement
    def placed(self, r: Request, p: sp.Placement) -> wp.Generate:
        """Record the placement's legs; return the `Generate` for its first worker."""
        r.stream.legs.append(Leg(p.instance_id, p.address))
        self._learn(p.instance_id, p.address)
        if p.handoff is not None:
            r.stream.legs.append(Leg(p.handoff.instance_id, p.handoff.address))
            r.pd = True
        s = r.stream
        return wp.Generate(
            r.rid,
            s.prompt_ids,
            params=s.params,
            reply_to=self.reply_to,
            cache=p.cache,
            handoff=p.handoff,
            fetch=p.fetch,
        )

    def _learn(self, instance_id: str, address: str) -> None:
        self.addresses.pop(instance_id, None)
        self.addresses[instance_id] = address
        while len(self.addresses) > MAX_ADDRESSES:
            del self.addresses[next(iter(self.addresses))]

    def follow(self, r: Request, chunk: wp.TokenChunk) -> Leg | None:
        """Move `r`'s streaming leg to the instance `chunk` came from when `r` has no leg
        there (a group took the request over, or gave it back home); return the leg it
        left, or None when nothing moved. The streaming leg is the last one (a P/D
        request's decode leg). A chunk of the instance `r` last left, from before the
        move, is late: it moves nothing."""
        iid = chunk.instance_id
        legs = r.stream.legs
        if not iid or not legs or r.has_leg_on(iid):
            return None
        if r.left is not None and r.left[0] == iid and chunk.offset < r.left[1]:
            return None
        old = legs[-1]
        if chunk.address:
            self._learn(iid, chunk.address)
        legs[-1] = Leg(iid, self.addresses.get(iid, ""))
        r.left = (old.instance_id, chunk.offset)
        return old

    def place_request(self, r: Request) -> sp.Place:
        return sp.Place(
            r.rid,
            r.stream.prompt_ids,
            max_tokens=r.stream.params.max_tokens,
            # The scheduler's session policy keys on this: a session, else the hint.
            session_id=r.session_id or r.route_key,
            gateway=self.gateway_id,
            gateway_started_at=self.started_at,
            avoid=list(r.avoid),
        )

    def can_replace(self, r: Request) -> bool:
        """Whether `r` may be placed again: still running, nothing streamed yet (its first
        token would differ in timing only, never in content: the client sees one
        stream), and re-placed fewer than `max_replacements` times."""
        s = r.stream
        return (
            r.rid in self.requests
            and not s.finished
            and s.first_at is None
            and not s.output_ids
            and len(r.avoid) < self.max_replacements
        )

    def unplace(self, r: Request, dead: str, now: float) -> tuple[str, list[Leg]]:
        """Take `r` off its placement because instance `dead` is gone (`can_replace` held).

        `r` gets a fresh gateway id (`<rid>.<n>`), so nothing of the old placement can
        touch the new one: the old legs' late chunks match no request, an Abort of the
        old id never hits the new Generate on an instance both placements share, and the
        scheduler's charge of the old id is released apart. Returns the old id and the
        legs to abort under it. The next Place avoids `dead`."""
        s = r.stream
        old = r.rid
        live = [leg for leg in s.legs if leg.instance_id != dead]
        s.legs = []
        r.left = None
        s.held.clear()
        s.num_cached_tokens = 0
        s.last_activity = now  # the silence watchdog starts afresh
        r.pd = False
        r.prefill_released = False
        base = old.rsplit(".", 1)[0] if r.avoid else old  # ids end ".<n>" once moved
        r.avoid.append(dead)
        r.rid = f"{base}.{len(r.avoid)}"
        del self.requests[old]
        self.requests[r.rid] = r
        self.by_client[(r.peer, s.client_request_id)] = r.rid
        return old, live

    # ---------------------------------------------------------------- releases owed
    def owe_release(self, rid: str) -> None:
        """The scheduler did not answer a Place or Release of `rid`: release it later."""
        self.owed.pop(rid, None)
        self.owed[rid] = None
        while len(self.owed) > MAX_OWED:
            del self.owed[next(iter(self.owed))]

    def take_owed(self) -> list[str]:
        """The releases owed (and forget them: a failed one is owed again)."""
        owed = [rid for rid in self.owed if rid not in self.requests]
        for rid in owed:
            del self.owed[rid]
        return owed

    # ---------------------------------------------------------------- lookups
    def lookup(self, peer: bytes, client_request_id: str) -> Request | None:
        rid = self.by_client.get((peer, client_request_id))
        return None if rid is None else self.requests[rid]

    def on_instance(self, instance_id: str) -> list[Request]:
        return [r for r in self.requests.values() if r.has_leg_on(instance_id)]

    def of_peer(self, peer: bytes) -> list[Request]:
        return [r for r in self.requests.values() if r.peer == peer]

    def silent(self, now: float, timeout_s: float) -> list[Request]:
        """Requests that heard nothing from their workers for longer than `timeout_s`."""
        return [r for r in self.requests.values() if now - r.stream.last_activity > timeout_s]

    # ---------------------------------------------------------------- the end
    def finish(self, rid: str, final: cp.Final, now: float) -> Request | None:
        """Forget the request (None if it had already ended) and account for `final`."""
        r = self.requests.pop(rid, None)
        if r is None:
            return None
        del self.by_client[(r.peer, r.stream.client_request_id)]
        self._uncount(r.peer)
        ok = final.finish_reason in ("stop", "length")
        if ok:
            self.served += 1
        elif final.finish_reason == "error":
            self.failed += 1
        if r.session_id:
            s = r.stream
            self.sessions.end_turn(r.session_id, s.prompt_ids + s.output_ids if ok else None, now)
        return r

    def status(self) -> dict[str, Any]:
        return {
            "inflight": len(self.requests),
            "sessions": len(self.sessions.sessions),
            "served": self.served,
            "failed": self.failed,
            "owed_releases": len(self.owed),
        }


def _utf8_len(text: str, limit: int) -> int:
    """The UTF-8 length of `text`, or any number above `limit` once that is certain,
    without encoding a huge text (a character is 1 to 4 bytes)."""
    if len(text) > limit:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
