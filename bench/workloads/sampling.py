"""What the synthetic generators share: the common config knobs, the random draws they make,
and the assembly of drafted sessions into a Workload.

Invariants:
- `LengthDist.sample` returns an int in [1, max] whose expectation is the configured mean
  even after clamping (mu is solved for the clamped mean), so `mean=160` means the samples
  average to 160, not a lognormal's median or pre-clamp mean;
- `turn_count` is 1 + a geometric count, capped, with the configured mean (before the cap;
  caps are set far enough out that they move the mean by well under 1%);
- `token_ids` returns ids in the half-open `vocab` range only, and `GenConfig` refuses a
  range that includes the specials 0 (<pad>), 1 (<s>) and 2 (</s>);
- content (shape and token ids) and arrival times come from separate streams seeded from
  (workload, seed): the same seed gives the same sessions whatever the arrival process, the
  same structure whatever the scale, and the first N sessions of a larger workload equal a
  workload of N sessions.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.workloads.arrivals import Arrival
from bench.workloads.model import Session, Turn, Workload, WorkloadError, fit_context

BOS = 1
MAX_SIGMA = 4.0  # beyond this a lognormal's mean is carried by a handful of samples


@dataclass(frozen=True)
class GenConfig:
    """Fields every synthetic generator's config has."""

    # Byte-level tokenizer ids are byte + 3; 35..129 are printable ASCII (bytes 32..126), so
    # the decoded prompts are readable text. Half-open.
    vocab: tuple[int, int] = (35, 130)
    # Multiplies every token length (means and maxima, not counts or times), so a CPU run can
    # shrink a workload and keep its shape.
    scale: float = 1.0
    # Every request's prompt (history included) + max_tokens stays within this.
    max_context: int = 4096

    def __post_init__(self) -> None:
        lo, hi = self.vocab
        if lo < 3 or hi <= lo:
            raise WorkloadError(
                f"vocab must be a half-open range [lo, hi) with 3 <= lo < hi (ids 0-2 are "
                f"specials), got {self.vocab}"
            )
        positive(self, "scale", self.scale)
        if self.max_context < 2:
            raise WorkloadError(f"max_context must be >= 2, got {self.max_context}")

    # A generator's config names its distributions by prefix: `<p>_mean`, `<p>_sigma` and
    # `<p>_max` for a length, `<p>_mean` and `max_<p>` for a turn count.

    def check_lengths(self, *prefixes: str) -> None:
        """Check each named length distribution's fields, in the order given."""
        for prefix in prefixes:
            check_length(self, prefix, *self._length_fields(prefix))

    def check_counts(self, *prefixes: str) -> None:
        """Check each named turn count's fields, in the order given."""
        for prefix in prefixes:
            check_count(self, prefix, *self._count_fields(prefix))

    def lengths(self, prefix: str) -> LengthDist:
        """The `prefix` length distribution, scaled by `scale`."""
        return LengthDist.of(*self._length_fields(prefix), self.scale)

    def turn_count(self, rng: random.Random, prefix: str) -> int:
        """One draw of the `prefix` turn count (see `turn_count`)."""
        return turn_count(rng, *self._count_fields(prefix))

    def token_ids(self, rng: random.Random, n: int) -> tuple[int, ...]:
        """`n` token ids from this config's vocab."""
        return token_ids(rng, self.vocab, n)

    def workload(
        self, name: str, drafts: Sequence[tuple[Sequence[Turn], str]], arrival: Arrival, seed: int
    ) -> Workload:
        """The drafted sessions assembled (see `assemble`), params holding this config."""
        return assemble(name, drafts, arrival, seed, self.max_context, config_dict(self))

    def _length_fields(self, prefix: str) -> tuple[Any, Any, Any]:
        return (
            getattr(self, f"{prefix}_mean"),
            getattr(self, f"{prefix}_sigma"),
            getattr(self, f"{prefix}_max"),
        )

    def _count_fields(self, prefix: str) -> tuple[Any, Any]:
        return getattr(self, f"{prefix}_mean"), getattr(self, f"max_{prefix}")


