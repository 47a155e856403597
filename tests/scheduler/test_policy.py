"""Routing policies: locality prefers the prefix holder unless the cluster is imbalanced
(both thresholds), the transfer-vs-recompute decision goes both ways, least-load and
round-robin rotate fairly, sessions stick while their instance stays eligible."""

from __future__ import annotations

from collections import Counter

import pytest

from services.scheduler.policy import (
    Candidate,
    CostModel,
    LeastLoad,
    Locality,
    RequestInfo,
    RoundRobin,
    Session,
    make_policy,
)


def c(iid: str, load: int = 0, matched: int = 0, kv: float = 0.0, **kw: object) -> Candidate:
    return Candidate(iid, load, matched, kv, **kw)  # type: ignore[arg-type]


def locality() -> Locality:
    return Locality(abs_threshold_tokens=2048, rel_threshold=1.5, cache_threshold=0.3)


def test_locality_picks_the_longest_prefix_when_balanced() -> None:
    pol = locality()
    cands = [c("a", load=1000, matched=0), c("b", load=1500, matched=512), c("c", matched=128)]
    choice = pol.choose(cands, RequestInfo(1000))
    assert choice.candidate.instance_id == "b" and choice.reason == "prefix"


def test_locality_ignores_a_prefix_below_the_cache_threshold() -> None:
    pol = locality()
    cands = [c("a", load=100), c("b", load=300, matched=256)]
    choice = pol.choose(cands, RequestInfo(1000))  # 25.6% < 30%
    assert choice.candidate.instance_id == "a" and choice.reason == "load"


def test_locality_under_imbalance_goes_to_least_load() -> None:
    pol = locality()
    # 5000 - 1000 > 2048 and 5000 > 1.5 * 1000: imbalanced.
    cands = [c("a", load=1000), c("b", load=5000, matched=900)]
    choice = pol.choose(cands, RequestInfo(1000))
    assert choice.candidate.instance_id == "a" and choice.reason == "imbalanced"


@pytest.mark.parametrize(
    ("loads", "why"),
    [
        ((10000, 11500), "relative gap 1.15 <= 1.5"),
        ((0, 2000), "absolute gap 2000 <= 2048"),
    ],
)
def test_locality_needs_both_thresholds_to_call_it_imbalanced(
    loads: tuple[int, int], why: str
) -> None:
    pol = locality()
    cands = [c("a", load=loads[0]), c("b", load=loads[1], matched=900)]
    assert pol.choose(cands, RequestInfo(1000)).candidate.instance_id == "b", why


def test_ties_rotate_instead_of_always_the_first() -> None:
    for pol in (locality(), LeastLoad()):
        cands = [c("a"), c("b"), c("c")]
        picks = Counter(pol.choose(cands, RequestInfo(100)).candidate.instance_id for _ in range(9))
        assert picks == {"a": 3, "b": 3, "c": 3}, type(pol).__name__
    # Equal best prefixes rotate too (between the holders only).
    pol = locality()
    cands = [c("a", matched=512), c("b", matched=512), c("c")]
    picks = Counter(pol.choose(cands, RequestInfo(1000)).candidate.instance_id for _ in range(4))
    assert picks == {"a": 2, "b": 2}


def test_least_load_counts_tokens_then_kv_usage() -> None:
    pol = LeastLoad()
    assert (
        pol.choose([c("a", load=10), c("b", load=5)], RequestInfo(1)).candidate.instance_id == "b"
    )
    cands = [c("a", load=5, kv=0.9), c("b", load=5, kv=0.2)]
    assert pol.choose(cands, RequestInfo(1)).candidate.instance_id == "b"


def test_round_robin_rotates_over_the_eligible() -> None:
    pol = RoundRobin()
    cands = [c("a", load=0), c("b", load=10**6), c("c")]
    picks = [pol.choose(cands, RequestInfo(1)).candidate.instance_id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_session_affinity_holds_while_eligible() -> None:
    pol = Session()
    first = pol.choose([c("a", load=5), c("b")], RequestInfo(10, "s1"))
    assert first.candidate.instance_id == "b" and first.reason == "new-session"
    # b is now the busier one, but s1 stays with it.
    again = pol.choose([c("a"), c("b", load=10**6)], RequestInfo(10, "s1"))
    assert again.candidate.instance_id == "b" and again.reason == "session"
    # b went away: s1 moves to the least loaded and stays there.
    moved = pol.choose([c("a", load=9), c("z")], RequestInfo(10, "s1"))
    assert moved.candidate.instance_id == "z"
    assert pol.choose([c("a"), c("z", load=99)], RequestInfo(10, "s1")).candidate.instance_id == "z"
    # No session id: least load, nothing remembered.
    assert pol.choose([c("a", load=1), c("z")], RequestInfo(10)).candidate.instance_id == "z"


def cost(bytes_per_s: float = 2e9, min_fetch: int = 64) -> CostModel:
    return CostModel(
        prefill_tokens_per_s=20000,
        attention_coeff=1e-9,
        transfer_bytes_per_s=bytes_per_s,
        min_fetch_tokens=min_fetch,
    )


def test_fetch_when_moving_the_prefix_beats_recomputing_it() -> None:
    here = c("a", matched=0, mempool="m-a", block_size=16, block_bytes=64 * 1024)
    there = c("b", load=10**6, matched=3072, mempool="m-b", block_size=16, block_bytes=64 * 1024)
    model = cost()
    # 192 blocks * 64 KiB at 2 GB/s ~ 6 ms; recomputing 3072 tokens ~ 160 ms.
    assert model.transfer_s(192, 64 * 1024) < model.exec_s(4096, 0) - model.exec_s(4096, 3072)
    fetch = model.fetch(here, [here, there], 4096)
    assert fetch is not None
    assert (fetch.instance_id, fetch.mempool, fetch.num_tokens) == ("b", "m-b", 3072)


def test_recompute_when_the_link_is_slow_or_the_extra_is_small() -> None:
    here = c("a", matched=0, mempool="m-a", block_size=16, block_bytes=64 * 1024)
    there = c("b", matched=3072, mempool="m-b", block_size=16, block_bytes=64 * 1024)
    assert cost(bytes_per_s=1e6).fetch(here, [there], 4096) is None  # 12 s to move it
    assert cost(min_fetch=4096).fetch(here, [there], 4096) is None
    # Nobody holds more than the chosen instance: nothing to fetch.
    assert cost().fetch(there, [here], 4096) is None
    # Another block size cannot be transferred block for block.
    odd = c("b", matched=3072, mempool="m-b", block_size=32, block_bytes=64 * 1024)
    assert cost().fetch(here, [odd], 4096) is None


def test_make_policy_names() -> None:
    for name in ("locality", "least-load", "round-robin", "session"):
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        make_policy("fastest")
