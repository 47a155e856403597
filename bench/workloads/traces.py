"""Workloads from recorded traces: ShareGPT conversations (JSON) and BurstGPT request logs
(CSV).

ShareGPT: a JSON list of {"id": str, "conversations": [{"from": ROLE, "value": str}, ...]}.
- each human message becomes a turn's tokens, encoded with add_special_tokens on the first
  turn only (BOS opens a session, the gateway prepends the rest of the history);
- the token count of the gpt message(s) that answer it becomes that turn's max_tokens
  (at least 1);
- leading system messages are prepended (newline-joined) to the first human message — a
  chat template would put them there; system messages later on are ignored;
- consecutive human messages are merged, as are consecutive gpt messages; a trailing human
  message with no answer is dropped (its answer length is unknown), and so is a later human
  message that encodes to no tokens, with everything after it;
- a conversation whose first non-system message is not human, or that has no answered
  human message, is skipped; roles other than human/user, gpt/chatgpt/bard/assistant/model
  and system are ignored;
- which conversations are used is a seeded shuffle (the first N of a larger pick equal a
  pick of N); every request is fitted to max_context like the generators' (trailing turns
  dropped, a too-long first turn truncated).

BurstGPT (Wang et al., 2024): CSV with header Timestamp,Model,Request tokens,Response
tokens,Total tokens,Log Type; only Timestamp, Request tokens and Response tokens are needed.
Rows with 0 response tokens are failed requests and are skipped. As a workload, each row
becomes a single-turn session of random ids (BOS + request tokens - 1 ids, readable bytes)
with max_tokens = response tokens, at the trace's own timestamps or a synthetic process.

Every failure to read a trace is a TraceError naming the file and the cause.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from bench.workloads.arrivals import Arrival, trace
from bench.workloads.model import Session, Turn, Workload, WorkloadError, fit_context
from bench.workloads.sampling import BOS, assemble, content_rng, session_id, token_ids

HUMAN_ROLES = frozenset({"human", "user"})
GPT_ROLES = frozenset({"gpt", "chatgpt", "bard", "assistant", "model"})
SYSTEM_ROLES = frozenset({"system"})
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")


class TraceError(WorkloadError):
    """A trace file that cannot be used; the message starts with the file's path."""


class TextEncoder(Protocol):
    """What the loaders need of a tokenizer (common.tokenizer.Tokenizer has it)."""

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...


# ---------------------------------------------------------------------------- ShareGPT


def load_sharegpt(
    path: str | Path,
    tokenizer: TextEncoder,
    *,
    sessions: int | None = None,
    max_context: int = 4096,
    seed: int = 0,
    scale: float = 1.0,
) -> list[Session]:
    """Up to `sessions` conversations (all usable ones if None) as sessions named
    "sharegpt-NNNN", all with arrival_s 0: the caller assigns arrivals. `scale` < 1 keeps
    the first fraction of each message's tokens and of each answer length. Raises
    TraceError if the file holds fewer usable conversations than `sessions`."""
    data = _read_json(path)
    conversations = _conversation_lists(path, data)
    order = list(range(len(conversations)))
    random.Random(f"sharegpt/sample/{seed}").shuffle(order)
    out: list[Session] = []
    for index in order:
        if sessions is not None and len(out) >= sessions:
            break
        turns = _conversation_turns(conversations[index], tokenizer, scale)
        if turns:
            out.append(
                Session(session_id("sharegpt", len(out)), 0.0, fit_context(turns, max_context))
            )
    if sessions is not None and len(out) < sessions:
        raise TraceError(
            f"{path}: {len(out)} usable conversations (of {len(conversations)}), {sessions} requested"
        )
    return out


def sharegpt_workload(
    path: str | Path,
    tokenizer: TextEncoder,
    *,
    sessions: int,
    arrival: Arrival,
    seed: int = 0,
    scale: float = 1.0,
    max_context: int = 4096,
) -> Workload:
    loaded = load_sharegpt(
        path, tokenizer, sessions=sessions, max_context=max_context, seed=seed, scale=scale
    )
    config = {"trace": str(path), "scale": scale, "max_context": max_context}
    drafts = [(s.turns, s.group) for s in loaded]
    return assemble("sharegpt", drafts, arrival, seed, max_context, config)


