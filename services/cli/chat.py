"""`memserve chat [--gateway ADDR]`: a multi-turn conversation on stdin, one line per turn.

Without `--gateway` (or MEMSERVE_GATEWAY_ADDRESS) it talks to the local cluster `memserve
up` started (services/cli/local_cluster.py). When the model has a chat template (the
cluster's model, or `--model`), each turn is the whole conversation rendered by it, as an
OpenAI client sends it, routed by a conversation key so the instance that cached the
earlier turns serves it; `--raw` (or a model without a template) sends the lines as plain
text in a gateway session instead, which prepends the history itself. Either way every
turn's prompt starts with the history, which the cluster's caches serve (`--show-stats`
shows how much). `/quit` or the end of input ends the chat. A turn the gateway refuses
(too long, say) is reported and the chat goes on; a gateway that stops answering ends it."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from typing import Any

from common.chat_template import ChatTemplate, ChatTemplateError
from common.cli_errors import fail
from common.errors import InvalidRequestError, MemServeError
from common.tokenizer import Tokenizer
from services.cli import gateway_keys, local_cluster
from services.cli.generate import add_sampling_args, sampling


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="multi-turn chat with a running cluster")
    p.add_argument(
        "--gateway",
        default=None,
        help="the gateway's client address (default: env MEMSERVE_GATEWAY_ADDRESS, else "
        "the local cluster's)",
    )
    p.add_argument("--cluster", default=None, help="run directory of a local `memserve up`")
    p.add_argument(
        "--model", default=None, help="whose chat template to use (default: the cluster's)"
    )
    p.add_argument("--system", default=None, help="a system message opening the chat")
    p.add_argument("--raw", action="store_true", help="plain text turns, no chat template")
    p.add_argument("--timeout", type=float, default=60.0, help="gateway silence limit (s)")
    gateway_keys.add_arguments(p)
    p.add_argument("--show-stats", action="store_true", help="cached tokens and TTFT per turn")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        sampling(args).validate()
        gateway, state = local_cluster.gateway_address(args.gateway, args.cluster)
        model = args.model or (state.model if state else None)
        template = None if args.raw or model is None else _template(model)
    except (InvalidRequestError, local_cluster.StateError, ValueError) as exc:
        return fail(str(exc))
    return asyncio.run(_chat(args, gateway, template))


def _template(model: str) -> tuple[ChatTemplate, Tokenizer] | None:
    """The model's chat template and tokenizer (None: it has no template)."""
    from common.model.presets import resolve_model

    folder = resolve_model(model)
    template = ChatTemplate.from_folder(folder)
    return (template, Tokenizer.from_folder(folder)) if template else None


async def _chat(
    args: argparse.Namespace, gateway: str, template: tuple[ChatTemplate, Tokenizer] | None
) -> int:
    from common.client import GatewayClient, GatewayError

    params = sampling(args)
    client = GatewayClient(gateway, timeout_s=args.timeout, **gateway_keys.client_kwargs(args))
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    key = f"chat-{secrets.token_hex(8)}"  # routes every turn of this chat alike
    try:
        session = "" if template else await client.open_session()
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
            line = line.rstrip("\n")
            prompt: str | list[int] = line
            if template:
                turn = [*messages, {"role": "user", "content": line}]
                try:
                    text = template[0].render(turn, add_generation_prompt=True)
                except ChatTemplateError as exc:
                    sys.stderr.write(f"error: {exc}\n")
                    continue
                # As the HTTP API does (and transformers): the template writes its own
                # special tokens, the tokenizer adds none, so both paths share a cache.
                prompt = template[1].encode(text, add_special_tokens=False)
            answer: list[str] = []
            try:
                async for text in client.generate(prompt, params, session, route_key=key):
                    answer.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
            except GatewayError as exc:  # this turn failed; the history is as it was
                sys.stdout.write("\n")
                sys.stderr.write(f"error: {exc}\n")
                continue
            if template:
                messages += [
                    {"role": "user", "content": line},
                    {"role": "assistant", "content": "".join(answer)},
                ]
            sys.stdout.write("\n")
            f = client.last_final
            if args.show_stats and f is not None:
                sys.stdout.write(
                    f"[prompt {f.num_prompt_tokens} tokens, cached {f.num_cached_tokens}, "
                    f"ttft {1e3 * f.ttft_s:.1f} ms, total {1e3 * f.total_s:.1f} ms]\n"
                )
            sys.stdout.flush()
        if session:
            await client.close_session(session)
        return 0
    except (MemServeError, TimeoutError) as exc:  # no session, or a silent gateway
        return fail(str(exc))
    finally:
        client.close()
