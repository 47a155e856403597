"""`memserve mempool --config FILE [--ready ADDR]`: run a MemPool daemon."""

from __future__ import annotations

import argparse
from typing import Any

from common.config import ConfigError
from services.cli.errors import fail


def add_parser(sub: Any) -> None:
    p = sub.add_parser("mempool", help="run a MemPool daemon (KV memory, prompt tree, transfers)")
    p.add_argument("--config", default=None, help="TOML file with a [mempool] table")
    p.add_argument(
        "--ready", default=None, help="launcher's readiness address (set by `memserve up`)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.mempool.__main__ import main

    try:
        main(args.config, args.ready)
    except (ConfigError, ValueError, OSError) as exc:
        return fail(str(exc))
    return 0
