"""The engine benchmark's text output: the table of figures, the correctness and target
lines, and a warning for figures taken while other processes kept cores busy."""

from __future__ import annotations

import math
from typing import Any

from bench.report import fmt, format_table


def render(results: dict[str, Any]) -> str:
    p = results["params"]
    m = results["machine"]
    lines = [
        f"engine benchmark: prompt {p['prompt_len']} tokens, {p['gen_len']} generated, greedy; "
        f"{m['cpu_count']} CPUs, torch {m['torch_version']} with {m['torch_threads']} thread(s)",
        "decode tok/s exclude each request's prefill and first token (both systems); "
        "HF single = transformers generate one request at a time, HF batched = all N in one call",
        "",
    ]
    headers = [
        "model",
        "N",
        "ours tok/s",
        "step p50 ms",
        "step p99 ms",
        "HF single tok/s",
        "HF batched tok/s",
        "ours/HF single",
        "ours/HF batched",
    ]
    rows: list[list[str]] = []
    for model, entry in results["models"].items():
        single = entry.get("hf_single", {}).get("decode_tok_s", math.nan)
        for r in entry["decode"]:
            o = r["ours"]
            rows.append(
                [
                    model,
                    str(r["concurrency"]),
                    fmt(o["decode_tok_s"]),
                    fmt(o["step"]["p50_ms"], 2),
                    fmt(o["step"]["p99_ms"], 2),
                    fmt(single),
                    fmt(r.get("hf_batched", {}).get("decode_tok_s", math.nan)),
                    fmt(r.get("ratio_vs_hf_single", math.nan), 2) + "x",
                    fmt(r.get("ratio_vs_hf_batched", math.nan), 2) + "x",
                ]
            )
        pf = entry["prefill"]
        hf_pf = pf.get("hf", {}).get("tok_s", math.nan)
        rows.append(
            [
                model,
                f"prefill {p['prefill_batch']}x{p['prefill_len']}",
                fmt(pf["ours"]["tok_s"]),
                "",
                "",
                "-",
                fmt(hf_pf),
                "-",
                fmt(pf.get("ratio_vs_hf", math.nan), 2) + "x",
            ]
        )
    lines.append(format_table(headers, rows))
    lines.append("")
    for model, entry in results["models"].items():
        c = entry.get("correctness")
        if c is not None:
            if c["passed"]:
                lines.append(
                    f"correctness [{model}]: PASS, greedy tokens at concurrency 1 equal transformers' "
                    f"({len(c['ours'])} tokens)"
                )
            else:
                lines.append(
                    f"correctness [{model}]: FAIL, greedy tokens at concurrency 1 differ from "
                    f"transformers' from position {c['first_mismatch']}"
                )
        for r in entry["decode"]:
            mb = r.get("greedy_match_hf_batched")
            if mb is not None and r["concurrency"] > 1:
                ms = r["greedy_match_hf_single"]
                lines.append(
                    f"  [{model}] N={r['concurrency']}: {ms['equal']}/{ms['checked']} sequences equal transformers "
                    f"one-at-a-time, {mb['equal']}/{mb['checked']} equal transformers batched (informational)"
                )
        t = entry.get("targets")
        if t is not None:
            s, b = t["vs_hf_single"], t["vs_hf_batched"]
            lines.append(
                f"targets [{model}] at N={t['concurrency']}: ours/HF single {s['ratio']:.2f}x "
                f"(target >= {s['target']:g}x: {'met' if s['met'] else 'NOT met'}); ours/HF batched "
                f"{b['ratio']:.2f}x (target >= {b['target']:g}x: {'met' if b['met'] else 'NOT met'})"
            )
    busy = _contended(results)
    if busy:
        lines.append(
            f"WARNING: other processes kept ~{max(c for _, c in busy):.2f} core(s) busy during "
            f"{', '.join(w for w, _ in busy)}: those figures are unreliable (multi-threaded torch "
            "stalls when it cannot have every core), rerun on a quiet machine"
        )
    if not results.get("correctness_checked"):
        lines.append("correctness: not checked (needs transformers and concurrency 1)")
    return "\n".join(lines)


CONTENDED_CORES = 0.25  # other processes' CPU use (in cores) above which a figure is flagged


def _contended(results: dict[str, Any]) -> list[tuple[str, float]]:
    """(what, other processes' cores) for every measurement taken on a busy machine."""
    found: list[tuple[str, float]] = []

    def check(what: str, part: dict[str, Any] | None) -> None:
        other = (part or {}).get("cpu", {}).get("other_cores")
        if other is not None and other > CONTENDED_CORES:
            found.append((what, other))

    for model, entry in results["models"].items():
        check(f"{model} HF single", entry.get("hf_single"))
        check(f"{model} prefill ours", entry["prefill"].get("ours"))
        check(f"{model} prefill HF", entry["prefill"].get("hf"))
        for r in entry["decode"]:
            check(f"{model} N={r['concurrency']} ours", r["ours"])
            check(f"{model} N={r['concurrency']} HF batched", r.get("hf_batched"))
    return found
