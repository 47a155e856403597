"""Workloads by name, for command lines and results files: `build("docs", sessions=200,
rate=4, arrival="gamma:3", overrides={"num_docs": 16})`.

Synthetic generators ("chat", "docs", "agent", "reasoning") take overrides of any field of their config;
override values may be strings (as a command line gives them) and are converted to the
field's type. `scale` and `max_context` are build() arguments, not overrides. Trace
workloads ("sharegpt", "burstgpt") need trace=PATH and take no overrides; "burstgpt" with
arrival="trace" replays the trace's own timestamps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workloads import agent, chat, docs, reasoning
from bench.workloads.arrivals import Arrival, parse_arrival
from bench.workloads.model import Workload, WorkloadError
from bench.workloads.sampling import GenConfig
from bench.workloads.traces import TextEncoder, burstgpt_workload, sharegpt_workload


@dataclass(frozen=True)
class Generator:
    config: type[GenConfig]
    generate: Callable[[Any, Arrival, int, int], Workload]
    about: str


WORKLOADS: dict[str, Generator] = {
    "chat": Generator(chat.ChatConfig, chat.generate, "ShareGPT-like multi-turn chat"),
    "docs": Generator(docs.DocsConfig, docs.generate, "LooGLE-like QA over shared documents"),
    "agent": Generator(agent.AgentConfig, agent.generate, "ReAct-like agent, shared prompt"),
    "reasoning": Generator(
        reasoning.ReasoningConfig, reasoning.generate, "single turns, long answers (bursts)"
    ),
}
TRACE_WORKLOADS = {
    "sharegpt": "ShareGPT conversations from a JSON file (trace=PATH)",
    "burstgpt": "BurstGPT requests from a CSV file (trace=PATH)",
}
BUILD_ARGS = ("scale", "max_context")


def known_names() -> list[str]:
    return [*WORKLOADS, *TRACE_WORKLOADS]


def build(
    name: str,
    *,
    sessions: int,
    rate: float,
    arrival: str = "poisson",
    seed: int = 0,
    scale: float = 1.0,
    max_context: int = 4096,
    overrides: Mapping[str, Any] | None = None,
    trace: str | Path | None = None,
    tokenizer: TextEncoder | None = None,
) -> Workload:
    """A seeded workload of `sessions` sessions arriving at `rate` per second by the
    `arrival` process ('poisson', 'gamma:CV', 'onoff:ON_S:OFF_S', 'spike:N:WITHIN_S:AT_S';
    'trace' for burstgpt).
    `tokenizer` encodes ShareGPT text; None means the embedded models' byte tokenizer."""
    if name not in WORKLOADS and name not in TRACE_WORKLOADS:
        raise WorkloadError(f"unknown workload {name!r}; known: {', '.join(known_names())}")
    if sessions < 0:
        raise WorkloadError(f"sessions must be >= 0, got {sessions}")
    if name in TRACE_WORKLOADS:
        return _build_trace(
            name, sessions, rate, arrival, seed, scale, max_context, overrides, trace, tokenizer
        )
    if trace is not None:
        raise WorkloadError(
            f"{name} is generated; trace= is for {' and '.join(TRACE_WORKLOADS)} only"
        )
    gen = WORKLOADS[name]
    cfg = make_config(name, scale=scale, max_context=max_context, overrides=overrides)
    return gen.generate(cfg, parse_arrival(arrival, rate), sessions, seed)


def make_config(
    name: str,
    *,
    scale: float = 1.0,
    max_context: int = 4096,
    overrides: Mapping[str, Any] | None = None,
) -> GenConfig:
    """The named generator's config with `overrides` applied (checked and converted)."""
    if name not in WORKLOADS:
        raise WorkloadError(f"unknown generator {name!r}; known: {', '.join(WORKLOADS)}")
    cls = WORKLOADS[name].config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {"scale": scale, "max_context": max_context}
    for key, value in (overrides or {}).items():
        if key in BUILD_ARGS:
            raise WorkloadError(f"{name}: {key} is a build() argument, not an override")
        if key not in fields:
            valid = ", ".join(k for k in fields if k not in BUILD_ARGS)
            raise WorkloadError(f"{name}: unknown override {key!r}; valid: {valid}")
        values[key] = _coerce(name, key, fields[key].default, value)
    return cls(**values)


def _build_trace(
    name: str,
    sessions: int,
    rate: float,
    arrival: str,
    seed: int,
    scale: float,
    max_context: int,
    overrides: Mapping[str, Any] | None,
    trace: str | Path | None,
    tokenizer: TextEncoder | None,
) -> Workload:
    if trace is None:
        raise WorkloadError(f"{name} replays a trace file: pass trace=PATH")
    if overrides:
        raise WorkloadError(f"{name} takes no overrides, got {', '.join(overrides)}")
    if name == "burstgpt":
        process = None if arrival.strip().lower() == "trace" else parse_arrival(arrival, rate)
        return burstgpt_workload(
            trace,
            sessions=sessions,
            arrival=process,
            seed=seed,
            scale=scale,
            max_context=max_context,
        )
    return sharegpt_workload(
        trace,
        tokenizer if tokenizer is not None else _byte_tokenizer(),
        sessions=sessions,
        arrival=parse_arrival(arrival, rate),
        seed=seed,
        scale=scale,
        max_context=max_context,
    )


def _byte_tokenizer() -> TextEncoder:
    # Imported here: the `tokenizers` library is only needed when a ShareGPT file is read.
    from common.tokenizer import Tokenizer, build_byte_tokenizer

    return Tokenizer(build_byte_tokenizer())


def _coerce(name: str, key: str, default: Any, value: Any) -> Any:
    """`value` as the type of the field's default; strings are parsed ("16", "0.5", "35,130")."""
    try:
        return _convert(default, value)
    except (TypeError, ValueError, OverflowError):
        raise WorkloadError(
            f"{name}: override {key}={value!r} is not a valid {type(default).__name__} "
            f"(default {default!r})"
        ) from None


def _convert(default: Any, value: Any) -> Any:
    if isinstance(value, bool):  # no config field is a flag; True would pass as 1
        raise TypeError
    if isinstance(default, tuple):
        parts = value.split(",") if isinstance(value, str) else list(value)
        return tuple(type(d)(p) for d, p in zip(default, parts, strict=True))
    if isinstance(default, int):
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError
        return int(number)
    if isinstance(default, float):
        return float(value)
    return value
