"""ShareGPT-like multi-turn chat: each session is a conversation whose turns each add a user
message to the history the gateway prepends.

Defaults are approximations of ShareGPT (ShareGPT_V3_unfiltered_cleaned_split, as the vLLM
and MemServe serving benchmarks use it, Llama-family tokenizers):
- turns per session: 1 + geometric, mean 3.5 — multi-turn ShareGPT conversations average
  roughly 3-4 user turns (a long tail of much longer ones, cut here at 32 turns and further
  by max_context);
- user message tokens: lognormal, mean 160, sigma 1.0 — ShareGPT inputs average roughly
  160-250 tokens per turn with a heavy right tail;
- answer tokens (max_tokens): lognormal, mean 240, sigma 1.0 — ShareGPT outputs average
  roughly 200-340 tokens per turn;
- think time between turns: 0 (back-to-back turns stress caching hardest); if set, it is the
  mean of an exponential pause.
Every length is clamped to [1, *_max] (after `scale`), and the configured means are what the
clamped samples average to. Sessions are independent: group is "".
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.workloads.arrivals import Arrival
from bench.workloads.model import Turn, Workload
from bench.workloads.sampling import BOS, GenConfig, content_rng, non_negative, think_time

NAME = "chat"


@dataclass(frozen=True)
class ChatConfig(GenConfig):
    turns_mean: float = 3.5
    max_turns: int = 32
    user_tokens_mean: float = 160.0
    user_tokens_sigma: float = 1.0
    user_tokens_max: int = 2048
    answer_tokens_mean: float = 240.0
    answer_tokens_sigma: float = 1.0
    answer_tokens_max: int = 2048
    think_s: float = 0.0  # mean user think time between turns (exponential); 0: none

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_counts("turns")
        self.check_lengths("user_tokens", "answer_tokens")
        non_negative(self, "think_s", self.think_s)


def generate(cfg: ChatConfig, arrival: Arrival, n_sessions: int, seed: int) -> Workload:
    streams = content_rng(NAME, seed)
    rng, ids = streams.shape, streams.ids
    user = cfg.lengths("user_tokens")
    answer = cfg.lengths("answer_tokens")
    drafts = []
    for _ in range(n_sessions):
        turns = []
        for i in range(cfg.turn_count(rng, "turns")):
            message = cfg.token_ids(ids, user.sample(rng))
            turns.append(
                Turn(
                    tokens=(BOS, *message) if i == 0 else message,
                    max_tokens=answer.sample(rng),
                    think_s=0.0 if i == 0 else think_time(rng, cfg.think_s),
                )
            )
        drafts.append((turns, ""))
    return cfg.workload(NAME, drafts, arrival, seed)
