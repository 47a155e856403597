"""`memserve keys FILE [--gateway | --client]`: make a key file (mode 0600, never
overwriting one) and print its public key. The secret never reaches the terminal.

* default: the cluster key. Every member process (scheduler, gateway, workers, MemPool
  daemons, and `memserve admin`) reads it from `[cluster] key_file` or
  MEMSERVE_CLUSTER__KEY_FILE; copy it to each host over a channel you trust.
* --gateway: the gateway's own pair for its client socket (`gateway.client_key_file`);
  publish the printed public key to clients (`memserve generate --server-key KEY`).
* --client: a client's pair, for a gateway that admits listed clients only
  (`gateway.allowed_client_keys`); the client passes `--client-key-file FILE`.
"""

from __future__ import annotations

import argparse
from typing import Any

from common import security
from common.cli_errors import fail


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "keys",
        help="make a cluster, gateway or client key file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="where to write the key (refused if it exists)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--gateway", action="store_true", help="a gateway client-socket pair")
    kind.add_argument("--client", action="store_true", help="a client pair")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        pair = security.write_key_file(args.file)
    except FileExistsError:
        return fail(f"{args.file} exists; keys are never overwritten (move it away first)")
    except OSError as exc:
        return fail(f"cannot write {args.file}: {exc.strerror or exc}")
    what = "gateway" if args.gateway else "client" if args.client else "cluster"
    print(f"wrote {what} key {args.file} (mode 600)")
    print(f"public key: {pair.public.decode()}")
    return 0
