"""LooGLE-like long-document QA: a few long documents shared by many sessions; each session
picks one document and asks several questions about it.

Shape (the point of this workload is the shared prefix):
- the first turn of a session is BOS + the document's tokens + the first question, so every
  session on document k shares the identical prefix BOS + doc k (group = "doc-k");
- each later turn is just the next question; answers are short.

Defaults are approximations of LooGLE (Li et al., 2023), SCALED DOWN in document length:
- LooGLE documents are ~20K tokens long (arXiv papers, Wikipedia articles, scripts); the
  default doc_tokens_mean is 3000 (lognormal, sigma 0.3, max 3584) so a document plus a few
  questions fits the default 4096-token context of the embedded models — raise it (and
  max_context) for a model with a long context;
- num_docs 8, picked uniformly by default; doc_zipf > 0 skews picks towards low-numbered
  documents (P(k) ∝ 1/(k+1)^doc_zipf) to model hot documents;
- questions per session: 1 + geometric, mean 3 (LooGLE has several questions per document);
- question tokens: lognormal mean 30, sigma 0.5; answer tokens mean 40, sigma 0.5 — LooGLE
  questions are one sentence and most answers a short phrase or sentence;
- think time between questions: 0; if set, the mean of an exponential pause.
The configured means are what the clamped samples average to.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from bench.workloads.arrivals import Arrival
from bench.workloads.model import Turn, Workload, WorkloadError
from bench.workloads.sampling import BOS, GenConfig, content_rng, non_negative, think_time

NAME = "docs"


@dataclass(frozen=True)
class DocsConfig(GenConfig):
    num_docs: int = 8
    doc_zipf: float = 0.0  # 0: documents picked uniformly; > 0: Zipf skew towards doc 0
    doc_tokens_mean: float = 3000.0
    doc_tokens_sigma: float = 0.3
    doc_tokens_max: int = 3584
    questions_mean: float = 3.0
    max_questions: int = 16
    question_tokens_mean: float = 30.0
    question_tokens_sigma: float = 0.5
    question_tokens_max: int = 256
    answer_tokens_mean: float = 40.0
    answer_tokens_sigma: float = 0.5
    answer_tokens_max: int = 512
    think_s: float = 0.0  # mean pause between questions (exponential); 0: none

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_docs < 1:
            raise WorkloadError(f"DocsConfig.num_docs must be >= 1, got {self.num_docs}")
        non_negative(self, "doc_zipf", self.doc_zipf)
        self.check_lengths("doc_tokens")
        self.check_counts("questions")
        self.check_lengths("question_tokens", "answer_tokens")
        non_negative(self, "think_s", self.think_s)


def generate(cfg: DocsConfig, arrival: Arrival, n_sessions: int, seed: int) -> Workload:
    streams = content_rng(NAME, seed)
    rng, ids = streams.shape, streams.ids
    doc_len = cfg.lengths("doc_tokens")
    question = cfg.lengths("question_tokens")
    answer = cfg.lengths("answer_tokens")
    # Documents first, so session k of a larger run equals session k of a smaller one.
    prefixes = [(BOS, *cfg.token_ids(ids, doc_len.sample(rng))) for _ in range(cfg.num_docs)]
    cum_weights = list(
        itertools.accumulate(1.0 / (k + 1) ** cfg.doc_zipf for k in range(cfg.num_docs))
    )
    drafts = []
    for _ in range(n_sessions):
        doc = rng.choices(range(cfg.num_docs), cum_weights=cum_weights)[0]
        turns = []
        for i in range(cfg.turn_count(rng, "questions")):
            asked = cfg.token_ids(ids, question.sample(rng))
            turns.append(
                Turn(
                    tokens=prefixes[doc] + asked if i == 0 else asked,
                    max_tokens=answer.sample(rng),
                    think_s=0.0 if i == 0 else think_time(rng, cfg.think_s),
                )
            )
        drafts.append((turns, f"doc-{doc}"))
    return cfg.workload(NAME, drafts, arrival, seed)
