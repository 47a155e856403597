"""Token selection from the last-position logits of each request.

Greedy rows (temperature 0) take the argmax in one batched op. Sampled rows apply, in
transformers' order, temperature, top-k, then top-p (the smallest set of tokens whose
probability reaches top_p, the most likely always kept); filtered tokens get -inf, so
they can never be drawn. Each request draws from its own `torch.Generator`, so a seeded
request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.sampling import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """1-D logits -> temperature-scaled logits with disallowed tokens set to -inf."""
    x = logits.float() / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p.
        drop_sorted = (cum - torch.softmax(sorted_x, dim=-1)) >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """logits [S, V] -> one token id per row."""
    tokens = torch.argmax(logits, dim=-1).tolist()
    for row, p in enumerate(params):
        if p.greedy:
            continue
        # Generators live on the CPU, so sampled rows are drawn there (one row, cheap).
        probs = torch.softmax(filter_logits(logits[row].cpu(), p), dim=-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generators[row]).item())
    return tokens
