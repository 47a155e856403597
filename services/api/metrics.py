"""The API process's Prometheus metrics (common/metrics.py's instruments, in a registry of
its own like every process's), and the ASGI middleware that counts requests.

`route` is the matched route's path (`/v1/chat/completions`), or "other" for a path no
route serves, so a client cannot grow the label set. A streamed response is timed until
its last event went out. Served on the API's own port (`/metrics`), always in the text
format, so the names keep their colons.
"""

from __future__ import annotations

import time

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.metrics import Metrics

CONTENT_TYPE = CONTENT_TYPE_LATEST

# From a one-token request on loopback (a few ms) to a long generation.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ApiMetrics(Metrics):
    def __init__(self, routes: set[str]) -> None:
        super().__init__()
        self.routes = routes
        self.requests = self.counter(
            "memserve:http_requests",
            "HTTP requests served, by route and status code",
            ["route", "status"],
        )
        self.duration = self.histogram(
            "memserve:http_request_duration_seconds",
            "Time from a request's arrival to its response's last byte",
            BUCKETS,
            ["route"],
        )
        self.inflight = self.gauge("memserve:http_requests_inflight", "HTTP requests being served")
        self._inflight = 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def route_of(self, path: str) -> str:
        return path if path in self.routes else "other"

    def enter(self) -> None:
        self._inflight += 1
        self.inflight.set(self._inflight)

    def leave(self, route: str, status: int, seconds: float) -> None:
        self._inflight -= 1
        self.inflight.set(self._inflight)
        self.requests.inc(route=route, status=str(status))
        self.duration.observe(seconds, route=route)


class MetricsMiddleware:
    """Counts and times every HTTP request (status 500 when the app failed before
    answering)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.metrics.route_of(scope.get("path", ""))
        status = 500
        start = time.perf_counter()

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.enter()
        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.leave(route, status, time.perf_counter() - start)
