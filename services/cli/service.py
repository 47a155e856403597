"""`memserve <service> --config FILE [--ready ADDR]`: the sub-commands that run a service."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from common.cli_errors import fail
from common.config import ConfigError
from common.errors import MemServeError

SERVICES = {
    "mempool": (
        "services.mempool.__main__",
        "run a MemPool daemon (KV memory, prompt tree, transfers)",
        "[mempool]",
    ),
    "worker": (
        "services.worker.__main__",
        "run a worker (engine on its MemPool daemon's memory)",
        "[worker]",
    ),
    "scheduler": ("services.scheduler.__main__", "run the global scheduler", "[scheduler]"),
    "gateway": ("services.gateway.__main__", "run the gateway (client protocol)", "[gateway]"),
    "api": ("services.api.__main__", "run the OpenAI-compatible HTTP API", "[api]"),
}


def add_parsers(sub: Any) -> None:
    for name, (module, help_text, table) in SERVICES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help=f"TOML file with a {table} table")
        p.add_argument(
            "--ready", default=None, help="launcher's readiness address (set by `memserve up`)"
        )
        p.set_defaults(func=run, module=module)


def run(args: argparse.Namespace) -> int:
    main = importlib.import_module(args.module).main
    try:
        main(args.config, args.ready)
    except (ConfigError, MemServeError, ValueError, OSError) as exc:
        return fail(str(exc))
    return 0
