"""Sampling parameters of one request, as they travel from the client to the engine."""

from __future__ import annotations

import math

import msgspec

from common.errors import InvalidRequestError

SAMPLING_EPS = 1e-5


class SamplingParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Greedy when `temperature` is below `SAMPLING_EPS` (0 included: a smaller one would
    scale the logits to inf, and is greedy in effect anyway; vLLM draws the same line).
    `top_k = 0` and `top_p = 1` disable those filters.

    `seed` makes sampling reproducible per request; `stop` strings end generation (the match
    is not part of the output); `stop_token_ids` end it too (the token is kept, like eos);
    `ignore_eos` keeps going past the model's eos ids until `max_tokens`.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def validate(self) -> SamplingParams:
        """Raise `InvalidRequestError` naming the first bad value; return self when valid."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidRequestError(f"seed must fit in 64 bits, got {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        return self
