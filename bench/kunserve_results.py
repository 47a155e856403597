"""The KunServe evaluation's figures from an experiment document (bench/results.py's
shape, runs of bench/kunserve_modes.py's modes with their "elastic" summaries from
bench/timeline.py): the latency table (P50 / P99 / P999 TTFT, P50 / P99 TPOT, JCT,
throughput, errors), the elastic table (drops, restores, migrations, bytes exchanged,
stalls, group lifetime) and the P99 TTFT ratios beside the paper's (bench/paper.py).
Pure: no matplotlib (bench/kunserve_plots.py draws), documents read back from JSON
(None for NaN) read alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from bench.kunserve_modes import is_kunserve_mode
from bench.paper import KUNSERVE_RATIOS
from bench.report import fmt
from bench.results import Experiment, markdown_table, num, stat

MIB = 1 << 20


def kunserve_runs(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in runs if is_kunserve_mode(str(r.get("mode", "")))]


def any_kunserve(runs: Sequence[Mapping[str, Any]]) -> bool:
    return bool(kunserve_runs(runs))


def kunserve_figures(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """{"ratios": [...]}: per pair of the paper's (bench/paper.py) whose two modes ran,
    the base's P99 TTFT over the new one's (x times lower) beside the paper's range."""
    by_mode: dict[str, Mapping[str, Any]] = {}
    for r in kunserve_runs(runs):
        by_mode.setdefault(str(r["mode"]), r)  # several policies: the first
    ratios = []
    for name, base, new, paper in KUNSERVE_RATIOS:
        if base not in by_mode or new not in by_mode:
            continue
        b = stat(by_mode[base].get("summary") or {}, "ttft", "p99_ms")
        n = stat(by_mode[new].get("summary") or {}, "ttft", "p99_ms")
        ours = b / n if math.isfinite(b) and math.isfinite(n) and n > 0 else math.nan
        ratios.append(
            {
                "name": name,
                "base": base,
                "new": new,
                "base_p99_ttft_ms": b,
                "new_p99_ttft_ms": n,
                "ratio": ours,
                "paper": list(paper) if paper else None,
            }
        )
    return {"ratios": ratios, "tpot_phases": tpot_phases(by_mode)}


AFTER_S = 5.0  # the bound: TPOT back to the baseline's within 5 s after a restore


