"""The KunServe evaluation's PNGs (bench/kunserve_results.py's document):

- the timeline: per KunServe-mode run, each request's TTFT over its arrival time, the
  spike's window marked, each group's lifetime shaded (its drop, prepare -> serving, in a
  second shade) and migrations ticked; failed requests as crosses on the top edge;
- P99 TTFT per mode as bars, our ratios beside the paper's below them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bench.kunserve_results import kunserve_runs, paper_text, ratio_words
from bench.plots import _save, _title, wants_log_axis
from bench.results import Experiment, num, stat


def _points(run: Mapping[str, Any]) -> tuple[list[float], list[float], list[float]]:
    """(arrival s, TTFT ms) of the succeeded requests, and the arrivals of failed ones."""
    xs, ys, failed = [], [], []
    for r in run.get("records") or []:
        sent = num(r.get("sent_s"))
        ttft = num(r.get("ttft_s"))
        if r.get("error") or not math.isfinite(ttft):
            failed.append(sent)
        else:
            xs.append(sent)
            ys.append(1e3 * ttft)
    return xs, ys, failed


def _spikes(experiment: Experiment) -> list[tuple[float, float]]:
    arrival = ((experiment.get("workload") or {}).get("params") or {}).get("arrival") or {}
    if arrival.get("kind") != "spike":
        return []
    at, within = num(arrival.get("at_s")), num(arrival.get("within_s"))
    every = num(arrival.get("every_s", 0))
    return [(at + b * every, at + b * every + within) for b in range(int(arrival.get("bursts", 1)))]


def plot_ttft_timeline(experiment: Experiment, path: str | Path) -> Path:
    runs = kunserve_runs(list(experiment.get("runs") or []))
    n = max(1, len(runs))
    fig, axes = plt.subplots(n, 1, figsize=(9.5, 2.4 * n + 0.8), sharex=True, squeeze=False)
    spikes = _spikes(experiment)
    for ax, run in zip(axes[:, 0], runs or [{}], strict=True):
        xs, ys, failed = _points(run)
        ax.scatter(xs, ys, s=8, label="TTFT of a request")
        top = max(ys) if ys else 1.0
        if failed:
            ax.scatter(failed, [top] * len(failed), marker="x", color="red", label="failed")
        if wants_log_axis(ys):
            ax.set_yscale("log")
        for b, (start, stop) in enumerate(spikes):
            ax.axvspan(start, stop, color="gray", alpha=0.12, label=None if b else "spike arrivals")
        elastic = run.get("elastic") or {}
        end = num((run.get("summary") or {}).get("wall_s"))
        for i, g in enumerate(elastic.get("groups") or []):
            prepare, serving = num(g.get("prepare_s")), num(g.get("serving_s"))
            if math.isfinite(prepare) and math.isfinite(serving):
                ax.axvspan(
                    prepare, serving, color="orange", alpha=0.3, label="drop" if not i else None
                )
            if math.isfinite(serving):
                life = num(g.get("lifetime_s"))
                stop = serving + life if math.isfinite(life) else end
                ax.axvspan(
                    serving, stop, color="green", alpha=0.15, label="group" if not i else None
                )
        for k, e in enumerate(e for e in elastic.get("timeline") or [] if e["event"] == "migrated"):
            ax.axvline(
                e["t_s"], color="purple", lw=0.6, alpha=0.6, label="migration" if not k else None
            )
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(str(run.get("label", "no KunServe-mode run")), fontsize="small")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            # Outside the axes: the points near the run's start stay visible.
            ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("arrival time (s from the replay's start)")
    fig.suptitle(_title(experiment, "TTFT over arrival time"))
    fig.tight_layout()
    return _save(fig, path)


def plot_p99_ratios(experiment: Experiment, path: str | Path) -> Path:
    runs = kunserve_runs(list(experiment.get("runs") or []))
    ratios = (experiment.get("kunserve") or {}).get("ratios") or []
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(runs) + 2.0), 4.5 + 0.3 * len(ratios)))
    values = [stat(r.get("summary") or {}, "ttft", "p99_ms") for r in runs]
    heights = [v if math.isfinite(v) else 0.0 for v in values]
    bars = ax.bar(range(len(runs)), heights, 0.6)
    ax.bar_label(bars, labels=[f"{v:,.0f}" if math.isfinite(v) else "-" for v in values],
                 fontsize="x-small", padding=2)  # fmt: skip
    ax.set_xticks(list(range(len(runs))), [str(r.get("label", "?")) for r in runs],
                  rotation=20, fontsize="small")  # fmt: skip
    if wants_log_axis([v for v in values if math.isfinite(v)]):
        ax.set_yscale("log")
    ax.set_ylabel("P99 TTFT (ms)")
    ax.margins(y=0.15)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(_title(experiment, "P99 TTFT per mode"))
    lines = [
        f"{r.get('new')} vs {r.get('base')}: {ratio_words(num(r.get('ratio')))} "
        f"({paper_text(r.get('paper'))})"
        for r in ratios
    ]
    text = "\n".join(lines) or "no pair of the paper's modes ran"
    fig.text(0.01, 0.01, text, fontsize="small", va="bottom")
    fig.tight_layout(rect=(0, 0.03 + 0.05 * max(1, len(lines)), 1, 1))
    return _save(fig, path)
