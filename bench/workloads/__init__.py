"""Seeded synthetic workloads and trace loaders for the serving benchmarks.

- model.py: Turn, Session, Workload (the data every load client reads), WorkloadError,
  prompt_lengths and fit_context (the max_context rule);
- arrivals.py: when sessions start (poisson, gamma, onoff, spike, trace) and parse_arrival;
- sampling.py: what the generators share (common config knobs, length and turn-count
  draws, assembly into a Workload);
- chat.py, docs.py, agent.py, reasoning.py: ShareGPT-like, LooGLE-like, ReAct-like and
  chain-of-thought-like (single turn, long answers) generators;
- traces.py: ShareGPT JSON and BurstGPT CSV loaders, TraceError;
- registry.py: workloads by name, build().

Same (name, config, seed) → equal Workload; token ids are byte-level tokenizer ids.
"""

from __future__ import annotations

from bench.workloads.agent import AgentConfig
from bench.workloads.arrivals import (
    Arrival,
    gamma,
    onoff,
    parse_arrival,
    poisson,
    spike,
    trace,
)
from bench.workloads.chat import ChatConfig
from bench.workloads.docs import DocsConfig
from bench.workloads.model import (
    Session,
    Turn,
    Workload,
    WorkloadError,
    fit_context,
    prompt_lengths,
)
from bench.workloads.reasoning import ReasoningConfig
from bench.workloads.registry import WORKLOADS, build, known_names, make_config
from bench.workloads.traces import (
    TraceError,
    burstgpt_workload,
    load_burstgpt,
    load_sharegpt,
    sharegpt_workload,
)

__all__ = [
    "WORKLOADS",
    "AgentConfig",
    "Arrival",
    "ChatConfig",
    "DocsConfig",
    "ReasoningConfig",
    "Session",
    "TraceError",
    "Turn",
    "Workload",
    "WorkloadError",
    "build",
    "burstgpt_workload",
    "fit_context",
    "gamma",
    "known_names",
    "load_burstgpt",
    "load_sharegpt",
    "make_config",
    "onoff",
    "parse_arrival",
    "poisson",
    "prompt_lengths",
    "sharegpt_workload",
    "spike",
    "trace",
]