def tpot_phases(by_mode: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each KunServe-mode run with a group: the median TPOT of the requests that
    decoded mostly while its first group served, and of those that started decoding more
    than AFTER_S after it dissolved, beside every baseline's requests in the same windows
    (same seeded workload: the same requests, by session and turn)."""
    baselines = {m: r for m, r in by_mode.items() if m.startswith("dp-")}
    out = []
    for mode, run in by_mode.items():
        groups = (run.get("elastic") or {}).get("groups") or []
        if not mode.startswith("kunserve") or not groups:
            continue
        g = groups[0]
        start = num(g.get("serving_s"))
        stop = num(g.get("dissolved_s"))
        if not math.isfinite(start):
            continue
        end = stop if math.isfinite(stop) else math.inf
        grouped = _keys(run, partial(_mostly_within, start=start, end=end))
        after_t = stop + AFTER_S
        after = _keys(run, partial(_starts_after, t=after_t)) if math.isfinite(stop) else set()
        row: dict[str, Any] = {
            "mode": mode,
            "window_s": [start, stop if math.isfinite(stop) else None],
            "grouped_ms": _median_tpot(run, grouped),
            "after_ms": _median_tpot(run, after),
            "baselines": {
                b: {"grouped_ms": _median_tpot(r, grouped), "after_ms": _median_tpot(r, after)}
                for b, r in baselines.items()
            },
        }
        out.append(row)
    return out


def _mostly_within(a: float, b: float, *, start: float, end: float) -> bool:
    """Decode span [a, b] lies more than half inside [start, end]."""
    return max(0.0, min(b, end) - max(a, start)) > 0.5 * (b - a)


def _starts_after(a: float, b: float, *, t: float) -> bool:
    return a >= t


def _decode_span(rec: Mapping[str, Any]) -> tuple[float, float]:
    sent = num(rec.get("sent_s"))
    return sent + num(rec.get("ttft_s")), sent + num(rec.get("jct_s"))


def _keys(run: Mapping[str, Any], keep: Callable[[float, float], bool]) -> set[tuple[str, int]]:
    """(session, turn) of the requests of `run` whose decode span [a, b] passes `keep`."""
    out = set()
    for rec in run.get("records") or []:
        a, b = _decode_span(rec)
        if rec.get("error") or not (math.isfinite(a) and math.isfinite(b)) or b <= a:
            continue
        if keep(a, b):
            out.add((str(rec.get("session")), int(rec.get("turn", 0))))
    return out


def _median_tpot(run: Mapping[str, Any], keys: set[tuple[str, int]]) -> float:
    xs = sorted(
        1e3 * num(rec.get("tpot_s"))
        for rec in run.get("records") or []
        if (str(rec.get("session")), int(rec.get("turn", 0))) in keys
        and math.isfinite(num(rec.get("tpot_s")))
    )
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def tpot_phase_lines(phases: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for p in phases:
        for base, b in (p.get("baselines") or {}).items():
            g, bg = num(p.get("grouped_ms")), num(b.get("grouped_ms"))
            a, ba = num(p.get("after_ms")), num(b.get("after_ms"))
            lines.append(
                f"TPOT of the requests {p['mode']} served in its group, median: "
                f"{fmt(g, 1)} ms vs {fmt(bg, 1)} ms in {base} ({_rel(g, bg)}); "
                f"of those starting > {AFTER_S:g} s after the restore: "
                f"{fmt(a, 1)} vs {fmt(ba, 1)} ms ({_rel(a, ba)})"
            )
    return lines


def _rel(x: float, base: float) -> str:
    if not (math.isfinite(x) and math.isfinite(base)) or base <= 0:
        return "n/a"
    return f"{100 * (x / base - 1):+.0f}%"


def paper_text(paper: Sequence[float] | None) -> str:
    if not paper:
        return "no paper figure"
    lo, hi = paper
    return f"paper {lo:g}x lower" if lo == hi else f"paper {lo:g}-{hi:g}x lower"


def ratio_words(ratio: float) -> str:
    """12.5 -> '12.5x lower', 0.25 -> '4.0x higher' (P99 TTFT with the new mode)."""
    if not math.isfinite(ratio) or ratio <= 0:
        return "n/a"
    return f"{fmt(ratio, 1)}x lower" if ratio >= 1 else f"{fmt(1 / ratio, 1)}x higher"


def ratio_line(r: Mapping[str, Any]) -> str:
    """'KunServe vs vLLM (recompute): P99 TTFT 5,000.0 ms (dp-recompute) -> 400.0 ms
    (kunserve), 12.5x lower (paper 12.7-72.2x)'."""
    what = ratio_words(num(r.get("ratio")))
    return (
        f"{r.get('name')}: P99 TTFT {fmt(num(r.get('base_p99_ttft_ms')))} ms ({r.get('base')}) "
        f"-> {fmt(num(r.get('new_p99_ttft_ms')))} ms ({r.get('new')}), {what} "
        f"({paper_text(r.get('paper'))})"
    )


LATENCY_HEADERS = (
    "mode", "requests", "errors", "TTFT p50 ms", "TTFT p99 ms", "TTFT p999 ms",
    "TPOT p50 ms", "TPOT p99 ms", "JCT mean ms", "JCT p99 ms", "req/s", "output tok/s",
)  # fmt: skip


def latency_row(run: Mapping[str, Any]) -> list[str]:
    s = run.get("summary") or {}
    return [
        str(run.get("label", "")),
        fmt(s.get("requests")),
        fmt(s.get("errors")),
        *(fmt(stat(s, "ttft", k)) for k in ("p50_ms", "p99_ms", "p999_ms")),
        *(fmt(stat(s, "tpot", k)) for k in ("p50_ms", "p99_ms")),
        *(fmt(stat(s, "jct", k)) for k in ("mean_ms", "p99_ms")),
        fmt(num(s.get("rps")), 2),
        fmt(num(s.get("output_tok_s")), 1),
    ]


ELASTIC_HEADERS = (
    "mode", "drops", "restores", "migrations", "fallbacks", "drop s (max)",
    "group lifetime s", "exchanged / recomputed req", "exchanged MiB", "exchange stall ms (max)",
    "restore s (max)", "restore pause ms (max)", "bubble % per stage",
)  # fmt: skip


def _max(values: Sequence[Any]) -> float:
    xs = [num(v) for v in values]
    xs = [x for x in xs if math.isfinite(x)]
    return max(xs) if xs else math.nan


def elastic_row(run: Mapping[str, Any]) -> list[str]:
    e = run.get("elastic") or {}
    groups = [g for g in e.get("groups") or [] if g.get("serving_s") is not None]
    pauses = [(g.get("restore") or {}).get("pause_s") for g in groups]
    lifetimes = [
        f"{fmt(num(g.get('lifetime_s')), 1)}{'+' if g.get('open') else ''}" for g in groups
    ]
    return [
        str(run.get("label", "")),
        fmt(e.get("drops")),
        fmt(e.get("restores")),
        fmt(e.get("migrations")),
        fmt(e.get("fallbacks")),
        fmt(_max([g.get("drop_s") for g in groups]), 2),
        ", ".join(lifetimes) or "-",
        f"{fmt(e.get('exchanged_requests'))} / {fmt(e.get('drop_recomputed_requests'))}",
        fmt(num(e.get("exchanged_bytes")) / MIB, 1) if e else "-",
        fmt(1e3 * num(e.get("exchange_stall_s_max")), 1),
        fmt(_max([g.get("restore_s") for g in groups]), 2),
        fmt(1e3 * _max(pauses), 1),
        "; ".join(
            " / ".join(fmt(100 * num(b), 0) for b in (g.get("bubble") or {}).values())
            for g in groups
            if g.get("bubble")
        )
        or "-",
    ]


def markdown(experiment: Experiment) -> str:
    """The KunServe section: the latency and elastic tables and the ratios ("" when no run
    is of a KunServe mode)."""
    runs = kunserve_runs(list(experiment.get("runs") or []))
    if not runs:
        return ""
    budgets = sorted({int(b) for r in runs if math.isfinite(b := num(r.get("budget_bytes")))})
    out = [
        f"#### {experiment.get('name', 'experiment')}: KunServe modes",
        "",
        f"Budget per instance: {', '.join(f'{b / MIB:.1f} MiB' for b in budgets)} "
        "(parameters + KV; the baselines' KV is the budget less the parameters). "
        "A group lifetime with + outlived the replay.",
        "",
        markdown_table(LATENCY_HEADERS, [latency_row(r) for r in runs]),
        "",
        markdown_table(ELASTIC_HEADERS, [elastic_row(r) for r in runs]),
    ]
    ratios = (experiment.get("kunserve") or {}).get("ratios") or []
    if ratios:
        out.append("")
        out.extend(f"- {ratio_line(r)}" for r in ratios)
    phases = (experiment.get("kunserve") or {}).get("tpot_phases") or []
    if phases:
        out.append("")
        out.extend(f"- {line}" for line in tpot_phase_lines(phases))
    return "\n".join(out) + "\n"
