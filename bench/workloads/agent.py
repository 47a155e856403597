"""ReAct-like agent sessions: a long system prompt shared by every session, then a loop of
thought+action (the model's answer) and observation (the tool's output, the next turn).

Shape:
- the first turn is BOS + the system prompt (instructions and few-shot exemplars, the SAME
  tokens for all sessions: ReAct prompts share their exemplars) + the session's task;
- every later turn adds one observation; every answer is one thought+action;
- think_s of a later turn is the tool latency (the time the action takes to run).

Defaults are approximations of ReAct (Yao et al., ICLR 2023), scaled down where noted:
- system prompt 600 tokens — ReAct's HotpotQA/FEVER prompts hold 3-6 exemplar trajectories,
  ~1.5-3K tokens; scaled down to leave room for the steps in a 4096-token context;
- task 60 tokens (lognormal, sigma 0.5) — a question or claim, one or two sentences;
- steps per session (= turns): 1 + geometric, mean 6 — ReAct trajectories mostly finish in
  a handful of thought/action/observation steps (HotpotQA runs were capped at 7);
- observation 80 tokens (lognormal, sigma 0.8) — a Wikipedia search result: a few sentences;
- thought+action 50 tokens (lognormal, sigma 0.5) — one sentence of reasoning and a call;
- tool latency 0 s (a constant when set).
The configured means are what the clamped samples average to. group is "": every session
shares the system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.workloads.arrivals import Arrival
from bench.workloads.model import Turn, Workload, WorkloadError
from bench.workloads.sampling import BOS, GenConfig, content_rng, non_negative

NAME = "agent"


@dataclass(frozen=True)
class AgentConfig(GenConfig):
    system_tokens: int = 600  # exact length of the shared system prompt (before scale)
    task_tokens_mean: float = 60.0
    task_tokens_sigma: float = 0.5
    task_tokens_max: int = 512
    steps_mean: float = 6.0
    max_steps: int = 32
    observation_tokens_mean: float = 80.0
    observation_tokens_sigma: float = 0.8
    observation_tokens_max: int = 1024
    action_tokens_mean: float = 50.0
    action_tokens_sigma: float = 0.5
    action_tokens_max: int = 512
    tool_latency_s: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.system_tokens < 0:
            raise WorkloadError(f"AgentConfig.system_tokens must be >= 0, got {self.system_tokens}")
        self.check_lengths("task_tokens")
        self.check_counts("steps")
        self.check_lengths("observation_tokens", "action_tokens")
        non_negative(self, "tool_latency_s", self.tool_latency_s)


def generate(cfg: AgentConfig, arrival: Arrival, n_sessions: int, seed: int) -> Workload:
    streams = content_rng(NAME, seed)
    rng, ids = streams.shape, streams.ids
    task = cfg.lengths("task_tokens")
    observation = cfg.lengths("observation_tokens")
    action = cfg.lengths("action_tokens")
    system = (BOS, *cfg.token_ids(ids, round(cfg.system_tokens * cfg.scale)))
    drafts = []
    for _ in range(n_sessions):
        turns = [Turn(system + cfg.token_ids(ids, task.sample(rng)), action.sample(rng))]
        for _ in range(cfg.turn_count(rng, "steps") - 1):
            seen = cfg.token_ids(ids, observation.sample(rng))
            turns.append(Turn(seen, action.sample(rng), think_s=cfg.tool_latency_s))
        drafts.append((turns, ""))
    return cfg.workload(NAME, drafts, arrival, seed)
