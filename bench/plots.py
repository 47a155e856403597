"""PNG plots of an experiment's results (the document described in bench/results.py).

Reads experiment["name"], experiment["workload"]["name"] and, per entry of
experiment["runs"], its "label", its "records" (ttft_s and error, for the TTFT CDF) and its
"summary" (ttft / jct mean_ms and p99_ms, hit_rate, for the bars). Matplotlib draws with
the Agg backend, so plots are written on machines without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on bench machines

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.results import Experiment, num, ok_records, stat

LOG_SPAN = 20.0  # log x-axis once the largest TTFT is this many times the smallest
BAR_WIDTH = 0.38


def _title(experiment: Experiment, what: str) -> str:
    workload = (experiment.get("workload") or {}).get("name")
    name = experiment.get("name", "experiment")
    return f"{name}: {what}" + (f" (workload {workload})" if workload else "")


def _save(fig: Figure, path: str | Path) -> Path:
    # Closed even when saving fails: pyplot keeps every open figure alive otherwise.
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
    finally:
        plt.close(fig)
    return p


def ttft_ms(run: Mapping[str, Any]) -> list[float]:
    """The TTFTs of a run's succeeded requests, in ms, sorted (missing ones left out)."""
    values = (1e3 * num(r.get("ttft_s")) for r in ok_records(run.get("records") or []))
    return sorted(v for v in values if v == v)  # v == v drops NaN


def wants_log_axis(values: Sequence[float]) -> bool:
    """True when the positive values span more than LOG_SPAN times (smallest to largest)."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) > LOG_SPAN * min(positive)


def plot_ttft_cdf(experiment: Experiment, path: str | Path) -> Path:
    """One empirical CDF of TTFT (ms) per run; log x-axis when the values span > 20x."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    everything: list[float] = []
    for run in experiment.get("runs") or []:
        xs = ttft_ms(run)
        label = str(run.get("label", "?"))
        if not xs:
            # Still listed in the legend, so a run that produced nothing is visibly absent.
            ax.plot([], [], label=f"{label} (no data)")
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=label)
        everything.extend(xs)
    if wants_log_axis(everything):
        ax.set_xscale("log")
    if not everything:
        ax.text(0.5, 0.5, "no successful requests", ha="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(_title(experiment, "TTFT CDF"))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def _tick_label(run: Mapping[str, Any]) -> str:
    hit = num((run.get("summary") or {}).get("hit_rate"))
    hit_text = f"{100 * hit:.0f}%" if hit == hit else "-"
    return f"{run.get('label', '?')}\nhit {hit_text}"


def _bar_pair(
    ax: Axes, runs: Sequence[Mapping[str, Any]], latency: str, ticks: Sequence[str]
) -> None:
    # Mean and P99 side by side per run; NaN (no data) drawn as an empty slot marked "-".
    xs = range(len(runs))
    for offset, key, name in ((-0.5, "mean_ms", "mean"), (0.5, "p99_ms", "P99")):
        values = [stat(run.get("summary") or {}, latency, key) for run in runs]
        heights = [v if v == v else 0.0 for v in values]
        bars = ax.bar([x + offset * BAR_WIDTH for x in xs], heights, BAR_WIDTH, label=name)
        labels = [f"{v:,.0f}" if v == v else "-" for v in values]
        ax.bar_label(bars, labels=labels, fontsize="x-small", padding=2)
    ax.set_xticks(list(xs), ticks, rotation=30 if len(runs) > 4 else 0, fontsize="small")
    ax.set_ylabel(f"{latency.upper()} (ms)")
    ax.margins(y=0.15)  # room for the value labels above the tallest bar
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")


def plot_bars(experiment: Experiment, path: str | Path) -> Path:
    """Per run, mean and P99 TTFT (top) and JCT (bottom), annotated; hit rate in the ticks."""
    runs = list(experiment.get("runs") or [])
    ticks = [_tick_label(run) for run in runs]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.4 * len(runs) + 2.0), 7.5))
    for ax, latency in zip(axes, ("ttft", "jct"), strict=True):
        _bar_pair(ax, runs, latency, ticks)
    fig.suptitle(_title(experiment, "latency per run"))
    fig.tight_layout()
    return _save(fig, path)
