"""The side-by-side benchmark's text output (bench/engine/versus.py): per model, one row
per figure with both engines' per-round rates, the median ratios and roofline fractions;
then load time and memory of both processes, correctness, and contention warnings."""

from __future__ import annotations

from typing import Any

from bench.engine.render import CONTENDED_CORES
from bench.report import fmt, format_table

MIB = 1024 * 1024


def _rounds(values: list[float]) -> str:
    return " / ".join(fmt(v, 0) for v in values)


def _mib(value: Any) -> str:
    return "-" if not isinstance(value, int) or value < 0 else f"{value / MIB:,.0f}"


def render_versus(results: dict[str, Any]) -> str:
    p = results["params"]
    m = results["machine"]
    lines = [
        f"engine side by side: ours vs {p['peer']} ({p['rounds']} interleaved round(s), first "
        f"engine alternating); prompt {p['prompt_len']}, {p['gen_len']} generated, greedy; "
        f"{m['cpu_count']} CPUs, {p['threads']} thread(s) each",
        "decode tok/s exclude each request's prefill and first token (both engines); ratios "
        "are medians of the per-round ratios; roof = achieved GFLOP/s over this machine's "
        "torch matmul GFLOP/s at the same batch",
        "",
    ]
    for model, e in results["models"].items():
        peer = e.get("peer_name", p["peer"])
        headers = [
            "figure",
            "ours tok/s per round",
            f"{peer} tok/s per round",
            f"{peer}/ours",
            f"ours/{peer}",
            "ours roof",
            f"{peer} roof",
        ]
        rows = [
            [
                f["figure"],
                _rounds(f["ours_tok_s"]),
                _rounds(f["peer_tok_s"]),
                fmt(f["median_ratio_peer_over_ours"], 2) + "x",
                fmt(f["median_ratio_ours_over_peer"], 2) + "x",
                fmt(100 * f["ours_roofline_fraction"], 1) + "%",
                fmt(100 * f["peer_roofline_fraction"], 1) + "%",
            ]
            for f in e["figures"]
        ]
        lines.append(f"[{model}] {e['folder']}")
        if e.get("peer_engine_opts"):
            engine = "our engine" if p["peer"] == "memserve" else "vLLM"
            lines.append(f"{peer} = {engine} with {', '.join(e['peer_engine_opts'])}")
        lines.append(format_table(headers, rows))
        lines.append("")
        for side in ("ours", "peer"):
            pr = e["processes"][side]
            name = "ours" if side == "ours" else peer
            version = f" {pr['version']}" if pr.get("version") else ""
            lines.append(
                f"  {name}{version}: ready in {fmt(pr['ready_s'], 1)} s; RSS after load "
                f"{_mib(pr['rss_after_load_bytes'])} MiB, after the run {_mib(pr.get('rss_end_bytes'))} "
                f"MiB (peak {_mib(pr.get('peak_rss_bytes'))} MiB); torch threads {pr['torch_threads']}"
            )
        if e.get("logs"):
            lines.append(f"  stderr of the processes: {e['logs']['ours']}, {e['logs']['peer']}")
        env = e["env"]
        lines.append(
            f"  both: OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, tcmalloc "
            f"{'preloaded' if env['tcmalloc'] else 'not preloaded (plain malloc)'}"
        )
        goal = results["goal_ours_over_peer"]
        met = [f["figure"] for f in e["figures"] if f["goal_met"]]
        lines.append(
            f"  goal ours/{peer} >= {goal:g}x met on {len(met)}/{len(e['figures'])} figure(s)"
            + (f": {', '.join(met)}" if met else "")
        )
        lines.extend(_correctness_lines(model, peer, e))
        for f in e["figures"]:
            if f.get("concurrency", 1) not in (None, 1):
                eq = f["sequences_equal"]
                lines.append(
                    f"  {f['figure']}: {'/'.join(map(str, eq))} of {f['sequences']} sequences equal "
                    f"between the engines per round (informational)"
                )
        lines.append("")
    over = [
        f"{model} {f['figure']}"
        for model, e in results["models"].items()
        for f in e["figures"]
        if max(f["ours_roofline_fraction"], f["peer_roofline_fraction"]) > 1
    ]
    if over:
        lines.append(
            f"note: above 100% of the measured matmul roofline ({', '.join(over)}): torch's "
            "F.linear at that batch is not this machine's limit there (our kernels beat it on "
            "small batches), or the roofline runs were disturbed; read those fractions as "
            "relative only"
        )
    busy = contended(results)
    if busy:
        lines.append(
            f"WARNING: other processes kept up to {max(c for _, c in busy):.2f} core(s) busy during "
            f"{len(busy)} run(s) ({', '.join(w for w, _ in busy[:6])}{', ...' if len(busy) > 6 else ''}): "
            "those figures are unreliable; medians over interleaved rounds dampen it, a quiet "
            "machine removes it"
        )
    else:
        lines.append("CPU contention: none significant during any measured run")
    return "\n".join(lines)


def _correctness_lines(model: str, peer: str, e: dict[str, Any]) -> list[str]:
    c = e["correctness"]
    if not c["checked"]:
        return [f"  correctness [{model}]: not checked ({c['why']})"]
    ref = " and transformers'" if c["with_transformers"] else ""
    if c["passed"]:
        return [
            f"  correctness [{model}]: PASS, greedy tokens at N=1 equal between ours and {peer}"
            f"{ref} in every round"
        ]
    out = [f"  correctness [{model}]: FAIL at N=1"]
    for r in c["rounds"]:
        out.append(
            f"    round {r['round'] + 1}: ours==peer {r['ours_equals_peer']} (first mismatch "
            f"{r['first_mismatch_ours_peer']}), ours==transformers {r['ours_equals_transformers']}, "
            f"peer==transformers {r['peer_equals_transformers']}"
        )
    return out


def contended(results: dict[str, Any]) -> list[tuple[str, float]]:
    """(which run, other processes' cores) for every run taken on a busy machine."""
    found = []
    for model, e in results["models"].items():
        for f in e["figures"]:
            for side in ("ours", "peer"):
                for r, run in enumerate(f[f"{side}_runs"]):
                    other = run["cpu"].get("other_cores")
                    if other is not None and other > CONTENDED_CORES:
                        found.append((f"{model} {f['figure']} {side} round {r + 1}", other))
    return found