def _read_json(path: str | Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def _conversation_lists(path: str | Path, data: Any) -> list[list[tuple[str, str]]]:
    """Each entry's messages as (role, text), after checking the whole file's shape."""
    if not isinstance(data, list):
        raise TraceError(f"{path}: expected a JSON list of conversations, got {_kind(data)}")
    out = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or "conversations" not in entry:
            raise TraceError(f"{where}: expected an object with a 'conversations' list")
        messages = entry["conversations"]
        if not isinstance(messages, list):
            raise TraceError(f"{where}: 'conversations' is {_kind(messages)}, not a list")
        pairs = []
        for j, m in enumerate(messages):
            if not (
                isinstance(m, dict)
                and isinstance(m.get("from"), str)
                and isinstance(m.get("value"), str)
            ):
                raise TraceError(f"{where}, message {j}: expected {{'from': str, 'value': str}}")
            pairs.append((m["from"].lower(), m["value"]))
        out.append(pairs)
    return out


def _conversation_turns(
    messages: Sequence[tuple[str, str]], tokenizer: TextEncoder, scale: float
) -> list[Turn]:
    system = []
    start = 0
    while start < len(messages) and messages[start][0] in SYSTEM_ROLES:
        system.append(messages[start][1])
        start += 1
    if start == len(messages) or messages[start][0] not in HUMAN_ROLES:
        return []
    # [question text, answer token count or None while unanswered]
    exchanges: list[list[Any]] = []
    for role, text in messages[start:]:
        if role in HUMAN_ROLES:
            if exchanges and exchanges[-1][1] is None:
                exchanges[-1][0] += "\n" + text
            else:
                exchanges.append([text, None])
        elif role in GPT_ROLES:
            answered = len(tokenizer.encode(text, add_special_tokens=False))
            exchanges[-1][1] = (exchanges[-1][1] or 0) + answered
    if system:
        exchanges[0][0] = "\n".join([*system, exchanges[0][0]])
    turns = []
    for k, (question, answer) in enumerate(exchanges):
        tokens = tokenizer.encode(question, add_special_tokens=k == 0)
        if answer is None or not tokens:
            break
        turns.append(Turn(_scaled_prefix(tokens, scale), _scaled(max(answer, 1), scale)))
    return turns


# ---------------------------------------------------------------------------- BurstGPT


def load_burstgpt(path: str | Path) -> list[tuple[float, int, int]]:
    """(timestamp_s, request_tokens, response_tokens) per successful request, in file order."""
    text = _read_text(path)
    rows: list[tuple[float, int, int]] = []
    try:
        # strict: an unterminated quote or stray character is an error, not a silent merge
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in BURSTGPT_COLUMNS if c not in header]
        if missing:
            raise TraceError(
                f"{path}: not a BurstGPT CSV: missing column(s) {', '.join(missing)} "
                f"(header: {','.join(header) or 'none'})"
            )
        cols = [header.index(c) for c in BURSTGPT_COLUMNS]
        for row in reader:
            if not row:
                continue
            t, request, response = _burstgpt_row(path, reader.line_num, row, cols)
            if response > 0:  # 0 response tokens: a failed request
                rows.append((t, request, response))
    except csv.Error as exc:
        raise TraceError(f"{path}: not valid CSV: {exc}") from None
    return rows


def burstgpt_workload(
    path: str | Path,
    *,
    sessions: int,
    arrival: Arrival | None = None,
    seed: int = 0,
    scale: float = 1.0,
    max_context: int = 4096,
    vocab: tuple[int, int] = (35, 130),
) -> Workload:
    """The first `sessions` requests (by timestamp) as single-turn sessions; arrival None
    means the trace's own timestamps, shifted to start at 0."""
    rows = sorted(load_burstgpt(path), key=lambda r: r[0])
    if len(rows) < sessions:
        raise TraceError(f"{path}: {len(rows)} successful requests, {sessions} requested")
    rows = rows[:sessions]
    rng = content_rng("burstgpt", seed).ids
    drafts = []
    for _, request, response in rows:
        prompt = (BOS, *token_ids(rng, vocab, _scaled(max(request, 1), scale) - 1))
        drafts.append(([Turn(prompt, _scaled(response, scale))], ""))
    chosen = arrival if arrival is not None else trace(r[0] for r in rows)
    config = {"trace": str(path), "scale": scale, "max_context": max_context, "vocab": vocab}
    return assemble("burstgpt", drafts, chosen, seed, max_context, config)


def _burstgpt_row(
    path: str | Path, line: int, row: list[str], cols: list[int]
) -> tuple[float, int, int]:
    values = []
    for name, col in zip(BURSTGPT_COLUMNS, cols, strict=True):
        cell = row[col].strip() if col < len(row) else ""
        try:
            value = float(cell)
        except ValueError:
            raise TraceError(f"{path}: line {line}: {name} {cell!r} is not a number") from None
        if not (math.isfinite(value) and value >= 0):
            raise TraceError(f"{path}: line {line}: {name} {cell!r} must be >= 0")
        values.append(value)
    return values[0], int(values[1]), int(values[2])


# ---------------------------------------------------------------------------- shared


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, not a trace file") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _kind(value: Any) -> str:
    names: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _scaled(n: int, scale: float) -> int:
    return n if scale == 1.0 else max(1, round(n * scale))


def _scaled_prefix(tokens: list[int], scale: float) -> tuple[int, ...]:
    return tuple(tokens[: _scaled(len(tokens), scale)])
