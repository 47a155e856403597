"""Token selection from the last-position logits of each request.

Greedy rows (temperature 0) take the argmax in one batched op. Sampled rows apply, in
transformers' order, temperature, top-k, then top-p (the smallest set of tokens whose
probability reaches top_p, the most likely always kept); filtered tokens get -inf, so
they can never be drawn. Each request draws from its own `torch.Generator`, so a seeded
request gives the same tokens whatever else shares its batch; and since the generator's
state can leave with the request (`generator_state`) and be restored by another engine
(`make_generator(..., state=...)`), a request handed from a prefill to a decode worker
draws exactly the tokens it would have drawn in one process.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from common.errors import InvalidRequestError
from common.sampling import SamplingParams


def make_generator(
    params: SamplingParams, rng: random.Random, state: bytes = b""
) -> torch.Generator | None:
    """The request's generator: none for greedy; restored from `state` (a request continued
    from another engine), else seeded with `params.seed`, else with a seed drawn from `rng`
    (the engine's, so an engine's unseeded requests still replay under its own seed)."""
    if params.greedy:
        return None
    g = torch.Generator()
    if state:
        try:
            g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        except RuntimeError as exc:  # a state of another size or generator kind
            raise InvalidRequestError(f"bad generator state ({len(state)} bytes): {exc}") from None
        return g
    return g.manual_seed(params.seed if params.seed is not None else rng.getrandbits(63))


def generator_state(g: torch.Generator | None) -> bytes:
    """What `make_generator(state=...)` needs to go on drawing where `g` stands."""
    return b"" if g is None else g.get_state().numpy().tobytes()


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
