"""Measurement of our engine: the seeded prompts, one engine per model timed step by step
(decode) or as a whole (prefill), and best-of-k repetition with the CPU use of each run
(used for the transformers reference too, so both sides are measured alike)."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.engine.params import BenchParams
from bench.report import CpuMonitor, latency_summary_ms, ratio

FIRST_BYTE_ID = 3  # ids 0..2 are <pad>, <s>, </s>; 3..258 are the 256 bytes
LAST_BYTE_ID = 258


def make_prompts(seed: int, count: int, length: int) -> list[list[int]]:
    """`count` prompts of random byte ids; prompt i depends only on (seed, i, length)."""
    prompts = []
    for i in range(count):
        rng = random.Random(f"{seed}:{i}:{length}")
        prompts.append([rng.randint(FIRST_BYTE_ID, LAST_BYTE_ID) for _ in range(length)])
    return prompts


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class OursRun:
    tokens: list[list[int]]  # generated ids per request, in prompt order
    prefill_s: float  # wall time until every request had its first token
    prefill_steps: int
    decode_step_s: list[float] = field(default_factory=list)
    decode_tokens: int = 0

    @property
    def decode_s(self) -> float:
        return sum(self.decode_step_s)

    def summary(self, gen_len: int) -> dict[str, Any]:
        n = len(self.tokens)
        total_s = self.prefill_s + self.decode_s
        return {
            "decode_tok_s": ratio(self.decode_tokens, self.decode_s),
            "decode_tokens": self.decode_tokens,
            "decode_s": self.decode_s,
            "decode_steps": len(self.decode_step_s),
            "step": latency_summary_ms(self.decode_step_s),
            "prefill_phase_s": self.prefill_s,
            "prefill_phase_steps": self.prefill_steps,
            "e2e_tok_s": ratio(n * gen_len, total_s),
            "e2e_s": total_s,
        }


class OursBench:
    """One engine per model, sized for the largest run, reused by every run."""

    _counter = 0

    def __init__(
        self,
        model: str,
        max_seqs: int,
        max_tokens_per_seq: int,
        threads: int | None,
        overrides: dict[str, Any] | None = None,
    ):
        """`overrides`: EngineConfig fields over the bench's sizing (`--engine-opt`),
        converted to the fields' types (so "false" is a bool); an unknown field or a bad
        value raises ValueError naming it."""
        import msgspec

        from services.worker.config import EngineConfig
        from services.worker.engine import Engine

        opts = dict(overrides or {})
        block_size = int(opts.get("block_size", 16))
        blocks_per_seq = -(-max_tokens_per_seq // block_size)
        fields: dict[str, Any] = {
            "model": model,
            "num_kv_blocks": max_seqs * blocks_per_seq + 16,
            "max_num_seqs": max(128, max_seqs),
            "block_size": block_size,
            "num_threads": threads,
            **opts,
        }
        try:
            self.config = msgspec.convert(fields, EngineConfig, strict=False).validate()
        except msgspec.ValidationError as exc:
            raise ValueError(f"--engine-opt: {exc}") from exc
        self.engine = Engine.from_config(self.config)

    def _rid(self) -> str:
        OursBench._counter += 1
        return f"bench-{OursBench._counter}"

    def generate(self, prompts: Sequence[list[int]], gen_len: int) -> OursRun:
        """Run `prompts` to completion; time the decode steps one by one."""
        from common.sampling import SamplingParams

        engine = self.engine
        ids = [self._rid() for _ in prompts]
        index = {rid: i for i, rid in enumerate(ids)}
        tokens: list[list[int]] = [[] for _ in prompts]
        for rid, prompt in zip(ids, prompts, strict=True):
            engine.add_request(rid, prompt, SamplingParams(max_tokens=gen_len, ignore_eos=True))
        guard = sum(len(p) for p in prompts) + len(prompts) * gen_len + 16

        started = 0
        steps = 0
        t0 = time.perf_counter()
        while started < len(prompts):
            for out in engine.step():
                i = index[out.request_id]
                if not tokens[i] and out.new_token_ids:
                    started += 1
                tokens[i].extend(out.new_token_ids)
            steps += 1
            if steps > guard:
                raise RuntimeError("engine made no progress in the prefill phase")
        run = OursRun(tokens, time.perf_counter() - t0, steps)

        clock = time.perf_counter
        while engine.has_unfinished():
            s = clock()
            outs = engine.step()
            run.decode_step_s.append(clock() - s)
            for out in outs:
                tokens[index[out.request_id]].extend(out.new_token_ids)
                run.decode_tokens += len(out.new_token_ids)
            if len(run.decode_step_s) > guard:
                raise RuntimeError("engine made no progress in the decode phase")
        engine.check_integrity()
        for i, t in enumerate(tokens):
            if len(t) != gen_len:
                raise RuntimeError(f"request {i} produced {len(t)} tokens, expected {gen_len}")
        return run

    def prefill(self, prompts: Sequence[list[int]]) -> float:
        """Wall seconds until every prompt (max_tokens=1) has finished."""
        from common.sampling import SamplingParams

        engine = self.engine
        for prompt in prompts:
            engine.add_request(self._rid(), prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        elapsed = time.perf_counter() - t0
        engine.check_integrity()
        return elapsed


T = TypeVar("T")


def best_of(
    repeats: int, measure: Callable[[], T], rate: Callable[[T], float]
) -> tuple[list[T], int, list[dict[str, Any]]]:
    """Run `measure` `repeats` times; return every result, the index of the fastest (by
    `rate`) and the CPU use of each (see `CpuMonitor`). Best-of-k keeps a burst of
    foreign load on a shared machine from deciding a figure."""
    results: list[T] = []
    cpus: list[dict[str, Any]] = []
    for _ in range(repeats):
        mon = CpuMonitor().start()
        results.append(measure())
        cpus.append(mon.stop())
    rates = [rate(r) for r in results]
    return results, max(range(len(rates)), key=lambda i: rates[i]), cpus


def measure_ours_decode(
    ours: OursBench, prompts: list[list[int]], params: BenchParams
) -> tuple[list[OursRun], dict[str, Any]]:
    runs, best, cpus = best_of(
        params.repeats,
        lambda: ours.generate(prompts, params.gen_len),
        lambda r: ratio(r.decode_tokens, r.decode_s),
    )
    summary = runs[best].summary(params.gen_len)
    summary["cpu"] = cpus[best]
    summary["best_repeat"] = best
    summary["all_decode_tok_s"] = [ratio(r.decode_tokens, r.decode_s) for r in runs]
    return runs, summary


def measure_prefill(
    measure: Callable[[], float], prompt_tokens: int, params: BenchParams
) -> dict[str, Any]:
    """`measure` returns wall seconds for `prompt_tokens` prompt tokens."""
    times, best, cpus = best_of(params.repeats, measure, lambda t: -t)
    return {"tok_s": ratio(prompt_tokens, times[best]), "seconds": times, "cpu": cpus[best]}
