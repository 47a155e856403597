"""`memserve bench serve`: a workload replayed through whole clusters, one per caching mode
and routing policy, side by side.

    memserve bench serve --workload chat --modes pd-basic,pd-caching-3 --rate 1
    memserve bench serve --workload docs --modes pd-caching-3 --prefill 3 \\
        --policies locality,session,least-load,round-robin
    memserve bench serve --gateway tcp://host:5800 --workload agent   # a running cluster
    memserve bench serve --workload reasoning --arrival spike:24:2:5 --rate 0.5 \\
        --sessions 40 --budget-mib 123 --modes dp-recompute,dp-migrate,kunserve

Workloads are seeded (bench/workloads/): chat (ShareGPT-like), docs (LooGLE-like), agent
(ReAct-like), reasoning (single turns with long answers), or a trace file (sharegpt,
burstgpt with --trace); arrivals Poisson, Gamma, on/off or a spike over a steady base.
Each configuration runs on a fresh cluster started by `memserve up`'s launcher
(bench/experiment.py). Figures per run:
mean / p99 TTFT, TPOT and JCT, cache hit rate; and the caching, disaggregation and routing
gains next to the papers' (bench/paper.py). Results go to --out-dir as JSON, CSV, a
markdown table and PNG plots (bench/results.py, bench/plots.py).

KunServe's modes (bench/kunserve_modes.py: dp-recompute, dp-swap, dp-migrate, kunserve,
kunserve-recompute, kunserve-norestore) run colocated with --budget-mib per instance; their
runs add the elastic timeline, a latency and an elastic table, the P99 TTFT ratios beside
the paper's, and two PNGs (TTFT over arrival time with the groups shaded; P99 bars).
--cluster-set SECTION.KEY=VALUE sets a key of every cluster (any mode).

--gateway-figures adds, on the first colocated cluster, the gateway's added latency and the
request rates the gateway and the scheduler sustain (bench/gateway_figures.py).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from bench.experiment import ALL_MODES, MODES, Experiment, Options, Shape, shapes
from bench.kunserve_modes import (
    MIB,
    budget_bytes,
    is_kunserve_mode,
    parse_cluster_set,
)
from bench.report import CpuMonitor, fmt, format_table, machine_info


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="a workload through whole clusters, per mode and policy")
    w = p.add_argument_group("workload")
    w.add_argument(
        "--workload", default="chat", help="chat | docs | agent | reasoning | sharegpt | burstgpt"
    )
    w.add_argument("--trace", default=None, help="trace file for sharegpt / burstgpt")
    w.add_argument("--sessions", type=int, default=16)
    w.add_argument("--rate", type=float, default=1.0, help="sessions per second (0: all at once)")
    w.add_argument(
        "--arrival",
        default="poisson",
        help="poisson | gamma:CV | onoff:ON:OFF | spike:N:WITHIN_S:AT_S (N of the sessions "
        "within WITHIN_S seconds from AT_S, the rest Poisson at --rate) | trace",
    )
    w.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="every answer exactly this many tokens (before --scale; chat, reasoning)",
    )
    w.add_argument("--scale", type=float, default=0.25, help="token lengths x this (CPU runs)")
    w.add_argument("--max-context", type=int, default=4096)
    w.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="generator config"
    )
    w.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("clusters")
    c.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"of {', '.join(ALL_MODES)} (default: the caching modes)",
    )
    c.add_argument("--policies", default="locality")
    c.add_argument("--model", default="small", help="small: prefill costs enough to matter")
    c.add_argument("--prefill", type=int, default=1)
    c.add_argument("--decode", type=int, default=1)
    c.add_argument("--colocated", type=int, default=2, help="equal to prefill + decode")
    c.add_argument("--kv-mib", type=int, default=512, help="KV memory per MemPool daemon")
    c.add_argument(
        "--budget-mib",
        type=float,
        default=None,
        help="KunServe modes: parameters + KV per instance (default: parameters + --kv-mib)",
    )
    c.add_argument(
        "--cluster-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a setting of every cluster, e.g. scheduler.elastic_window=10",
    )
    c.add_argument(
        "--no-fetch", action="store_true", help="no KV moves between instances (routing only)"
    )
    c.add_argument("--gateway", default="", help="run once against this running cluster")
    r = p.add_argument_group("run")
    r.add_argument("--warmup", type=int, default=4, help="warm-up requests per cluster")
    r.add_argument("--max-requests", type=int, default=None)
    r.add_argument("--duration", type=float, default=None, help="seconds; then no new turns")
    r.add_argument("--timeout", type=float, default=300.0, help="per-request silence limit")
    r.add_argument("--gateway-figures", action="store_true")
    r.add_argument("--name", default="", help="results file names (default: the workload)")
    r.add_argument("--out-dir", default="results/serve")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def build_workload(args: argparse.Namespace) -> Any:
    from bench.workloads import build

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value.strip()
    if args.output_len is not None:
        if args.output_len < 1:
            raise ValueError(f"--output-len must be >= 1, got {args.output_len}")
        if args.workload not in ("chat", "reasoning"):
            raise ValueError(f"--output-len: workload {args.workload} has no answer lengths")
        n = str(args.output_len)
        overrides |= {"answer_tokens_mean": n, "answer_tokens_sigma": "0", "answer_tokens_max": n}
    tokenizer = None
    if args.workload == "sharegpt" and args.model not in ("tiny", "small"):
        from common.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(args.model)
    return build(
        args.workload,
        sessions=args.sessions,
        rate=args.rate,
        arrival=args.arrival,
        seed=args.seed,
        scale=args.scale,
        max_context=args.max_context,
        overrides=overrides,
        trace=args.trace,
        tokenizer=tokenizer,
    )


def run(args: argparse.Namespace) -> int:
    from bench.workloads import WorkloadError
    from common.cli_errors import fail

    try:
        workload = build_workload(args)
        modes = [m for m in args.modes.split(",") if m]
        configs = shapes(
            modes,
            [p for p in args.policies.split(",") if p],
            prefill=args.prefill,
            decode=args.decode,
            colocated=args.colocated,
            budget_bytes=_budget(args, modes),
        )
        cluster_set = parse_cluster_set(args.cluster_set)
    except (WorkloadError, ValueError, OSError) as exc:
        return fail(str(exc))
    summary = workload.summary()
    print(
        f"workload {workload.name}: {summary['sessions']:.0f} sessions, "
        f"{summary['requests']:.0f} requests, mean prompt {summary['mean_prompt_tokens']:.0f} "
        f"tokens (history included), mean answer {summary['mean_max_tokens']:.0f} tokens, "
        f"arrivals over {summary['duration_s']:.1f} s",
        flush=True,
    )
    options = Options(
        model=args.model,
        kv_mib=args.kv_mib,
        fetch=not args.no_fetch,
        warmup=args.warmup,
        timeout_s=args.timeout,
        max_requests=args.max_requests,
        duration_s=args.duration,
        progress=False if args.no_progress else None,
        cluster_set=cluster_set,
    )
    exp = Experiment(args.name or workload.name, workload, options, command=_command())
    if args.gateway_figures:
        options.after = _gateway_figures_once(exp)
    monitor = CpuMonitor().start()
    asyncio.run(_run(exp, configs, args.gateway))
    doc = exp.document(machine_info())
    doc["cpu"] = monitor.stop()
    report(doc)
    from bench.output import write_all

    paths = write_all(doc, Path(args.out_dir), plots=not args.no_plots)
    print("saved " + ", ".join(str(p) for p in paths))
    if exp.error:
        return fail(exp.error)
    if exp.interrupted:
        return 130
    return 0 if all(r["summary"]["errors"] == 0 for r in exp.runs) else 1


def _budget(args: argparse.Namespace, modes: list[str]) -> int:
    """The KunServe modes' budget per instance in bytes (0 when none runs); ValueError
    for one too small."""
    if not any(is_kunserve_mode(m) for m in modes):
        if args.budget_mib is not None:
            raise ValueError("--budget-mib is for the KunServe modes (none given in --modes)")
        return 0
    budget, params = budget_bytes(args.model, args.budget_mib, args.kv_mib)
    print(
        f"budget per instance {budget / MIB:.1f} MiB: parameters {params / MIB:.1f} MiB, "
        f"KV {(budget - params) / MIB:.1f} MiB before any drop",
        flush=True,
    )
    return budget


async def _run(exp: Experiment, configs: list[Shape], gateway: str) -> None:
    loop = asyncio.get_running_loop()
    # Only the main thread may take signals (a caller running us in a thread keeps its own).
    catch = threading.current_thread() is threading.main_thread()
    if catch:
        loop.add_signal_handler(signal.SIGINT, _interrupt, exp, loop)
    try:
        if gateway:
            await exp.run_against(gateway)
        else:
            await exp.run(configs)
    finally:
        if catch:
            loop.remove_signal_handler(signal.SIGINT)


def _interrupt(exp: Experiment, loop: asyncio.AbstractEventLoop) -> None:
    print("\ninterrupted: keeping what was measured, stopping the clusters", file=sys.stderr)
    exp.stop()
    # A second Ctrl-C is the default one: it cancels whatever is still waiting.
    loop.remove_signal_handler(signal.SIGINT)


def _gateway_figures_once(exp: Experiment) -> Any:
    async def after(shape: Shape, cluster: Any) -> Any:
        from bench.gateway_figures import gateway_figures

        if not shape.colocated_mode or any("one_token_gateway" in v for v in exp.extra.values()):
            return {}
        return await gateway_figures(cluster)

    return after


def report(doc: dict[str, Any]) -> None:
    """The side-by-side table, the gains next to the papers', the gateway figures."""
    from bench.results import comparison_line

    rows = []
    for r in doc["runs"]:
        s = r["summary"]
        rows.append(
            [
                r["label"],
                str(s["requests"]),
                str(s["errors"]),
                fmt(s["ttft"]["mean_ms"]),
                fmt(s["ttft"]["p99_ms"]),
                fmt(s["tpot"]["mean_ms"]),
                fmt(s["jct"]["mean_ms"]),
                fmt(s["jct"]["p99_ms"]),
                fmt(100 * s["hit_rate"]),
            ]
        )
    headers = ["run", "reqs", "err", "TTFT mean", "TTFT p99", "TPOT mean"]
    print()
    print(format_table([*headers, "JCT mean", "JCT p99", "hit %"], rows))
    print("(milliseconds)")
    for comp in doc["comparisons"]:
        print(comparison_line(comp))
    _report_kunserve(doc)
    for label, gw in (doc.get("extra") or {}).items():
        if not gw:
            continue
        print(
            f"gateway ({label}): one-token request p50 {gw['one_token_gateway']['p50_ms']:.2f} "
            f"ms / p99 {gw['one_token_gateway']['p99_ms']:.2f} ms through the cluster, "
            f"{gw['one_token_direct']['p50_ms']:.2f} / {gw['one_token_direct']['p99_ms']:.2f} "
            f"ms straight to a worker: added p50 {gw['added_p50_ms']:.2f} ms, "
            f"p99 {gw['added_p99_ms']:.2f} ms"
        )
        print(
            f"rates: cluster {gw['cluster_rps']:.0f} one-token requests/s, "
            f"scheduler {gw['scheduler_place_per_s']:.0f} place+release/s"
        )
    print(f"other processes used {fmt(doc['cpu']['other_cores'], 2)} cores meanwhile")


def _report_kunserve(doc: dict[str, Any]) -> None:
    from bench.kunserve_results import (
        ELASTIC_HEADERS,
        LATENCY_HEADERS,
        elastic_row,
        kunserve_runs,
        latency_row,
        ratio_line,
    )

    runs = kunserve_runs(doc["runs"])
    if not runs:
        return
    print()
    print(format_table(list(LATENCY_HEADERS), [latency_row(r) for r in runs]))
    print()
    print(format_table(list(ELASTIC_HEADERS), [elastic_row(r) for r in runs]))
    for r in (doc.get("kunserve") or {}).get("ratios") or []:
        print(ratio_line(r))


def _command() -> str:
    return "memserve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
