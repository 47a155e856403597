"""`memserve bench engine`: our engine against transformers on the same weights.

For every model (`--models tiny,small`) and concurrency N (`--concurrency 1,8,32,64`):

Our engine, decode
    N requests, each a seeded random prompt of `--prompt-len` byte tokens (ids 3..258;
    prompt i is the same at every N), greedy, `max_tokens=--gen-len`, ignore_eos. The
    engine steps until every request has produced its first token (the prefill phase,
    untimed for throughput); the remaining steps are timed one by one. Decode tokens/s =
    tokens produced in those steps / their summed wall time; step latency = mean, p50 and
    p99 of the `step()` wall times of that phase. One engine per model serves every N,
    after a short warm-up run so first-call costs (allocations, kernel selection) are out.
    The KV pool is sized for the largest run, so nothing is ever preempted.

Our engine, prefill
    `--prefill-batch` prompts of `--prefill-len` tokens with max_tokens=1: prompt tokens /
    wall time until all have finished.

transformers, `generate` (greedy: do_sample=False, max_new_tokens = min_new_tokens =
gen-len; the eos id is removed from the generation config so nothing can stop early or
be suppressed, which is what ignore_eos does on our side)
    one at a time: the first min(max N, `--hf-single-requests`) prompts, one generate
        call each. The rate does not depend on N, so it is measured once per model and
        shown on every row.
    batched: all N prompts in one call, left-padded with an attention mask.
    A logits processor timestamps every generation step, so transformers' decode rate
    covers exactly what ours does: tokens 2..gen-len (after the first token, i.e. after
    prefill) over the time from the first to the last token. The end-to-end rates
    (gen-len tokens per request over the whole call) are in the JSON as well.
transformers, prefill: one forward of the same prompt batch with a KV cache, logits of
    the last position only (as generate does).

Every figure is measured `--repeats` times and the fastest repetition is kept (with its
own latencies), so a burst of foreign load on a shared machine does not decide it; all
repetitions are in the JSON. The CPU time other processes used during each kept
measurement is recorded too, and the output warns when it was significant: on a 2-core
machine multi-threaded torch stalls badly when another process holds a core.

Correctness: at concurrency 1 our greedy tokens must equal transformers' for the same
prompt; a mismatch is printed and the command exits 1. At larger N the first prompts are
compared too and reported (informational: batched float sums may differ in the last bit).

The table goes to stdout, progress to stderr, every figure to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from bench.engine.benchmark import run_benchmark
from bench.engine.measure import make_prompts
from bench.engine.params import DEFAULTS, BenchParams
from bench.engine.reference import pad_left
from bench.engine.render import render
from bench.report import write_json

__all__ = ["add_parser", "make_prompts", "pad_left", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "engine",
        help="decode/prefill throughput of our engine vs transformers generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models",
        default=None,
        help=f"comma-separated presets or folders (default {DEFAULTS['models']})",
    )
    p.add_argument(
        "--concurrency",
        default=None,
        help=f"comma-separated sequence counts (default {DEFAULTS['concurrency']})",
    )
    p.add_argument(
        "--prompt-len", type=int, default=64, help="decode benchmark prompt length (default 64)"
    )
    p.add_argument(
        "--gen-len",
        type=int,
        default=None,
        help=f"tokens generated per request (default {DEFAULTS['gen_len']})",
    )
    p.add_argument(
        "--prefill-len",
        type=int,
        default=None,
        help=f"prefill benchmark prompt length (default {DEFAULTS['prefill_len']})",
    )
    p.add_argument(
        "--prefill-batch", type=int, default=8, help="prompts in the prefill benchmark (default 8)"
    )
    p.add_argument(
        "--hf-single-requests",
        type=int,
        default=4,
        help="requests timed one at a time with transformers (default 4)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="times each figure is measured, fastest kept (default 3)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's default)",
    )
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    p.add_argument(
        "--out",
        default=None,
        help="JSON output (default results/bench_engine.json, with --peer "
        "results/bench_engine_PEER.json)",
    )
    p.add_argument(
        "--no-hf",
        action="store_true",
        help="measure our engine only (no transformers, no correctness check)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny, concurrency 1,8, gen-len 16, prefill-len 64",
    )
    g = p.add_argument_group(
        "side by side (--peer)",
        "our engine and a peer engine, each in its own process, on the same model folder, "
        "interleaved over rounds (see bench/engine/versus.py); default model small "
        "(--quick: tiny), threads = CPUs, tcmalloc preloaded into both when installed",
    )
    g.add_argument(
        "--peer",
        choices=("vllm", "memserve"),
        default=None,
        help="vllm: vLLM's CPU build (`make peer-vllm`); memserve: our engine again, in a "
        "second configuration (--peer-engine-opt)",
    )
    g.add_argument(
        "--peer-python",
        default=None,
        help="the peer's python (default: .peers/vllm/bin/python for vllm, this one for memserve)",
    )
    g.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds per figure, in place of --repeats (default 3)",
    )
    g.add_argument(
        "--engine-opt",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="EngineConfig field for our engine (repeatable; also without --peer)",
    )
    g.add_argument(
        "--peer-engine-opt",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="for --peer memserve an EngineConfig field, for --peer vllm an LLM(...) "
        "keyword (repeatable)",
    )
    g.add_argument(
        "--no-tcmalloc",
        action="store_true",
        help="do not preload tcmalloc into the engines (default: preloaded into both when installed)",
    )
    g.add_argument(
        "--ready-timeout",
        type=float,
        default=None,
        help="seconds a peer may take to load (default 900)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        params = BenchParams.from_args(args)
    except ValueError as exc:
        print(f"memserve: error: {exc}", file=sys.stderr)
        return 2
    if params.peer:
        return _run_versus(params)
    if params.threads:
        torch.set_num_threads(params.threads)
    results = run_benchmark(params)
    print(render(results))
    path = write_json(params.out, results)
    print(f"\nresults written to {path}")
    return 0 if results["correct"] else 1


def _run_versus(params: BenchParams) -> int:
    from bench.engine.peers import PeerError
    from bench.engine.versus import run_versus
    from bench.engine.versus_render import render_versus

    try:
        results = run_versus(params)
    except PeerError as exc:
        print(f"memserve: error: {exc}", file=sys.stderr)
        return 1
    print(render_versus(results))
    path = write_json(params.out, results)
    print(f"\nresults written to {path}")
    return 0 if results["correct"] else 1
