"""Seeded sampling is reproducible, also when a request goes on in another engine from its
generator state; top-k / top-p never emit a token outside the allowed set."""

from __future__ import annotations

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidRequestError
from common.sampling import SamplingParams
from services.worker.sampler import filter_logits, sample
from tests.worker.helpers import MakeEngine, prompt, run_to_end


def allowed_top_p(logits: torch.Tensor, p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches p (reference)."""
    probs = torch.softmax(logits.double(), dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    kept: set[int] = set()
    mass = 0.0
    for tok in order:
        kept.add(tok)
        mass += probs[tok].item()
        if mass >= p:
            break
    return kept


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 64),
    k=st.integers(1, 70),
    temperature=st.floats(0.2, 3.0),
)
def test_top_k_only_emits_the_k_most_likely(
    seed: int, vocab: int, k: int, temperature: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * 3
    params = SamplingParams(temperature=temperature, top_k=k, seed=seed)
    kept = torch.isfinite(filter_logits(logits, params))
    allowed = set(torch.topk(logits, min(k, vocab)).indices.tolist())
    assert set(torch.nonzero(kept).flatten().tolist()) == allowed
    draws = [sample(logits.unsqueeze(0), [params], [g])[0] for _ in range(30)]
    assert set(draws) <= allowed


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 64), p=st.floats(0.05, 1.0))
def test_top_p_only_emits_the_nucleus(seed: int, vocab: int, p: float) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * 2
    params = SamplingParams(temperature=1.0, top_p=p)
    kept = set(torch.nonzero(torch.isfinite(filter_logits(logits, params))).flatten().tolist())
    reference = allowed_top_p(logits, p)
    # Ties at the float32 boundary may differ by one token from the float64 reference.
    assert reference <= kept or kept <= reference
    assert abs(len(kept) - len(reference)) <= 1
    draws = [sample(logits.unsqueeze(0), [params], [g])[0] for _ in range(30)]
    assert set(draws) <= kept


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    assert sample(logits, [SamplingParams(), SamplingParams()], [None, None]) == [1, 0]


def test_a_vanishing_temperature_is_greedy_not_nan() -> None:
    """1.5e-261 (found by the HTTP API's fuzzing) would scale the logits to inf."""
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    tiny = SamplingParams(temperature=1.4948726443938312e-261, seed=1)
    assert tiny.validate().greedy
    g = torch.Generator().manual_seed(1)
    assert sample(logits, [tiny, tiny], [g, g]) == [1, 0]


def test_seeded_sampling_is_reproducible_across_batches(make_engine: MakeEngine) -> None:
    params = SamplingParams(
        max_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=1234, ignore_eos=True
    )
    tokens = prompt(20, 1)
    alone = make_engine(num_kv_blocks=64)
    alone.add_request("s", tokens, params)
    first = run_to_end(alone)["s"]
    crowded = make_engine(num_kv_blocks=64, max_num_batched_tokens=16)
    for i in range(5):  # different companions, chunking and batch positions
        crowded.add_request(
            f"other{i}", prompt(10 + i, 50 + i), SamplingParams(max_tokens=12, temperature=1.0)
        )
    crowded.add_request("s", tokens, params)
    assert run_to_end(crowded)["s"] == first
    alone.add_request(
        "t", tokens, SamplingParams(max_tokens=24, temperature=1.0, seed=99, ignore_eos=True)
    )
    assert run_to_end(alone)["t"] != first  # another seed draws other tokens


def test_a_request_continued_from_its_generator_state_draws_the_same_tokens(
    make_engine: MakeEngine,
) -> None:
    # What a P/D hand-off does: one engine draws the first token, another goes on from the
    # generator state that came with it (not from the seed).
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    tokens = prompt(20, 2)
    whole = make_engine(num_kv_blocks=64)
    whole.add_request("w", tokens, params)
    want = run_to_end(whole)["w"]

    first_leg = make_engine(num_kv_blocks=64)
    first_leg.add_request("p", tokens, msgspec.structs.replace(params, max_tokens=1))
    (final,) = first_leg.step()
    assert final.finished and len(final.generator_state) > 0
    second_leg = make_engine(num_kv_blocks=64)
    rest = msgspec.structs.replace(params, max_tokens=11)
    second_leg.add_request(
        "d", tokens + final.new_token_ids, rest, generator_state=final.generator_state
    )
    assert final.new_token_ids + run_to_end(second_leg)["d"] == want
    # Re-seeding instead (what decode did before the state travelled) draws other tokens.
    second_leg.add_request("r", tokens + final.new_token_ids, rest)
    assert final.new_token_ids + run_to_end(second_leg)["r"] != want
    with pytest.raises(InvalidRequestError, match="generator state"):
        second_leg.add_request("bad", tokens, rest, generator_state=b"\x00" * 7)
    greedy = make_engine(num_kv_blocks=64)
    greedy.add_request("g", tokens, SamplingParams(max_tokens=1))
    assert greedy.step()[0].generator_state == b""
