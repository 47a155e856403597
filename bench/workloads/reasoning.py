"""Single-turn requests with long answers (chain-of-thought-like), KunServe's burst load:
each request's KV grows for its whole decode, so a burst of them fills the instances' KV
long after their prompts were admitted.

Defaults (tokens, before `scale`): question lognormal mean 256 (sigma 0.8, at most 2048);
answer lognormal mean 1024 (sigma 0.5, at most 4096), the length of a reasoning model's
chain of thought on a math or coding question. `answer_tokens_sigma = 0` makes every
answer exactly `answer_tokens_mean` long (`memserve bench serve --output-len N`). Every
session is one turn; sessions are independent (group "").
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.workloads.arrivals import Arrival
from bench.workloads.model import Turn, Workload
from bench.workloads.sampling import BOS, GenConfig, content_rng

NAME = "reasoning"


@dataclass(frozen=True)
class ReasoningConfig(GenConfig):
    question_tokens_mean: float = 256.0
    question_tokens_sigma: float = 0.8
    question_tokens_max: int = 2048
    answer_tokens_mean: float = 1024.0
    answer_tokens_sigma: float = 0.5
    answer_tokens_max: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_lengths("question_tokens", "answer_tokens")


def generate(cfg: ReasoningConfig, arrival: Arrival, n_sessions: int, seed: int) -> Workload:
    streams = content_rng(NAME, seed)
    rng, ids = streams.shape, streams.ids
    question = cfg.lengths("question_tokens")
    answer = cfg.lengths("answer_tokens")
    drafts = []
    for _ in range(n_sessions):
        message = cfg.token_ids(ids, question.sample(rng))
        drafts.append(([Turn(tokens=(BOS, *message), max_tokens=answer.sample(rng))], ""))
    return cfg.workload(NAME, drafts, arrival, seed)
