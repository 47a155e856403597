"""`memserve worker --config FILE [--ready ADDR]`: run a worker on its MemPool daemon."""

from __future__ import annotations

import argparse
from typing import Any

from common.config import ConfigError
from common.errors import MemServeError
from services.cli.errors import fail


def add_parser(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a worker (engine on its MemPool daemon's memory)")
    p.add_argument("--config", default=None, help="TOML file with a [worker] table")
    p.add_argument(
        "--ready", default=None, help="launcher's readiness address (set by `memserve up`)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.worker.__main__ import main

    try:
        main(args.config, args.ready)
    except (ConfigError, MemServeError, ValueError, OSError) as exc:
        return fail(str(exc))
    return 0
