"""`memserve` command line: one sub-command per service or tool."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from common.logging import setup_logging
from services.cli import service


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memserve", description=__doc__)
    from services.cli import admin, chat, demo, generate, keys, model_info, up

    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    model_info.add_parser(sub)
    service.add_parsers(sub)
    admin.add_parser(sub)
    keys.add_parser(sub)
    up.add_parser(sub)
    chat.add_parser(sub)
    demo.add_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks that print and save figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from bench import elastic as bench_elastic
    from bench import engine as bench_engine
    from bench import fuzz as bench_fuzz
    from bench import handoff as bench_handoff
    from bench import http as bench_http
    from bench import kernels as bench_kernels
    from bench import mempool as bench_mempool
    from bench import security as bench_security
    from bench import serve as bench_serve

    bench_engine.add_parser(bench_sub)
    bench_mempool.add_parser(bench_sub)
    bench_serve.add_parser(bench_sub)
    bench_handoff.add_parser(bench_sub)
    bench_fuzz.add_parser(bench_sub)
    bench_security.add_parser(bench_sub)
    bench_elastic.add_parser(bench_sub)
    bench_http.add_parser(bench_sub)
    bench_kernels.add_parser(bench_sub)
    return parser


def service_parser() -> argparse.ArgumentParser:
    """Only the service sub-commands: what `memserve up` starts (every process of a
    cluster) parses without importing the tools' modules (torch among them: ~2 s of a
    gateway's, scheduler's or api's start)."""
    parser = argparse.ArgumentParser(prog="memserve", description=__doc__)
    service.add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = service_parser() if argv[:1] and argv[0] in service.SERVICES else build_parser()
    args = parser.parse_args(argv)
    # Readable logs for people at a terminal; services switch to JSON when they start.
    setup_logging("cli", json=False, level=os.environ.get("MEMSERVE_LOG_LEVEL", "warning"))
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
