"""`memserve chat --gateway ADDR`: a multi-turn conversation on stdin, one line per turn.

The gateway keeps the conversation (a session): every turn's prompt starts with the whole
history, which the cluster's caches serve (`--show-stats` shows how much). `/quit` or the
end of input ends the chat. A turn the gateway refuses (too long, say) is reported and the
chat goes on; a gateway that stops answering ends it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from common.cli_errors import fail
from common.errors import InvalidRequestError, MemServeError
from services.cli import gateway_keys
from services.cli.generate import add_sampling_args, sampling


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="multi-turn chat with a running cluster")
    p.add_argument(
        "--gateway",
        default=os.environ.get("MEMSERVE_GATEWAY_ADDRESS", "tcp://127.0.0.1:5800"),
        help="the gateway's client address (default: env MEMSERVE_GATEWAY_ADDRESS)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="gateway silence limit (s)")
    gateway_keys.add_arguments(p)
    p.add_argument("--show-stats", action="store_true", help="cached tokens and TTFT per turn")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        sampling(args).validate()
    except InvalidRequestError as exc:
        return fail(str(exc))
    return asyncio.run(_chat(args))


async def _chat(args: argparse.Namespace) -> int:
    from common.client import GatewayClient, GatewayError

    params = sampling(args)
    client = GatewayClient(args.gateway, timeout_s=args.timeout, **gateway_keys.client_kwargs(args))
    try:
        session = await client.open_session()
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line or line.strip() == "/quit":
                break
            if not line.strip():
                continue
            try:
                async for text in client.generate(line.rstrip("\n"), params, session):
                    sys.stdout.write(text)
                    sys.stdout.flush()
            except GatewayError as exc:  # this turn failed; the history is as it was
                sys.stdout.write("\n")
                sys.stderr.write(f"error: {exc}\n")
                continue
            sys.stdout.write("\n")
            f = client.last_final
            if args.show_stats and f is not None:
                sys.stdout.write(
                    f"[prompt {f.num_prompt_tokens} tokens, cached {f.num_cached_tokens}, "
                    f"ttft {1e3 * f.ttft_s:.1f} ms, total {1e3 * f.total_s:.1f} ms]\n"
                )
            sys.stdout.flush()
        await client.close_session(session)
        return 0
    except (MemServeError, TimeoutError) as exc:  # no session, or a silent gateway
        return fail(str(exc))
    finally:
        client.close()