def positive(cfg: object, name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise WorkloadError(f"{type(cfg).__name__}.{name} must be > 0, got {value}")


def non_negative(cfg: object, name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise WorkloadError(f"{type(cfg).__name__}.{name} must be >= 0, got {value}")


def check_length(cfg: object, prefix: str, mean: float, sigma: float, max_len: int) -> None:
    """`<prefix>_mean`, `<prefix>_sigma`, `<prefix>_max` of a lengths distribution."""
    positive(cfg, f"{prefix}_mean", mean)
    if not 0 <= sigma <= MAX_SIGMA:
        raise WorkloadError(
            f"{type(cfg).__name__}.{prefix}_sigma must be in [0, {MAX_SIGMA}], got {sigma}"
        )
    if max_len < 1:
        raise WorkloadError(f"{type(cfg).__name__}.{prefix}_max must be >= 1, got {max_len}")


def check_count(cfg: object, prefix: str, mean: float, max_count: int) -> None:
    """`<prefix>_mean` (>= 1) and `max_<prefix>` of a turn count."""
    if not (mean >= 1 and math.isfinite(mean)):
        raise WorkloadError(f"{type(cfg).__name__}.{prefix}_mean must be >= 1, got {mean}")
    if max_count < 1:
        raise WorkloadError(f"{type(cfg).__name__}.max_{prefix} must be >= 1, got {max_count}")


@dataclass(frozen=True)
class LengthDist:
    """A lognormal length with a given MEAN, rounded and clamped to [1, max]."""

    mean: float
    sigma: float
    max: int
    mu: float  # log-scale location solved so that E[clamp(X, 1, max)] == mean

    @classmethod
    def of(cls, mean: float, sigma: float, max_len: int, scale: float = 1.0) -> LengthDist:
        top = max(1, round(max_len * scale))
        target = min(max(mean * scale, 1.0), float(top))
        return cls(target, sigma, top, _solve_mu(target, sigma, top))

    def sample(self, rng: random.Random) -> int:
        # One normal draw every time, degenerate cases included, so that the draws after it
        # do not depend on this distribution's parameters (see ContentRng).
        z = rng.gauss(0.0, 1.0)
        if self.sigma == 0 or self.mean <= 1 or self.mean >= self.max:
            return min(max(round(self.mean), 1), self.max)
        return min(max(round(math.exp(self.mu + self.sigma * z)), 1), self.max)


def _solve_mu(mean: float, sigma: float, top: int) -> float:
    if sigma == 0 or mean <= 1 or mean >= top:
        return math.log(mean)
    lo = math.log(mean) - sigma * sigma / 2 - 20 * sigma - 20
    hi = math.log(top) + 20 * sigma + 20
    for _ in range(100):  # bisection: the clamped mean grows with mu
        mid = (lo + hi) / 2
        if _clamped_mean(mid, sigma, top) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _clamped_mean(mu: float, sigma: float, top: int) -> float:
    """E[clamp(X, 1, top)] for X ~ LogNormal(mu, sigma)."""
    log_top = math.log(top)
    body = math.exp(mu + sigma * sigma / 2) * (
        _phi((log_top - mu - sigma * sigma) / sigma) - _phi((-mu - sigma * sigma) / sigma)
    )
    below = _phi(-mu / sigma)  # mass under 1, counted as 1
    above = top * (1 - _phi((log_top - mu) / sigma))
    return body + below + above


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def turn_count(rng: random.Random, mean: float, max_count: int) -> int:
    """1 + Geometric(mean - 1) (a session continues after each turn with a fixed
    probability), capped at max_count."""
    u = 1.0 - rng.random()  # in (0, 1]; drawn even when mean is 1, for stream alignment
    extra_mean = mean - 1
    if extra_mean <= 0:
        return 1
    stay = extra_mean / (1 + extra_mean)
    extra = math.floor(math.log(u) / math.log(stay))
    return min(1 + extra, max_count)


def token_ids(rng: random.Random, vocab: tuple[int, int], n: int) -> tuple[int, ...]:
    return tuple(rng.choices(range(vocab[0], vocab[1]), k=n))


def think_time(rng: random.Random, mean_s: float) -> float:
    """Exponential pause with the given mean (0: none); one draw either way."""
    return rng.expovariate(1.0) * mean_s


@dataclass(frozen=True)
class ContentRng:
    """Two streams per workload: `shape` draws every count, length, choice and pause, `ids`
    draws only token ids. Lengths then never shift the shape stream, so the same seed at
    another `scale` or `vocab` gives the same sessions, turns and picks, lengths scaled."""

    shape: random.Random
    ids: random.Random


def content_rng(name: str, seed: int) -> ContentRng:
    # String seeds are hashed (sha512) by random.Random: stable across runs and platforms.
    return ContentRng(random.Random(f"{name}/shape/{seed}"), random.Random(f"{name}/ids/{seed}"))


def arrivals_rng(name: str, seed: int) -> random.Random:
    return random.Random(f"{name}/arrivals/{seed}")


def session_id(name: str, index: int) -> str:
    return f"{name}-{index:04d}"


def assemble(
    name: str,
    drafts: Sequence[tuple[Sequence[Turn], str]],
    arrival: Arrival,
    seed: int,
    max_context: int,
    config: dict[str, Any],
) -> Workload:
    """Sessions from drafted (turns, group) pairs: fitted to max_context, named in order and
    given arrival times from the arrivals stream; params = config + seed + arrival."""
    times = arrival.times(len(drafts), arrivals_rng(name, seed))
    sessions = tuple(
        Session(session_id(name, i), t, fit_context(turns, max_context), group)
        for i, ((turns, group), t) in enumerate(zip(drafts, times, strict=True))
    )
    params = {
        "workload": name,
        "config": json_safe(config),
        "seed": seed,
        "sessions": len(drafts),
        "arrival": arrival.as_dict(),
    }
    return Workload(name, sessions, params)


def config_dict(cfg: object) -> dict[str, Any]:
    assert dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
    return dataclasses.asdict(cfg)


def json_safe(value: Any) -> Any:
    """Tuples as lists, non-finite floats as strings: what json.dumps(allow_nan=False) takes
    and what a results file reads back equal."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
