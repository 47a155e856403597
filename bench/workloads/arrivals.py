"""Session arrival processes: when each session's first turn is sent.

Every process starts at 0 (the first session arrives when the run starts) and returns
non-decreasing times; later sessions follow after n-1 gaps:
- poisson(rate): exponential gaps, mean 1/rate;
- gamma(rate, cv): Gamma gaps with mean 1/rate and coefficient of variation cv (shape 1/cv²,
  scale cv²/rate). cv=1 is Poisson; cv>1 is bursty — BurstGPT (Wang et al., 2024) fits its
  ChatGPT/GPT-4 request gaps with Gamma distributions of this kind;
- onoff(rate, on_s, off_s): Poisson at `rate` during on periods of on_s seconds, nothing
  during the off periods of off_s seconds that follow each (a burst trace);
- spike(rate, n, within_s, at_s, bursts=1, every_s=0): steady plus spikes (KunServe's
  bursts): n sessions arrive uniformly at random within [at_s, at_s + within_s], and
  again every `every_s` seconds for `bursts` spikes in all; the others are Poisson at
  `rate` from 0 (the base load around them); merged in time order. Needs at least
  n * bursts sessions; a spike keeps its time (it does not move to 0 when nothing else
  comes first);
- trace(times): recorded times (e.g. a BurstGPT CSV's timestamps), sorted, shifted to 0.
A rate of 0 or inf means "all at once": every session (spike: every base session) arrives at 0.

`parse_arrival` reads the command-line form: "poisson", "gamma:CV", "onoff:ON:OFF",
"spike:N:S:T" or "spike:N:S:T:BURSTS:EVERY_S".
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench.workloads.model import WorkloadError

KINDS = ("poisson", "gamma", "onoff", "spike", "trace")
SPEC_HELP = (
    "expected 'poisson', 'gamma:CV', 'onoff:ON_S:OFF_S' or 'spike:N:WITHIN_S:AT_S[:BURSTS:EVERY_S]'"
)


@dataclass(frozen=True)
class Arrival:
    kind: str  # one of KINDS
    rate: float  # sessions per second (during on periods for onoff); 0 or inf: all at once
    cv: float = 1.0  # gamma only: coefficient of variation of the gaps
    on_s: float = 0.0  # onoff only
    off_s: float = 0.0  # onoff only
    spike_n: int = 0  # spike only: sessions in the spike
    spike_within_s: float = 0.0  # spike only: they arrive within this many seconds
    spike_at_s: float = 0.0  # spike only: from this time on
    spike_bursts: int = 1  # spike only: how many spikes
    spike_every_s: float = 0.0  # spike only: from one spike's start to the next's
    trace_times: tuple[float, ...] = field(default=(), repr=False)  # trace only, sorted

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise WorkloadError(f"unknown arrival kind {self.kind!r}; known: {', '.join(KINDS)}")
        if not self.rate >= 0:  # also rejects nan
            raise WorkloadError(
                f"arrival rate must be >= 0 (0 or inf: all at once), got {self.rate}"
            )
        if self.kind == "gamma" and not (self.cv > 0 and math.isfinite(self.cv)):
            raise WorkloadError(f"gamma arrivals: cv must be a positive number, got {self.cv}")
        if self.kind == "onoff" and not (self.on_s > 0 and self.off_s >= 0):
            raise WorkloadError(
                f"onoff arrivals: need on_s > 0 and off_s >= 0, got on_s={self.on_s} off_s={self.off_s}"
            )
        if self.kind == "spike" and not (
            self.spike_n >= 1
            and 0 <= self.spike_within_s < math.inf
            and 0 <= self.spike_at_s < math.inf
        ):
            raise WorkloadError(
                "spike arrivals: need N >= 1 sessions, WITHIN_S >= 0 and AT_S >= 0, got "
                f"N={self.spike_n} WITHIN_S={self.spike_within_s} AT_S={self.spike_at_s}"
            )
        if self.kind == "spike" and not (
            self.spike_bursts >= 1
            and (self.spike_bursts == 1 or self.spike_within_s < self.spike_every_s < math.inf)
        ):
            raise WorkloadError(
                "spike arrivals: need BURSTS >= 1 and, for more than one, WITHIN_S < EVERY_S, "
                f"got BURSTS={self.spike_bursts} EVERY_S={self.spike_every_s}"
            )

    @property
    def all_at_once(self) -> bool:
        return self.kind not in ("trace", "spike") and (self.rate == 0 or math.isinf(self.rate))

    def times(self, n: int, rng: random.Random) -> list[float]:
        """Arrival times of n sessions, starting at 0, non-decreasing."""
        if n <= 0:
            return []
        if self.kind == "trace":
            return self._trace_times(n)
        if self.kind == "spike":
            return self._spike_times(n, rng)
        if self.all_at_once:
            return [0.0] * n
        times = [0.0]
        for _ in range(n - 1):
            times.append(times[-1] + self._gap(rng))
        if self.kind == "onoff":
            return [self._wall_time(t) for t in times]
        return times

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe description for results files (inf as "inf"; a trace by its length)."""
        rate: float | str = self.rate if math.isfinite(self.rate) else "inf"
        out: dict[str, Any] = {"kind": self.kind, "rate": rate}
        if self.kind == "gamma":
            out["cv"] = self.cv
        elif self.kind == "onoff":
            out.update(on_s=self.on_s, off_s=self.off_s)
        elif self.kind == "spike":
            out.update(n=self.spike_n, within_s=self.spike_within_s, at_s=self.spike_at_s)
            if self.spike_bursts > 1:
                out.update(bursts=self.spike_bursts, every_s=self.spike_every_s)
        elif self.kind == "trace":
            out["trace_len"] = len(self.trace_times)
        return out

    def spike_windows(self) -> list[tuple[float, float]]:
        """[start, start + within_s] of each spike of a spike process ([] for the others)."""
        if self.kind != "spike":
            return []
        starts = (self.spike_at_s + b * self.spike_every_s for b in range(self.spike_bursts))
        return [(t, t + self.spike_within_s) for t in starts]

    def _spike_times(self, n: int, rng: random.Random) -> list[float]:
        total = self.spike_n * self.spike_bursts
        if n < total:
            raise WorkloadError(
                f"spike arrivals: {total} sessions in the spikes, only {n} in the workload"
            )
        # The spikes first, then the base, from one stream: the same seed gives the same
        # times, and the spikes' times do not depend on the base's rate or count.
        spike = [
            start + self.spike_within_s * rng.random()
            for start, _ in self.spike_windows()
            for _ in range(self.spike_n)
        ]
        base = Arrival("poisson", self.rate).times(n - total, rng)
        return sorted(base + spike)

    def _gap(self, rng: random.Random) -> float:
        if self.kind == "gamma":
            shape = 1.0 / (self.cv * self.cv)
            return rng.gammavariate(shape, 1.0 / (self.rate * shape))
        # poisson, and onoff in "active" (on-period) time
        return rng.expovariate(self.rate)

    def _wall_time(self, active_s: float) -> float:
        # Arrivals are drawn on a clock that only runs during on periods; each completed on
        # period adds an off period to the wall clock, so nothing lands in an off window.
        cycles = math.floor(active_s / self.on_s)
        return cycles * (self.on_s + self.off_s) + (active_s - cycles * self.on_s)

    def _trace_times(self, n: int) -> list[float]:
        if n > len(self.trace_times):
            raise WorkloadError(
                f"trace arrivals: {n} sessions requested, the trace has {len(self.trace_times)}"
            )
        start = self.trace_times[0]
        return [t - start for t in self.trace_times[:n]]


