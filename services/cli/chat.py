"""`memserve chat --gateway ADDR`: a multi-turn conversation on stdin, one line per turn.

The gateway keeps the conversation (a session): every turn's prompt starts with the whole
history, which the cluster's caches serve. `/quit` or end of input ends the chat."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from services.cli.errors import fail


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="multi-turn chat with a running cluster")
    p.add_argument("--gateway", default=os.environ.get("MEMSERVE_GATEWAY", "tcp://127.0.0.1:5800"))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--show-stats", action="store_true", help="cached tokens and TTFT per turn")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_chat(args))


async def _chat(args: argparse.Namespace) -> int:
    from common.client import GatewayClient, GatewayError
    from common.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    client = GatewayClient(args.gateway, timeout_s=args.timeout)
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
            async for text in client.generate(line.rstrip("\n"), params, session_id=session):
                sys.stdout.write(text)
                sys.stdout.flush()
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
    except (GatewayError, TimeoutError) as exc:
        return fail(str(exc))
    finally:
        client.close()
