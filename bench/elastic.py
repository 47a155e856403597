"""`memserve bench elastic`: what KunServe's parameter drop gives and costs, on one cluster
of 2 colocated instances with a memory budget each (parameters + `--kv-mib` MiB of KV).

    memserve bench elastic                       # small preset, ~2 min on 2 cores
    memserve bench elastic --rounds 5 --kv-mib 64

Rounds interleave the two sides so machine noise hits both alike: requests alone on an
instance (solo), then `elastic drop colocated-0,colocated-1` with a new request sent right
after it, requests in the group, then `elastic restore` with requests running across it.
Figures:

- memory, per instance: resident parameter bytes (worker status and daemon info) and the
  KV capacity in tokens (daemon device blocks x block tokens: whole blocks before, sub-
  blocks of half the layers while grouped), before the drop and while grouped; the group's
  token capacity (group blocks x block tokens) next to the two instances' sum; each
  worker's RSS before the drop, while grouped and after the restore;
- the drop: the command's duration, and the new request's TTFT counted from the moment the
  drop was sent; median / min / max over the rounds. The request races the drop's Prepare:
  when it reaches a member before Prepare pauses that member's engine, its first token
  comes from that member alone and the group adopts it (counted apart); otherwise it
  queues while the group forms (their TTFT is also given on its own);
- the restore: the command's duration, the leader's pause (`pause_s`), requests moved home
  with their KV vs recomputed, bytes moved;
- the pipeline's cost: TPOT (and TTFT) of the same request alone on an instance vs in the
  group, medians side by side; and a batch of `--batch` concurrent requests (round 0).

One table (metric | before/solo | after/group | ratio) is printed and saved as markdown
beside the JSON (`--out`).

`--phases` selects what runs (default `rounds`: the above), each phase on its own cluster:
`exchange` (bench/elastic_exchange.py: the client's stall of the requests running at a
drop, their KV exchanged vs recomputed) and `auto` (bench/elastic_auto.py: the automatic
controller, nothing commanded, and its timeline); `all` runs the three. With more than
`rounds`, every table goes into the markdown under its own heading.

    memserve bench elastic --phases exchange --x-rounds 3 --x-running 4
    memserve bench elastic --phases auto --auto-model tiny --auto-kv-mib 3
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.elastic_cluster import (  # noqa: F401 (MIB, prompt: re-exported)
    MEMBERS,
    MIB,
    Bench,
    Options,
    Stream,
    _stats,
    param_bytes,
    prompt,
    settings,
)
from bench.report import CpuMonitor, fmt, format_table, machine_info, write_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser("elastic", help="KunServe parameter drop: memory, drop/restore, TPOT")
    p.add_argument("--model", default="small", help="preset (small: 8 layers, ~95 MB fp32)")
    p.add_argument("--kv-mib", type=int, default=32, help="KV MiB per instance beside params")
    p.add_argument("--rounds", type=int, default=4, help="drop / restore cycles")
    p.add_argument("--requests", type=int, default=2, help="single requests per side per round")
    p.add_argument("--batch", type=int, default=4, help="concurrent requests, batch case (0: no)")
    p.add_argument("--across", type=int, default=2, help="requests running across a restore")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128, help="greedy tokens (ignore_eos)")
    p.add_argument("--run-dir", default="", help="cluster logs (default: a temporary folder)")
    p.add_argument("--out", default="results/bench_elastic.json", help="JSON (+ .md beside)")
    p.add_argument(
        "--phases",
        default="rounds",
        help="comma-separated: rounds (the figures above), exchange (exchange vs recompute "
        "at a drop), auto (the automatic controller's timeline); or all",
    )
    x = p.add_argument_group("exchange phase (--model, --kv-mib as above)")
    x.add_argument("--x-rounds", type=int, default=3, help="drops per case")
    x.add_argument("--x-running", type=int, default=4, help="requests running at a drop")
    x.add_argument("--x-prompt-tokens", type=int, default=256)
    x.add_argument("--x-max-tokens", type=int, default=192)
    a = p.add_argument_group("auto phase (its own model and budget)")
    a.add_argument("--auto-model", default="tiny", help="preset the controller runs on")
    a.add_argument("--auto-kv-mib", type=float, default=3.0, help="KV MiB per instance")
    a.add_argument("--auto-burst", type=int, default=12, help="requests of the burst")
    a.add_argument("--auto-burst-tokens", type=int, default=290, help="tokens per burst request")
    a.add_argument("--auto-trickle", type=int, default=2, help="new requests at a time after")
    p.set_defaults(func=run)


async def measure(opts: Options) -> dict[str, Any]:
    """Start the cluster, run the rounds, stop it: every figure (see the module doc)."""
    from common.client import GatewayClient
    from services.launcher.supervisor import Cluster

    if opts.rounds < 1 or opts.requests < 1:
        raise ValueError("rounds and requests must be >= 1")
    token = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="memserve-elastic-") as tmp:
        run_dir = opts.run_dir or tmp
        async with Cluster(settings(opts, run_dir, token)) as cluster:
            client = GatewayClient(cluster.gateway, timeout_s=120)
            try:
                return await _rounds(Bench(cluster, client, token, opts))
            finally:
                client.close()


async def _rounds(b: Bench) -> dict[str, Any]:
    opts = b.opts
    warm = [Stream(b.client, b.next_prompt(), 16) for _ in MEMBERS]  # both instances
    for s in warm:
        await s.done()
    before = await b.snapshot()
    solo: list[Any] = []
    group: list[Any] = []
    solo_batch: list[Any] = []
    group_batch: list[Any] = []
    drops: list[dict[str, Any]] = []
    restores: list[dict[str, Any]] = []
    grouped: dict[str, Any] = {}
    group_info: dict[str, Any] = {}
    for r in range(opts.rounds):
        solo += await b.single(opts.requests)
        if r == 0 and opts.batch:
            solo_batch = await b.batch()
        d = await b.drop()
        drops.append(d)
        if r == 0:
            grouped = await b.snapshot()
            status = await b.admin("elastic", "status")
            (group_info,) = [g for g in status["groups"] if g["group_id"] == d["group_id"]]
        group += await b.single(opts.requests)
        if r == 0 and opts.batch:
            group_batch = await b.batch()
        # Live and paused restores alternate: both figures from one run, side by side.
        restores.append(await b.restore(d["group_id"], "live" if r % 2 == 0 else "pause"))
    await asyncio.sleep(0.5)  # the restore's last reloads settle
    after = await b.snapshot()
    events = (await b.admin("elastic", "status")).get("events", [])
    return summarize(
        opts, before, grouped, after, group_info, drops, restores,
        solo, group, solo_batch, group_batch, events,
    )  # fmt: skip


def _side(finals: list[Any]) -> dict[str, Any]:
    return {
        "tpot_ms": _stats([1e3 * f.tpot_s for f in finals]),
        "ttft_ms": _stats([1e3 * f.ttft_s for f in finals]),
        "instances": sorted({i for f in finals for i in f.instances}),
    }


def summarize(
    opts: Options,
    before: dict[str, Any],
    grouped: dict[str, Any],
    after: dict[str, Any],
    group_info: dict[str, Any],
    drops: list[dict[str, Any]],
    restores: list[dict[str, Any]],
    solo: list[Any],
    group: list[Any],
    solo_batch: list[Any],
    group_batch: list[Any],
    events: list[dict[str, Any]],
) -> dict[str, Any]:
    bs = int(group_info.get("block_size", 0))
    return {
        "options": asdict(opts),
        "model_param_bytes": param_bytes(opts.model),
        "budget_bytes": before[MEMBERS[0]]["budget_bytes"],
        "instances": {
            iid: {"before": before[iid], "grouped": grouped[iid], "after": after[iid]}
            for iid in MEMBERS
        },
        "group": {
            "members": group_info.get("members", []),
            "num_blocks": group_info.get("num_blocks", 0),
            "block_size": bs,
            "lent_bytes": group_info.get("lent_bytes", 0),
            "kv_tokens": int(group_info.get("num_blocks", 0)) * bs,
            "instances_kv_tokens_before": sum(before[i]["kv_tokens"] for i in MEMBERS),
        },
        "drop": {
            "drop_s": _stats([d["drop_s"] for d in drops]),
            "ttft_from_drop_s": _stats([d["ttft_from_drop_s"] for d in drops]),
            "first_token_before_group": sum(d["first_token_before_group"] for d in drops),
            # Only the probes that queued while the group formed (first token after it).
            "ttft_from_drop_queued_s": _stats(
                [d["ttft_from_drop_s"] for d in drops if not d["first_token_before_group"]]
            ),
            "rounds": [{k: v for k, v in d.items() if k != "group"} for d in drops],
        },
        "restore": {
            "restore_s": _stats([r["restore_s"] for r in restores]),
            "pause_s": _stats([r["pause_s"] for r in restores]),
            "by_how": {
                how: {
                    key: _stats([r[key] for r in restores if r.get("how") == how])
                    for key in (
                        "restore_s",
                        "pause_s",
                        "stall_max_s",
                        "tpot_before_ms",
                        "tpot_during_ms",
                        "max_gap_ms",
                    )
                }
                for how in ("live", "pause")
            },
            "moved": sum(r["moved"] for r in restores),
            "recomputed": sum(r["recomputed"] for r in restores),
            "moved_bytes": sum(r["moved_bytes"] for r in restores),
            "rounds": restores,
        },
        "single": {"solo": _side(solo), "group": _side(group)},
        "batch": {"size": opts.batch, "solo": _side(solo_batch), "group": _side(group_batch)},
        "events": [e.get("event") for e in events],
    }


def _ratio(a: float, b: float) -> str:
    return fmt(b / a, 2) if a and a == a and b == b else "-"


def _mib(n: float) -> str:
    return fmt(n / MIB, 1)


def _spread(s: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    if not s["n"]:
        return "-"
    m, lo, hi = (scale * s[k] for k in ("median", "min", "max"))
    return f"{m:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def table_rows(res: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    for iid, st in res["instances"].items():
        b, g, a = st["before"], st["grouped"], st["after"]
        p0, p1 = b["worker_param_bytes"], g["worker_param_bytes"]
        rows.append([f"{iid} params MiB", _mib(p0), _mib(p1), _ratio(p0, p1)])
        k0, k1 = b["kv_tokens"], g["kv_tokens"]
        rows.append(
            [f"{iid} KV tokens (blocks / sub-blocks)", f"{k0:,}", f"{k1:,}", _ratio(k0, k1)]
        )
        r0, r1, r2 = b["rss_bytes"], g["rss_bytes"], a["rss_bytes"]
        rows.append([f"{iid} private RSS MiB (grouped)", _mib(r0), _mib(r1), _ratio(r0, r1)])
        rows.append([f"{iid} private RSS MiB (after restore)", _mib(r0), _mib(r2), _ratio(r0, r2)])
    grp = res["group"]
    k0, k1 = grp["instances_kv_tokens_before"], grp["kv_tokens"]
    rows.append(["KV tokens: 2 instances vs group", f"{k0:,}", f"{k1:,}", _ratio(k0, k1)])
    rows.append(["lent to KV MiB", "-", _mib(grp["lent_bytes"]), "-"])
    d, r = res["drop"], res["restore"]
    rows.append(["drop command s, med (min-max)", "-", _spread(d["drop_s"], 1, 2), "-"])
    rows.append(["new request TTFT from drop s", "-", _spread(d["ttft_from_drop_s"], 1, 2), "-"])
    early = f"{d['first_token_before_group']} of {d['drop_s']['n']}"
    rows.append(["  of which first token before the group formed", "-", early, "-"])
    queued = _spread(d["ttft_from_drop_queued_s"], 1, 2)
    rows.append(["  TTFT from drop of those that queued s", "-", queued, "-"])
    for how, st in r.get("by_how", {}).items():
        if not st["restore_s"]["n"]:
            continue
        rows.append([f"restore ({how}) command s", "-", _spread(st["restore_s"], 1, 3), "-"])
        rows.append([f"restore ({how}) pause (leader) s", "-", _spread(st["pause_s"], 1, 3), "-"])
        if how == "live":
            wait = _spread(st["stall_max_s"], 1e3, 1)
            rows.append(["restore (live) longest batch wait ms", "-", wait, "-"])
        t0, t1 = st["tpot_before_ms"]["median"], st["tpot_during_ms"]["median"]
        rows.append(
            [
                f"restore ({how}) TPOT before -> during ms",
                fmt(t0, 1),
                fmt(t1, 1),
                _ratio(t0, t1),
            ]
        )
        gap = _spread(st["max_gap_ms"], 1, 1)
        rows.append([f"restore ({how}) largest token gap ms", "-", gap, "-"])
    rows.append(
        [
            "restore: moved / recomputed, MiB",
            "-",
            f"{r['moved']} / {r['recomputed']}, {_mib(r['moved_bytes'])}",
            "-",
        ]
    )
    for case in ("single", "batch"):
        side = res[case]
        if not side["solo"]["tpot_ms"]["n"]:
            continue
        label = "1 request" if case == "single" else f"batch of {res['batch']['size']}"
        for metric in ("tpot_ms", "ttft_ms"):
            s0, s1 = side["solo"][metric], side["group"][metric]
            rows.append(
                [
                    f"{metric[:4].upper()} ms, {label} (median)",
                    fmt(s0["median"], 1),
                    fmt(s1["median"], 1),
                    _ratio(s0["median"], s1["median"]),
                ]
            )
    return rows


HEADERS = ["metric", "before / solo", "after / group", "ratio"]
PHASES = ("rounds", "exchange", "auto")


def markdown(rows: list[list[str]], headers: list[str] = HEADERS) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from bench.elastic_auto import AutoOptions
    from bench.elastic_exchange import ExchangeOptions
    from common.cli_errors import fail

    opts = Options(
        model=args.model,
        kv_mib=args.kv_mib,
        rounds=args.rounds,
        requests=args.requests,
        batch=args.batch,
        across=args.across,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        run_dir=args.run_dir,
    )
    phases = PHASES if args.phases == "all" else tuple(args.phases.split(","))
    if not phases or not set(phases) <= set(PHASES):
        return fail(f"--phases: a comma-separated subset of {', '.join(PHASES)}, or all")
    if opts.rounds < 1 or opts.requests < 1 or opts.kv_mib < 1 or opts.batch < 0:
        return fail("--rounds, --requests and --kv-mib must be >= 1, --batch >= 0")
    xo = ExchangeOptions(
        rounds=args.x_rounds,
        running=args.x_running,
        prompt_tokens=args.x_prompt_tokens,
        max_tokens=args.x_max_tokens,
    )
    if xo.rounds < 1 or xo.running < 1 or xo.prompt_tokens < 1 or xo.max_tokens <= xo.warm_tokens:
        return fail(f"--x-rounds, --x-running must be >= 1, --x-max-tokens > {xo.warm_tokens}")
    ao = AutoOptions(
        model=args.auto_model,
        kv_mib=args.auto_kv_mib,
        burst=args.auto_burst,
        burst_tokens=args.auto_burst_tokens,
        trickle=args.auto_trickle,
    )
    if ao.burst < 2 or ao.trickle < 1 or ao.kv_mib <= 0:
        return fail("--auto-burst must be >= 2, --auto-trickle >= 1, --auto-kv-mib > 0")
    monitor = CpuMonitor().start()
    result: dict[str, Any] = {"phases": list(phases)}
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    if "rounds" in phases:
        print(
            f"bench elastic: {opts.model}, 2 colocated instances, budget = params + "
            f"{opts.kv_mib} MiB each, {opts.rounds} rounds"
        )
        result.update(asyncio.run(measure(opts)))
        tables.append(("drop / restore rounds", HEADERS, table_rows(result)))
        print(format_table(HEADERS, tables[-1][2]))
    if "exchange" in phases:
        tables += _exchange_phase(opts, xo, result)
    if "auto" in phases:
        tables += _auto_phase(opts, ao, result)
    result["cpu"] = monitor.stop()
    result["machine"] = machine_info()
    other = result["cpu"].get("other_cores")
    if other is not None and other > 0.5:
        print(f"warning: other processes used {other:.1f} cores meanwhile; timings are noisy")
    out = write_json(Path(args.out), result)
    md = out.with_suffix(".md")
    if phases == ("rounds",):
        md.write_text(markdown(tables[0][2]))  # as before: one table
    else:
        md.write_text("\n".join(f"## {t}\n\n{markdown(rows, h)}" for t, h, rows in tables))
    print(f"saved {out} and {md}")
    return 0


def _exchange_phase(
    opts: Options, xo: Any, result: dict[str, Any]
) -> list[tuple[str, list[str], list[list[str]]]]:
    from bench.elastic_exchange import EXCHANGE_HEADERS, exchange_rows, measure_exchange

    print(
        f"bench elastic exchange: {opts.model}, params + {opts.kv_mib} MiB each, "
        f"{xo.running} requests running ({xo.prompt_tokens} prompt, {xo.max_tokens} tokens), "
        f"{xo.rounds} drops per case"
    )
    result["exchange"] = asyncio.run(measure_exchange(opts, xo))
    rows = exchange_rows(result["exchange"])
    print(format_table(EXCHANGE_HEADERS, rows))
    return [("exchange vs recompute at the drop", EXCHANGE_HEADERS, rows)]


def _auto_phase(
    opts: Options, ao: Any, result: dict[str, Any]
) -> list[tuple[str, list[str], list[list[str]]]]:
    from bench.elastic_auto import (
        AUTO_HEADERS,
        TIMELINE_HEADERS,
        auto_rows,
        measure_auto,
        timeline_rows,
    )

    print(
        f"bench elastic auto: {ao.model}, params + {ao.kv_mib} MiB each, elastic_auto on, "
        f"burst of {ao.burst} x {ao.burst_tokens} tokens, then {ao.trickle} at a time"
    )
    run_dir = f"{opts.run_dir}/auto" if opts.run_dir else ""
    result["auto"] = asyncio.run(measure_auto(ao, run_dir))
    rows, timeline = auto_rows(result["auto"]), timeline_rows(result["auto"])
    print(format_table(AUTO_HEADERS, rows))
    print(format_table(TIMELINE_HEADERS, timeline))
    return [
        ("automatic drop and restore", AUTO_HEADERS, rows),
        ("the controller's timeline (t from the burst)", TIMELINE_HEADERS, timeline),
    ]
