"""The API process's Prometheus metrics, in a registry of its own (never the global one:
tests start several apps in one process), and the ASGI middleware that counts requests.

`route` is the matched route's path (`/v1/chat/completions`), or "other" for a path no
route serves, so a client cannot grow the label set. A streamed response is timed until
its last event went out.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = CONTENT_TYPE_LATEST

# From a one-token request on loopback (a few ms) to a long generation.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ApiMetrics:
    def __init__(self, routes: set[str]) -> None:
        self.routes = routes
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "memserve:http_requests",
            "HTTP requests served, by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "memserve:http_request_duration_seconds",
            "Time from a request's arrival to its response's last byte",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "memserve:http_requests_inflight",
            "HTTP requests being served",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def route_of(self, path: str) -> str:
        return path if path in self.routes else "other"


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

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.duration.labels(route).observe(time.perf_counter() - start)
