"""The flags a client command uses to reach a gateway that speaks CURVE (any gateway off
loopback, by default): the gateway's published public key, and this client's key file
when the gateway admits listed clients only (docs/deploy.md, "Keys and who faces whom")."""

from __future__ import annotations

import argparse
import os
from typing import Any

from common import security


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server-key",
        default=os.environ.get("MEMSERVE_GATEWAY_SERVER_KEY") or None,
        help="the gateway's CURVE public key (Z85; or MEMSERVE_GATEWAY_SERVER_KEY); "
        "omit for a plain loopback gateway",
    )
    p.add_argument(
        "--client-key-file",
        default=os.environ.get("MEMSERVE_GATEWAY_CLIENT_KEY_FILE") or None,
        help="this client's key file (`memserve keys --client`), for a gateway that "
        "admits listed clients only",
    )


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`GatewayClient` keyword arguments; SecurityError for an unreadable key file."""
    client_key = security.read_key_file(args.client_key_file) if args.client_key_file else None
    return {"server_key": args.server_key, "client_key": client_key}