def poisson(rate: float) -> Arrival:
    return Arrival("poisson", rate)


def gamma(rate: float, cv: float) -> Arrival:
    return Arrival("gamma", rate, cv=cv)


def onoff(rate: float, on_s: float, off_s: float) -> Arrival:
    return Arrival("onoff", rate, on_s=on_s, off_s=off_s)


def spike(
    rate: float, n: int, within_s: float, at_s: float, bursts: int = 1, every_s: float = 0.0
) -> Arrival:
    return Arrival(
        "spike",
        rate,
        spike_n=n,
        spike_within_s=within_s,
        spike_at_s=at_s,
        spike_bursts=bursts,
        spike_every_s=every_s,
    )


def trace(times: Iterable[float]) -> Arrival:
    """Recorded arrival times; `rate` is set to the trace's mean rate, for information only."""
    ts = tuple(sorted(float(t) for t in times))
    if not ts:
        raise WorkloadError("trace arrivals: no times given")
    if not all(math.isfinite(t) for t in ts):
        raise WorkloadError("trace arrivals: times must be finite numbers")
    span = ts[-1] - ts[0]
    return Arrival("trace", (len(ts) - 1) / span if span > 0 else math.inf, trace_times=ts)


def parse_arrival(spec: str, rate: float) -> Arrival:
    """'poisson' | 'gamma:CV' | 'onoff:ON_S:OFF_S' | 'spike:N:WITHIN_S:AT_S' at `rate`
    sessions per second (spike: the base rate around the spike)."""
    kind, *args = spec.strip().lower().split(":")
    if kind == "poisson":
        _expect_args(spec, args, 0)
        return poisson(rate)
    if kind == "gamma":
        _expect_args(spec, args, 1)
        return gamma(rate, _number(spec, "CV", args[0]))
    if kind == "onoff":
        _expect_args(spec, args, 2)
        return onoff(rate, _number(spec, "ON_S", args[0]), _number(spec, "OFF_S", args[1]))
    if kind == "spike":
        if len(args) != 5:
            _expect_args(spec, args, 3)
        n = _whole(spec, "N", args[0])
        bursts, every = (_whole(spec, "BURSTS", args[3]), args[4]) if len(args) == 5 else (1, "0")
        return spike(
            rate,
            n,
            _number(spec, "WITHIN_S", args[1]),
            _number(spec, "AT_S", args[2]),
            bursts,
            _number(spec, "EVERY_S", every),
        )
    if kind == "trace":
        raise WorkloadError(
            "arrival 'trace' replays recorded timestamps: use workload burstgpt with trace=PATH"
        )
    raise WorkloadError(f"arrival {spec!r}: unknown process {kind!r}; {SPEC_HELP}")


def _expect_args(spec: str, args: list[str], count: int) -> None:
    if len(args) != count:
        raise WorkloadError(
            f"arrival {spec!r}: takes {count} parameter(s) after the kind, got {len(args)}; {SPEC_HELP}"
        )


def _number(spec: str, what: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise WorkloadError(f"arrival {spec!r}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise WorkloadError(f"arrival {spec!r}: {what} {text!r} must be finite")
    return value


def _whole(spec: str, name: str, text: str) -> int:
    n = _number(spec, name, text)
    if not n.is_integer():
        raise WorkloadError(f"arrival {spec!r}: {name} {text!r} is not a whole number")
    return int(n)
