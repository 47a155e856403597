"""Every file of an experiment in one call: the tables of bench/results.py and the plots
of bench/plots.py (which reads results, so the writer of both sits above them)."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.kunserve_results import any_kunserve
from bench.kunserve_results import markdown as kunserve_markdown
from bench.report import write_json
from bench.results import (
    Experiment,
    file_stem,
    markdown,
    write_csv,
    write_summary_csv,
)


def write_all(experiment: Experiment, out_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write {name}.json, .csv, -summary.csv, .md and (if plots) the PNGs; their paths.
    With runs of KunServe modes, the markdown gains their section and the PNGs their
    timeline (-timeline.png) and P99 TTFT bars (-p99.png).

    Without matplotlib the PNGs are skipped with a warning: the figures matter more than
    the pictures, so a missing plotting library must not lose them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(str(experiment.get("name", "")))
    md = out / f"{stem}.md"
    kunserve = any_kunserve(list(experiment.get("runs") or []))
    md.write_text(markdown(experiment) + ("\n" + kunserve_markdown(experiment) if kunserve else ""))
    paths = [
        write_json(out / f"{stem}.json", dict(experiment)),
        write_csv(experiment, out / f"{stem}.csv"),
        write_summary_csv(experiment, out / f"{stem}-summary.csv"),
        md,
    ]
    if plots:
        try:
            from bench import plots as plotting
        except ImportError as e:
            print(f"warning: no plots for {stem} ({e})", file=sys.stderr)
        else:
            paths.append(plotting.plot_ttft_cdf(experiment, out / f"{stem}-ttft-cdf.png"))
            paths.append(plotting.plot_bars(experiment, out / f"{stem}-bars.png"))
            if kunserve:
                from bench import kunserve_plots

                paths.append(
                    kunserve_plots.plot_ttft_timeline(experiment, out / f"{stem}-timeline.png")
                )
                paths.append(kunserve_plots.plot_p99_ratios(experiment, out / f"{stem}-p99.png"))
    return paths
