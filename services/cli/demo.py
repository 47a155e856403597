"""`memserve demo`: the main job on a real model (`smollm2`, installed by `make install`),
end to end, through the OpenAI-compatible HTTP API with the `openai` client.

Starts a local prefill/decode cluster (PD-Caching-3) with the launcher of `memserve up`,
streams the answer to a question, then holds one multi-turn conversation (a document in
the system message, a few questions about it), greedy, and does the same conversation on
a cluster without caching (PD-Basic): it prints, per turn and in total, the prompt, the
tokens the cluster served from its caches (`usage.prompt_tokens_details.cached_tokens`)
and the time to the first token, side by side. Every cluster is stopped before the
command returns. A model without a chat template (`--model tiny`) gets a plain ChatML one.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

from common.cli_errors import fail
from common.ready import StartupError

QUESTION = "What is the capital of France? Answer in one sentence."
DOCUMENT = (
    "MemServe is a system for serving large language models. It keeps the key-value "
    "cache of every conversation in an elastic memory pool that spans all serving "
    "instances, so when a user sends the next turn of a chat, the work already done for "
    "the earlier turns is reused instead of computed again. Requests are split into two "
    "phases: a prefill instance reads the whole prompt, then a decode instance writes the "
    "answer one token at a time. A global scheduler keeps a prompt tree per instance and "
    "sends each request to the instance that already holds the longest part of its "
    "prompt. Under a burst of load, the system can also free memory by dropping copies of "
    "the model's parameters and serving with groups of instances that share one copy."
)
TURNS = (
    "In one sentence, what does MemServe keep between turns of a chat?",
    "What are the two phases a request is split into?",
    "How does the scheduler choose an instance?",
)
# For models without a template of their own (the embedded presets).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="start a P/D cluster, chat over HTTP, caching on vs off")
    p.add_argument("--model", default="smollm2", help="default: smollm2 (make install)")
    p.add_argument("--max-tokens", type=int, default=48, help="per answer")
    p.add_argument("--kv-mib", type=int, default=64, help="KV memory per instance")
    p.set_defaults(func=run)


@dataclass
class Turn:
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    answer: str


def run(args: argparse.Namespace) -> int:
    from common.chat_template import ChatTemplate
    from common.model.config import ModelError
    from common.model.presets import resolve_model

    try:
        own = ChatTemplate.from_folder(resolve_model(args.model))
    except (ModelError, ValueError) as exc:
        return fail(str(exc))
    try:
        return asyncio.run(_demo(args, None if own else CHATML))
    except StartupError as exc:
        return fail(str(exc))


async def _demo(args: argparse.Namespace, template: str | None) -> int:
    from bench.experiment import Shape
    from services.launcher.config import load
    from services.launcher.supervisor import Cluster

    figures: dict[str, list[Turn]] = {}
    for mode in ("pd-caching-3", "pd-basic"):
        extra: dict[str, Any] = {"api": {"enabled": True}}
        if template:
            extra["api"]["chat_template"] = template
        settings = load(
            None,
            Shape(mode).overrides(args.model, args.kv_mib, f".memserve/demo/{mode}", extra=extra),
        )
        print(f"== starting a local {mode} cluster (1 prefill + 1 decode worker) ...", flush=True)
        async with Cluster(settings) as cluster:
            if not cluster.http:
                return fail("the cluster runs no HTTP API ([api] enabled = false)")
            print(f"   OpenAI API {cluster.http}/v1, logs in {cluster.run_dir}/", flush=True)
            client = _client(cluster.http)
            try:
                if mode == "pd-caching-3":
                    print(f"== {QUESTION}", flush=True)
                    await _chat(client, args, [{"role": "user", "content": QUESTION}], echo=True)
                print(f"== a {len(TURNS)}-turn conversation about a document", flush=True)
                figures[mode] = await _conversation(client, args, echo=mode == "pd-caching-3")
            finally:
                await client.close()
    _table(figures["pd-caching-3"], figures["pd-basic"])
    return 0


def _client(http: str) -> Any:
    import openai

    # On loopback the API takes any key (a non-loopback one needs the configured key).
    return openai.AsyncOpenAI(base_url=f"{http}/v1", api_key="local", max_retries=0)


async def _chat(
    client: Any, args: argparse.Namespace, messages: list[dict[str, str]], *, echo: bool
) -> Turn:
    """One greedy chat turn, streamed: its answer, TTFT as the client sees it, usage."""
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    usage = None
    stream = await client.chat.completions.create(
        model=args.model,
        messages=messages,
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text = choice.delta.content or ""
            if text and first is None:
                first = time.perf_counter()
            parts.append(text)
            if echo:
                print(text, end="", flush=True)
    if echo:
        print(flush=True)
    assert usage is not None  # include_usage: the last chunk carries it
    details = usage.prompt_tokens_details
    return Turn(
        usage.prompt_tokens,
        (details.cached_tokens or 0) if details else 0,
        (first or time.perf_counter()) - start,
        "".join(parts),
    )


async def _conversation(client: Any, args: argparse.Namespace, *, echo: bool) -> list[Turn]:
    messages = [{"role": "system", "content": f"Answer from this document. {DOCUMENT}"}]
    turns = []
    for question in TURNS:
        messages.append({"role": "user", "content": question})
        if echo:
            print(f"> {question}\n", end="", flush=True)
        turn = await _chat(client, args, messages, echo=echo)
        messages.append({"role": "assistant", "content": turn.answer})
        turns.append(turn)
    return turns


def _table(on: list[Turn], off: list[Turn]) -> None:
    print()
    print(f"{'':24}{'caching on (pd-caching-3)':>30}{'caching off (pd-basic)':>30}")
    for i, (a, b) in enumerate(zip(on, off, strict=True), 1):
        cell_a = f"{a.cached_tokens}/{a.prompt_tokens} cached, {1e3 * a.ttft_s:.0f} ms"
        cell_b = f"{b.cached_tokens}/{b.prompt_tokens} cached, {1e3 * b.ttft_s:.0f} ms"
        print(f"{f'turn {i}: prompt, TTFT':24}{cell_a:>30}{cell_b:>30}")

    def rate(ts: list[Turn]) -> float:
        return 100 * sum(t.cached_tokens for t in ts) / max(1, sum(t.prompt_tokens for t in ts))

    def mean_ttft(ts: list[Turn]) -> float:
        return 1e3 * sum(t.ttft_s for t in ts) / len(ts)

    print(f"{'cache hit rate':24}{rate(on):>29.1f}%{rate(off):>29.1f}%")
    print(f"{'TTFT mean (ms)':24}{mean_ttft(on):>30.0f}{mean_ttft(off):>30.0f}")
    later_on, later_off = on[1:], off[1:]
    print(f"{'TTFT turns 2+ (ms)':24}{mean_ttft(later_on):>30.0f}{mean_ttft(later_off):>30.0f}")
