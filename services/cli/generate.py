"""`memserve generate "prompt"`: stream a completion, from a running cluster
(`--gateway ADDR`, env MEMSERVE_GATEWAY_ADDRESS, or `--gateway` alone for the local cluster
`memserve up` started) or from an in-process engine (`--model`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from common.cli_errors import fail
from common.errors import InvalidRequestError, MemServeError
from common.model.config import ModelError
from common.model.presets import resolve_model
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer, TokenizerError
from services.cli import gateway_keys, local_cluster
from services.worker.config import EngineConfig

LOCAL = "local"  # `--gateway` without an address: the local cluster's


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="stream a completion (from a gateway, or in-process)")
    p.add_argument("prompt")
    p.add_argument(
        "--gateway",
        nargs="?",
        const=LOCAL,
        default=os.environ.get("MEMSERVE_GATEWAY_ADDRESS", ""),
        help="a running cluster's gateway (tcp://host:port; `--gateway` alone: the local "
        "cluster `memserve up` started); without it, an in-process engine",
    )
    p.add_argument("--cluster", default=None, help="run directory of a local `memserve up`")
    p.add_argument("--timeout", type=float, default=60.0, help="gateway silence limit (s)")
    gateway_keys.add_arguments(p)
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        help="send the request again (at most this often) if the gateway dies before the "
        "first token; a dead gateway is noticed in about 3 s whatever --timeout says",
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="preset (tiny, small, smollm2), a .gguf file or a Hugging Face folder",
    )
    add_sampling_args(p)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags, shared by `generate` and `chat`."""
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def run(args: argparse.Namespace) -> int:
    params = sampling(args)
    if args.gateway:
        try:
            params.validate()
            if args.gateway == LOCAL:
                args.gateway = local_cluster.read(args.cluster).gateway
        except (InvalidRequestError, local_cluster.StateError) as exc:
            return fail(str(exc))
        return asyncio.run(_from_gateway(args, params))
    from services.worker.async_engine import AsyncEngine
    from services.worker.engine import Engine

    try:
        params.validate()
        config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device).validate()
        engine = Engine.from_config(config)
        tokenizer = Tokenizer.from_folder(resolve_model(args.model))
    except (InvalidRequestError, ModelError, TokenizerError, ValueError) as exc:
        return fail(str(exc))

    async def stream() -> int:
        aengine = AsyncEngine(engine, tokenizer)
        try:
            async for out in aengine.generate(args.prompt, params):
                if out.error:
                    return fail(out.error)
                sys.stdout.write(out.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        finally:
            await aengine.close()

    return asyncio.run(stream())


async def _from_gateway(args: argparse.Namespace, params: SamplingParams) -> int:
    from common.client import GatewayClient

    if args.retries < 0:
        return fail(f"--retries must be >= 0, got {args.retries}")
    client = GatewayClient(
        args.gateway,
        timeout_s=args.timeout,
        retries=args.retries,
        **gateway_keys.client_kwargs(args),
    )
    try:
        async for text in client.generate(args.prompt, params):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    except (MemServeError, TimeoutError) as exc:
        sys.stdout.write("\n")
        return fail(str(exc))
    finally:
        client.close()
