"""Helpers of the HTTP API tests: a `memserve up`-style cluster of real processes (the api
process included) on `tiny`, a ChatML template for it (the embedded presets have none),
the gateway's admin status, and the checks that every request let go of its blocks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from common.admin_client import admin_call
from services.launcher.config import load
from services.launcher.supervisor import Cluster

TOKEN = "test-token"
API_KEY = "sk-memserve-test"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cluster_settings(
    tmp_path: Path,
    cluster: dict[str, Any],
    api: dict[str, Any] | None = None,
    gateway: dict[str, Any] | None = None,
) -> Any:
    return load(
        None,
        {
            "cluster": {"run_dir": str(tmp_path / "run"), "admin_token": TOKEN, **cluster},
            "scheduler": {"heartbeat_timeout_s": 1.5},
            "gateway": {"request_timeout_s": 20, "alive_interval_s": 0.25, **(gateway or {})},
            "worker": {"heartbeat_interval_s": 0.25, "engine": {"num_threads": 1}},
            "mempool": {"device_blocks": 256, "tensor_memory_bytes": 1 << 20},
            "api": {"api_key": API_KEY, "chat_template": CHATML, **(api or {})},
        },
    )


async def gateway_status(c: Cluster) -> dict[str, Any]:
    reply = await admin_call(c.endpoints("gateway")["control"], TOKEN, "status")
    assert reply.ok, reply.error
    return dict(reply.result)


async def until_gateway_idle(c: Cluster, timeout_s: float = 20.0) -> dict[str, Any]:
    """The gateway's status once it holds no request (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while (status := await gateway_status(c))["inflight"]:
        assert time.monotonic() < deadline, f"requests still in flight: {status}"
        await asyncio.sleep(0.05)
    return status


async def until_ready(base: str, want: int = 200, timeout_s: float = 20.0) -> dict[str, Any]:
    """GET /ready until it answers `want` (bounded wait); its body."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while True:
            r = await http.get("/ready")
            if r.status_code == want:
                return dict(r.json())
            assert time.monotonic() < deadline, f"/ready stayed {r.status_code}: {r.text}"
            await asyncio.sleep(0.1)


def assert_error_shape(body: Any) -> dict[str, Any]:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return dict(err)
