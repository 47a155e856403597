"""`memserve bench engine --peer vllm|memserve`: our engine and a peer engine side by side,
each in its own process, on the same model folder, interleaved over `--rounds` rounds.

Per model: the matmul roofline at every batch size measured first (bench/engine/
roofline.py, in this process, both peers idle; again before every later round, the best
measurement kept), then transformers' greedy tokens for
each round's first prompt (the correctness reference), then both peer processes loaded one
after the other, the peer first (time to ready and RSS recorded), and warmed up on prompts
of their own.
Then, round by round, figure by figure (decode at every N, then prefill), the two engines
run back to back, the first one alternating between rounds, on the same fresh prompts
(the seed includes the round). Per figure: each engine's per-round rates, the median of
the per-round ratios both ways, the roofline fraction of each engine's median.

Correctness: at N=1 both engines' greedy tokens must equal transformers' and each other
in every round (else the command exits 1); at larger N the sequences equal between the
two engines are counted (informational: batched float sums may differ in the last bit).

The CPU other processes used during each run (machine busy time minus the running peer's
and this process's) is recorded: on 2 shared cores it decides how far a figure holds.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.engine import peers
from bench.engine.measure import log, make_prompts
from bench.engine.params import BenchParams
from bench.engine.peers import Peer
from bench.engine.roofline import ModelShape, achieved, measure_gemm
from bench.report import busy_seconds, latency_summary_ms, machine_info, ratio

WARMUP_SEED_OFFSET = 7_777  # warm-up prompts share no prefix with a measured one
GOAL_OURS_OVER_PEER = 1.2


def _round_seed(params: BenchParams, r: int) -> int:
    return params.seed * 10_000 + 2 * r


class Runner:
    """Runs one command on one peer and records the CPU the rest of the machine used."""

    def __init__(self, peer: Peer, timeout_s: float):
        self.peer = peer
        self.timeout_s = timeout_s

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        busy0, own0, peer0 = busy_seconds(), _own_cpu_s(), self.peer.cpu_s()
        t0 = time.perf_counter()
        reply = self.peer.call(message, self.timeout_s)
        wall = time.perf_counter() - t0
        busy1, own1, peer1 = busy_seconds(), _own_cpu_s(), self.peer.cpu_s()
        cpu: dict[str, Any] = {"wall_s": wall, "other_cores": None, "peer_cores": None}
        if None not in (busy0, busy1, peer0, peer1) and wall > 0:
            assert busy0 is not None and busy1 is not None
            assert peer0 is not None and peer1 is not None
            cpu["peer_cores"] = (peer1 - peer0) / wall
            other = busy1 - busy0 - (peer1 - peer0) - (own1 - own0)
            cpu["other_cores"] = max(0.0, other / wall)
        reply["cpu"] = cpu
        return reply


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _start_peers(params: BenchParams, model: str, folder: str) -> tuple[Peer, Peer, dict[str, Any]]:
    assert params.threads is not None and params.peer_python is not None
    knobs, env_record = peers.peer_env(params.threads, params.tcmalloc)
    max_n = max(max(params.concurrency), params.prefill_batch)
    need = max(params.prompt_len + params.gen_len, params.prefill_len + 1)
    ours = Peer(
        "ours",
        peers.ours_argv(sys.executable, model, max_n, need, params.threads, params.engine_opts),
        {**knobs, **peers.ours_env()},
    )
    if params.peer == "vllm":
        # vLLM schedules like ours: every sequence in one batch, prefill chunked at the same
        # token budget (2048, EngineConfig's default); --peer-engine-opt can override both.
        opts = [f"max_num_seqs={max(max_n, 8)}", "max_num_batched_tokens=2048"]
        opts += params.peer_engine_opts
        other = Peer(
            "vllm",
            peers.vllm_argv(params.peer_python, folder, opts),
            {**knobs, **peers.vllm_env()},
            drop_env=("PYTHONPATH",),
        )
    else:
        # "memserve*": our engine again, in the configuration of --peer-engine-opt
        other = Peer(
            "memserve*",
            peers.ours_argv(
                params.peer_python, model, max_n, need, params.threads, params.peer_engine_opts
            ),
            {**knobs, **peers.ours_env()},
        )
    return ours, other, env_record


def _load(peer: Peer, params: BenchParams) -> dict[str, Any]:
    log(f"  starting {peer.name}: {' '.join(peer.argv[1:])}")
    ready = peer.start(params.ready_timeout_s)
    log(f"  {peer.name} ready in {peer.ready_s:.1f} s")
    return {
        "engine": ready.get("engine"),
        "version": ready.get("version"),
        "torch_version": ready.get("torch_version"),
        "torch_threads": ready.get("torch_threads"),
        "ready_s": peer.ready_s,
        "load_s": ready.get("load_s"),
        "rss_after_load_bytes": ready.get("rss_bytes"),
        "config": ready.get("config"),
    }


def _decode_figure(reply: dict[str, Any]) -> dict[str, Any]:
    return {
        "decode_tok_s": ratio(reply["decode_tokens"], reply["decode_s"]),
        "decode_tokens": reply["decode_tokens"],
        "decode_s": reply["decode_s"],
        "step": latency_summary_ms(reply["step_s"]),
        "prefill_phase_s": reply["prefill_s"],
        "cpu": reply["cpu"],
    }


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(ratio(x, y) for x, y in zip(a, b, strict=True))


def run_model(params: BenchParams, model: str) -> dict[str, Any]:
    from common.model.presets import resolve_model

    folder = str(resolve_model(model))
    shape = ModelShape.from_folder(folder)
    rounds = range(params.rounds)
    max_n = max(params.concurrency)
    decode_prompts = [
        make_prompts(_round_seed(params, r), max_n, params.prompt_len) for r in rounds
    ]
    prefill_prompts = [
        make_prompts(_round_seed(params, r) + 1, params.prefill_batch, params.prefill_len)
        for r in rounds
    ]
    entry: dict[str, Any] = {"folder": folder, "shape": vars(shape)}

    import torch

    assert params.threads is not None
    torch.set_num_threads(params.threads)
    prefill_m = min(params.prefill_batch * params.prefill_len, 2048)
    log(f"[{model}] matmul roofline at M = {sorted(set(params.concurrency))} and {prefill_m}")
    batch_sizes = sorted({*params.concurrency, prefill_m})
    roof_runs: dict[int, list[dict[str, Any]]] = {m: [measure_gemm(shape, m)] for m in batch_sizes}

    reference: list[list[int]] = []
    if params.hf and 1 in params.concurrency:
        from bench.engine.reference import HFBench

        log(f"[{model}] transformers reference: {params.rounds} prompt(s) x {params.gen_len}")
        hf = HFBench(model)
        reference = [hf.generate([decode_prompts[r][0]], params.gen_len).tokens[0] for r in rounds]
        del hf
        gc.collect()

    ours, other, env_record = _start_peers(params, model, folder)
    entry["env"] = env_record
    stem = Path(params.out).with_suffix("")
    for side, peer in (("ours", ours), ("peer", other)):
        peer.keep_log = stem.with_name(f"{stem.name}.{Path(model).name}.{side}.log")
    entry["logs"] = {"ours": str(ours.keep_log), "peer": str(other.keep_log)}
    with ours, other:
        # the peer first: the likelier to fail (another venv, another engine), and a
        # failure is then reported before ours has spent time loading
        peer_loaded = _load(other, params)
        entry["processes"] = {"ours": _load(ours, params), "peer": peer_loaded}
        entry["peer_name"] = other.name
        entry["peer_engine_opts"] = params.peer_engine_opts
        runners = {
            "ours": Runner(ours, params.command_timeout_s),
            "peer": Runner(other, params.command_timeout_s),
        }
        warm = make_prompts(params.seed + WARMUP_SEED_OFFSET, min(max_n, 8), params.prompt_len)
        warm_pf = make_prompts(params.seed + WARMUP_SEED_OFFSET + 1, 1, params.prefill_len)
        for runner in runners.values():
            log(f"[{model}] warm-up ({runner.peer.name})")
            runner.call({"cmd": "decode", "prompts": warm, "gen_len": min(params.gen_len, 8)})
            runner.call({"cmd": "prefill", "prompts": warm_pf})

        decode: dict[int, dict[str, list[Any]]] = {
            n: {"ours": [], "peer": []} for n in params.concurrency
        }
        prefill: dict[str, list[Any]] = {"ours": [], "peer": []}
        tokens_n1: dict[str, list[list[int]]] = {"ours": [], "peer": []}
        matches: dict[int, list[int]] = {n: [] for n in params.concurrency}
        for r in rounds:
            if r > 0:
                # measured again every round (both peers idle): a shared machine's burst
                # must not set the roofline, the best of all measurements does
                for m in batch_sizes:
                    roof_runs[m].append(measure_gemm(shape, m))
            order = ["ours", "peer"] if r % 2 == 0 else ["peer", "ours"]
            for n in params.concurrency:
                got: dict[str, list[list[int]]] = {}
                for side in order:
                    log(
                        f"[{model}] round {r + 1}/{params.rounds} decode N={n} ({runners[side].peer.name})"
                    )
                    reply = runners[side].call(
                        {
                            "cmd": "decode",
                            "prompts": decode_prompts[r][:n],
                            "gen_len": params.gen_len,
                        }
                    )
                    decode[n][side].append(_decode_figure(reply))
                    got[side] = reply["tokens"]
                matches[n].append(
                    sum(a == b for a, b in zip(got["ours"], got["peer"], strict=True))
                )
                if n == 1:
                    for side in ("ours", "peer"):
                        tokens_n1[side].append(got[side][0])
            prompt_tokens = params.prefill_batch * params.prefill_len
            for side in order:
                log(f"[{model}] round {r + 1}/{params.rounds} prefill ({runners[side].peer.name})")
                reply = runners[side].call({"cmd": "prefill", "prompts": prefill_prompts[r]})
                prefill[side].append(
                    {
                        "tok_s": ratio(prompt_tokens, reply["seconds"]),
                        "seconds": reply["seconds"],
                        "cpu": reply["cpu"],
                    }
                )
        for side, peer in (("ours", ours), ("peer", other)):
            stats = peer.call({"cmd": "stats"}, params.command_timeout_s)
            entry["processes"][side]["rss_end_bytes"] = stats["rss_bytes"]
            entry["processes"][side]["peak_rss_bytes"] = stats["peak_rss_bytes"]

    roof = {m: max(runs, key=lambda x: x["gflops"]) for m, runs in roof_runs.items()}
    entry["roofline"] = {
        str(m): {**roof[m], "all_gflops": [x["gflops"] for x in roof_runs[m]]} for m in batch_sizes
    }
    entry["figures"] = _figures(params, shape, roof, prefill_m, decode, prefill, matches)
    entry["correctness"] = _correctness(params, reference, tokens_n1)
    return entry


def _figures(
    params: BenchParams,
    shape: ModelShape,
    roof: dict[int, dict[str, Any]],
    prefill_m: int,
    decode: dict[int, dict[str, list[Any]]],
    prefill: dict[str, list[Any]],
    matches: dict[int, list[int]],
) -> list[dict[str, Any]]:
    figures = []
    decode_context = params.prompt_len + params.gen_len / 2  # mean context of a decode step
    for n in params.concurrency:
        fig = _figure(
            f"decode N={n}", "decode_tok_s", decode[n], roof[n]["gflops"], shape, decode_context
        )
        fig.update(concurrency=n, sequences_equal=matches[n], sequences=n)
        figures.append(fig)
    fig = _figure(
        f"prefill {params.prefill_batch}x{params.prefill_len}",
        "tok_s",
        prefill,
        roof[prefill_m]["gflops"],
        shape,
        params.prefill_len / 2,  # mean context of a prompt token
    )
    fig["concurrency"] = None
    figures.append(fig)
    return figures


def _figure(
    name: str,
    key: str,
    runs: dict[str, list[Any]],
    roof_gflops: float,
    shape: ModelShape,
    context: float,
) -> dict[str, Any]:
    ours = [r[key] for r in runs["ours"]]
    peer = [r[key] for r in runs["peer"]]
    out: dict[str, Any] = {
        "figure": name,
        "ours_tok_s": ours,
        "peer_tok_s": peer,
        "ours_median_tok_s": statistics.median(ours),
        "peer_median_tok_s": statistics.median(peer),
        "median_ratio_peer_over_ours": _median_ratio(peer, ours),
        "median_ratio_ours_over_peer": _median_ratio(ours, peer),
        "roofline_gflops": roof_gflops,
        "ours_runs": runs["ours"],
        "peer_runs": runs["peer"],
    }
    for side in ("ours", "peer"):
        a = achieved(shape, out[f"{side}_median_tok_s"], context, roof_gflops)
        out[f"{side}_gflops"] = a["gflops"]
        out[f"{side}_roofline_fraction"] = a["roofline_fraction"]
    out["goal_met"] = out["median_ratio_ours_over_peer"] >= GOAL_OURS_OVER_PEER
    return out


def _correctness(
    params: BenchParams, reference: list[list[int]], tokens_n1: dict[str, list[list[int]]]
) -> dict[str, Any]:
    if 1 not in params.concurrency:
        return {"checked": False, "passed": True, "why": "no N=1 figure"}
    rounds = []
    for r, (a, b) in enumerate(zip(tokens_n1["ours"], tokens_n1["peer"], strict=True)):
        ref = reference[r] if reference else None
        rounds.append(
            {
                "round": r,
                "ours_equals_peer": a == b,
                "ours_equals_transformers": None if ref is None else a == ref,
                "peer_equals_transformers": None if ref is None else b == ref,
                "first_mismatch_ours_peer": _first_mismatch(a, b),
            }
        )
    passed = all(
        r["ours_equals_peer"]
        and r["ours_equals_transformers"] is not False
        and r["peer_equals_transformers"] is not False
        for r in rounds
    )
    return {
        "checked": True,
        "with_transformers": bool(reference),
        "passed": passed,
        "rounds": rounds,
    }


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_versus(params: BenchParams) -> dict[str, Any]:
    results: dict[str, Any] = {
        "benchmark": "engine-versus",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "params": dict(vars(params)),
        "goal_ours_over_peer": GOAL_OURS_OVER_PEER,
        "models": {},
    }
    for model in params.models:
        results["models"][model] = run_model(params, model)
    results["correct"] = all(e["correctness"]["passed"] for e in results["models"].values())
    return results
