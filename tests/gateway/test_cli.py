"""`memserve gateway` as a process (readiness, control socket, shutdown) in front of a real
worker, and the command-line clients against it: `memserve generate --gateway` prints the
stream of the same tokens as the Python client, `memserve chat` keeps a conversation whose
second turn is served from the cache."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.client import GatewayClient
from common.model.presets import resolve_model
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer
from tests.daemons import Daemon, Launcher, Proc
from tests.gateway.harness import TOK, TOKEN, FakeScheduler, admin, idle_and_intact, reference

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time"


async def memserve(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def gateway(
    cluster: tuple[FakeScheduler, Daemon, Proc], launcher: Launcher
) -> AsyncIterator[tuple[Proc, Daemon]]:
    sched, daemon, _ = cluster
    gw = await launcher.start(
        "gateway",
        "gw0",
        {
            "scheduler": sched.rpc.address,
            "scheduler_events": sched.pub.address,
            "admin_token": TOKEN,
        },
    )
    assert set(gw.endpoints) == {"clients", "replies", "control", "metrics"}
    yield gw, daemon


async def test_generate_streams_from_the_gateway_process(gateway: tuple[Proc, Daemon]) -> None:
    gw, daemon = gateway
    address = gw.endpoints["clients"]
    client = GatewayClient(address, timeout_s=30)
    try:
        done = await client.complete(PROMPT, SamplingParams(max_tokens=10, ignore_eos=True))
    finally:
        client.close()
    assert done.token_ids == reference(TOK.encode(PROMPT), 10)

    rc, out, err = await memserve(
        "generate", "--gateway", address, PROMPT, "--max-tokens", "10", "--ignore-eos"
    )
    assert rc == 0, err
    assert out == done.text + "\n"
    # A bad value is refused before anything is sent; an unreachable gateway times out.
    rc, _, err = await memserve("generate", "--gateway", address, PROMPT, "--top-p", "0")
    assert rc != 0 and "top_p" in err
    rc, _, err = await memserve(
        "generate", "--gateway", "tcp://127.0.0.1:9", PROMPT, "--timeout", "0.5"
    )
    assert rc != 0 and "no message from the gateway" in err

    control = gw.endpoints["control"]
    assert not (await admin(control, "status", token="wrong")).ok
    st = await admin(control, "status")
    assert st.ok and st.result["service"] == "gateway" and st.result["instance_id"] == "gw0"
    assert (st.result["served"], st.result["inflight"]) == (2, 0)
    assert (await admin(control, "shutdown")).ok
    assert await asyncio.to_thread(gw.proc.wait, 20) == 0
    await idle_and_intact(daemon)


async def test_chat_keeps_a_conversation_served_from_the_cache(
    gateway: tuple[Proc, Daemon], tmp_path: Path
) -> None:
    """Plain lines in a gateway session; then (same gateway) a chat template."""
    gw, daemon = gateway
    too_long = "x" * 5000  # refused; the chat goes on with its history unchanged
    turns = f"Hello there, this is the first turn of our chat.\n\n{too_long}\nAnd the second one.\n/quit\n"
    rc, out, err = await memserve(
        "chat",
        "--show-stats",
        "--max-tokens",
        "6",
        stdin=turns,
        env={
            "MEMSERVE_GATEWAY_ADDRESS": gw.endpoints["clients"]
        },  # the address from the environment
    )
    assert rc == 0, err
    assert "prompt too long" in err
    stats = [
        (int(p), int(c))
        for p, c in re.findall(r"\[prompt (\d+) tokens, cached (\d+), ttft [\d.]+ ms", out)
    ]
    assert len(stats) == 2, out  # the empty line is no turn
    (p1, c1), (p2, c2) = stats
    first = len("Hello there, this is the first turn of our chat.") + 1  # + BOS
    assert (p1, c1) == (first, 0)
    # Turn 2 = turn 1's prompt and answer, then the new line; whole blocks come from cache.
    second = len("And the second one.")
    assert first + 1 + second <= p2 <= first + 6 + second  # 1 to 6 answer tokens; no refused turn
    assert c2 >= first // 16 * 16 > 0
    st = await admin(gw.endpoints["control"], "status")
    # The chat closed its session on /quit.
    assert (st.result["served"], st.result["sessions"]) == (2, 0)
    await idle_and_intact(daemon)
    await _chat_with_a_template(gw, daemon, tmp_path, served=2)


CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


async def _chat_with_a_template(gw: Proc, daemon: Daemon, tmp_path: Path, served: int) -> None:
    """With a template, each turn is the whole conversation rendered by it (no gateway
    session), routed alike, and its earlier turns come from the cache."""
    model = tmp_path / "tiny-chat"
    shutil.copytree(resolve_model("tiny"), model)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    first, second = "Hello there, first turn of a templated chat.", "And a second."
    rc, out, err = await memserve(
        *("chat", "--gateway", gw.endpoints["clients"], "--model", str(model)),
        *("--system", "Be brief.", "--show-stats", "--max-tokens", "6", "--ignore-eos"),
        stdin=f"{first}\n{second}\n",
    )
    assert rc == 0, err
    stats = [
        (int(p), int(c))
        for p, c in re.findall(r"\[prompt (\d+) tokens, cached (\d+), ttft [\d.]+ ms", out)
    ]
    assert len(stats) == 2, out
    (p1, c1), (p2, c2) = stats
    tok = Tokenizer.from_folder(model)
    rendered = f"<|system|>Be brief.</s><|user|>{first}</s><|assistant|>"
    # The template's text, its specials written by the template alone (as over HTTP).
    assert p1 == len(tok.encode(rendered, add_special_tokens=False))
    # Turn 2: turn 1, its answer (6 tokens), the new turn.
    turn = f"</s><|user|>{second}</s><|assistant|>"
    assert p1 + len(tok.encode(turn, add_special_tokens=False)) <= p2
    assert c1 == 0 and c2 >= p1 // 16 * 16 > 0
    st = await admin(gw.endpoints["control"], "status")
    # Two more served, and no session was opened.
    assert (st.result["served"], st.result["sessions"]) == (served + 2, 0)
    await idle_and_intact(daemon)
