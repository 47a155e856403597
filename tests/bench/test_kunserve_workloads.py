"""The KunServe evaluation's workload pieces: the spike arrival process (steady Poisson
plus N sessions within S seconds at T) is deterministic for a seed and matches its spec;
its command-line form and its errors; the reasoning generator (single turns, long
answers) and `--output-len`'s fixed answers."""

from __future__ import annotations

import math
import random

import pytest

from bench.workloads import WorkloadError, build, parse_arrival, spike


def test_the_spike_is_deterministic_for_a_seed() -> None:
    process = spike(2.0, 30, 1.5, 10.0)
    a = process.times(50, random.Random("s/1"))
    assert a == process.times(50, random.Random("s/1"))
    assert a != process.times(50, random.Random("s/2"))


def spike_draws(seed: int, n: int, within: float, at: float) -> list[float]:
    """The spike's own times: its first n draws of the seeded stream (before the base's)."""
    rng = random.Random(seed)
    return [at + within * rng.random() for _ in range(n)]


def test_the_spike_matches_its_spec() -> None:
    n, within, at, total, rate = 40, 2.0, 12.0, 400, 5.0
    times = spike(rate, n, within, at).times(total, random.Random(3))
    assert len(times) == total and times == sorted(times)
    own = spike_draws(3, n, within, at)
    assert all(at <= t <= at + within for t in own)
    base = list(times)
    for t in own:  # N of the times are the spike's, in its window
        base.remove(t)
    # The rest: Poisson at the rate from 0 (mean gap 1 / rate) over total - N sessions.
    assert base[0] == 0.0 and len(base) == total - n
    assert abs(base[-1] / (len(base) - 1) - 1 / rate) < 0.03


def test_the_spike_times_do_not_depend_on_the_base() -> None:
    own = spike_draws(9, 10, 1.0, 4.0)
    for rate, total in ((0.5, 12), (8.0, 60), (0.0, 20)):
        times = spike(rate, 10, 1.0, 4.0).times(total, random.Random(9))
        assert set(own) <= set(times)


def test_a_spike_only_workload_keeps_its_time() -> None:
    times = spike(1.0, 5, 0.0, 3.0).times(5, random.Random(0))
    assert times == [3.0] * 5


def test_the_command_line_form_and_its_record() -> None:
    assert parse_arrival("spike:24:2:5", 0.5) == spike(0.5, 24, 2.0, 5.0)
    w = build("reasoning", sessions=30, rate=0.5, arrival="spike:24:2:5", seed=1, scale=0.1)
    assert w.params["arrival"] == {
        "kind": "spike",
        "rate": 0.5,
        "n": 24,
        "within_s": 2.0,
        "at_s": 5.0,
    }
    assert sum(5.0 <= s.arrival_s <= 7.0 for s in w.sessions) >= 24


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("spike", "takes 3 parameter"),
        ("spike:10:2", "takes 3 parameter"),
        ("spike:ten:2:5", "N 'ten' is not a number"),
        ("spike:2.5:2:5", "N '2.5' is not a whole number"),
        ("spike:0:2:5", "N >= 1"),
        ("spike:10:-1:5", "WITHIN_S >= 0"),
        ("spike:10:1:inf", "AT_S 'inf' must be finite"),
        ("spike:10:1:5:2", "takes 3 parameter"),
        ("spike:10:1:5:1.5:20", "BURSTS '1.5' is not a whole number"),
        ("spike:10:2:5:2:1", "WITHIN_S < EVERY_S"),
        ("spike:10:2:5:0:20", "BURSTS >= 1"),
    ],
)
def test_a_bad_spike_spec_is_named(spec: str, message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        parse_arrival(spec, 1.0)


def test_a_spike_larger_than_the_workload_is_refused() -> None:
    with pytest.raises(WorkloadError, match="24 sessions in the spikes, only 10"):
        build("reasoning", sessions=10, rate=1.0, arrival="spike:24:2:5")


def test_two_bursts_each_match_the_spec() -> None:
    process = parse_arrival("spike:6:1:5:2:20", 0.5)
    assert process == spike(0.5, 6, 1.0, 5.0, bursts=2, every_s=20.0)
    assert process.spike_windows() == [(5.0, 6.0), (25.0, 26.0)]
    times = process.times(20, random.Random(4))
    assert times == process.times(20, random.Random(4))  # deterministic for a seed
    assert sum(5.0 <= t <= 6.0 for t in times) >= 6 and sum(25.0 <= t <= 26.0 for t in times) >= 6
    assert process.as_dict()["bursts"] == 2 and process.as_dict()["every_s"] == 20.0
    with pytest.raises(WorkloadError, match="12 sessions in the spikes, only 10"):
        process.times(10, random.Random(0))


def test_reasoning_is_single_turns_with_long_answers() -> None:
    w = build("reasoning", sessions=400, rate=1.0, seed=2)
    assert all(len(s.turns) == 1 and s.turns[0].tokens[0] == 1 for s in w.sessions)
    summary = w.summary()
    assert abs(summary["mean_max_tokens"] - 1024) < 0.1 * 1024
    assert summary["mean_max_tokens"] > 3 * summary["mean_new_tokens"]
    assert build("reasoning", sessions=400, rate=1.0, seed=2) == w


def test_fixed_answers_as_output_len_sets_them() -> None:
    overrides = {"answer_tokens_mean": "300", "answer_tokens_sigma": "0"}
    w = build("reasoning", sessions=20, rate=1.0, scale=0.5, overrides=overrides)
    assert {s.turns[0].max_tokens for s in w.sessions} == {150}
    assert not math.isnan(w.summary()["mean_prompt_tokens"])
