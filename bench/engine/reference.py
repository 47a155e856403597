"""The reference: transformers `generate` on the same weights, timed per generation step by
a logits processor so its decode rate covers exactly what ours does (tokens 2..gen-len),
one request at a time and batched (left-padded), plus one prefill forward."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.engine.measure import best_of
from bench.engine.params import BenchParams
from bench.report import latency_summary_ms, ratio

PAD_ID = 0


def _step_clock() -> Any:
    """A transformers LogitsProcessor that timestamps each generation step."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.stamps.append(time.perf_counter())
            return scores

    return StepClock()


@dataclass
class HFRun:
    tokens: list[list[int]]
    e2e_s: float
    stamps: list[float]  # one per generated token position (after each forward)

    @property
    def decode_s(self) -> float:
        return self.stamps[-1] - self.stamps[0]

    def step_s(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def pad_left(
    prompts: Sequence[list[int]], pad_id: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, left-padded to the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


class HFBench:
    def __init__(self, model: str):
        from transformers import LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        from common.model.presets import resolve_model

        hf_logging.disable_progress_bar()
        self.model = LlamaForCausalLM.from_pretrained(
            str(resolve_model(model)), dtype=torch.float32
        ).eval()
        gc = self.model.generation_config
        gc.eos_token_id = None  # like ignore_eos: eos neither stops nor is suppressed
        gc.pad_token_id = PAD_ID

    @torch.inference_mode()
    def generate(self, prompts: Sequence[list[int]], gen_len: int) -> HFRun:
        from transformers import LogitsProcessorList

        ids, mask = pad_left(prompts)
        clock = _step_clock()
        t0 = time.perf_counter()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=gen_len,
            min_new_tokens=gen_len,
            logits_processor=LogitsProcessorList([clock]),
        )
        e2e = time.perf_counter() - t0
        new = out[:, ids.shape[1] :].tolist()
        if any(len(t) != gen_len for t in new) or len(clock.stamps) != gen_len:
            raise RuntimeError(
                f"transformers generated {out.shape[1] - ids.shape[1]} tokens, expected {gen_len}"
            )
        return HFRun(new, e2e, list(clock.stamps))

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[list[int]]) -> float:
        ids, mask = pad_left(prompts)
        t0 = time.perf_counter()
        self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0


def measure_hf_batched(
    hf: HFBench, prompts: list[list[int]], params: BenchParams
) -> tuple[HFRun, dict[str, Any]]:
    n, g = len(prompts), params.gen_len
    runs, best, cpus = best_of(
        params.repeats, lambda: hf.generate(prompts, g), lambda r: ratio(n * (g - 1), r.decode_s)
    )
    run = runs[best]
    return run, {
        "decode_tok_s": ratio(n * (g - 1), run.decode_s),
        "e2e_tok_s": ratio(n * g, run.e2e_s),
        "decode_s": run.decode_s,
        "e2e_s": run.e2e_s,
        "step": latency_summary_ms(run.step_s()),
        "cpu": cpus[best],
        "all_decode_tok_s": [ratio(n * (g - 1), r.decode_s) for r in runs],
    }


def measure_hf_single(
    hf: HFBench, prompts: list[list[int]], params: BenchParams
) -> tuple[dict[str, Any], list[list[int]]]:
    """One generate call per prompt; returns the figures and each prompt's tokens."""
    k, g = len(prompts), params.gen_len

    def rate(runs: list[HFRun]) -> float:
        return ratio(k * (g - 1), sum(r.decode_s for r in runs))

    reps, best, cpus = best_of(params.repeats, lambda: [hf.generate([p], g) for p in prompts], rate)
    runs = reps[best]
    decode_s = sum(r.decode_s for r in runs)
    e2e_s = sum(r.e2e_s for r in runs)
    return {
        "requests": k,
        "decode_tok_s": ratio(k * (g - 1), decode_s),
        "e2e_tok_s": ratio(k * g, e2e_s),
        "decode_s": decode_s,
        "e2e_s": e2e_s,
        "step": latency_summary_ms([s for r in runs for s in r.step_s()]),
        "cpu": cpus[best],
        "all_decode_tok_s": [rate(r) for r in reps],
    }, [r.tokens[0] for r in runs]
