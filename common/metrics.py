"""Prometheus metrics of one process: its own registry, served over HTTP on its own address.

    service (event loop) ──inc / observe (inline)──▶ Metrics ◀──collect── HTTP thread ◀── GET /metrics
                        ──set gauges (every REFRESH_S, from its status)──▘

Each service builds one `Metrics` (a prometheus_client `Collector` in a `CollectorRegistry`
of its own, never the global default registry: several services may share a process in
tests) and serves it with prometheus_client's WSGI app (`MetricsServer`), in a
thread, on the service's `metrics_address` ("127.0.0.1:0" by default: loopback, any port;
"" turns it off). The URL it bound is the service's `metrics` endpoint in its `Ready`.

Multiprocess: every process registers and serves its own metrics and Prometheus scrapes
each one (`memserve up` writes the scrape config); nothing is shared between processes.
The values live in this module's own instruments, not in prometheus_client's value
classes, so a PROMETHEUS_MULTIPROC_DIR in the environment changes nothing here.

Thread safety: the event loop writes, the HTTP thread reads; each instrument guards its
values with a lock, and a gauge refreshed from a status is replaced whole.

What is exported: counts, sizes and durations only. Label values come from small fixed
sets (a finish reason, a tier, a transport, a role, a policy, an instance id): never a
prompt, a token, or the id of a request or session. The endpoint is read-only and binds
loopback by default; binding it elsewhere exposes those counts (no secrets, no prompts)
to whoever can reach the port.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from common.logging import Throttled, get_logger

log = get_logger(__name__)

PREFIX = "memserve:"
# How often a service refreshes its gauges from its status (seconds).
REFRESH_S = 1.0

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards for both read alike.
TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
ITL_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
E2E_BUCKETS = (
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0),
    *(50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)
# Prompt lengths in tokens (the scheduler's hit length).
TOKEN_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

Labels = tuple[str, ...]


class _Instrument:
    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        if not name.startswith(PREFIX):
            raise ValueError(f"metric {name!r} must start with {PREFIX!r}")
        self.name, self.doc, self.labels = name, doc, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, str]) -> Labels:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {sorted(labels)}")
        return tuple(str(labels[k]) for k in self.labels)

    def family(self, const: Mapping[str, str]) -> Metric:
        raise NotImplementedError


class Counter(_Instrument):
    """A total that only grows (exported as `<name>_total`)."""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), doc, labels)
        # Unlabelled: the series exists at 0 from the start (a rate() needs its first point).
        self._values: dict[Labels, float] = {} if self.labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def family(self, const: Mapping[str, str]) -> Metric:
        fam = CounterMetricFamily(self.name, self.doc, labels=[*const, *self.labels])
        with self._lock:
            items = list(self._values.items())
        for key, value in items:
            fam.add_metric([*const.values(), *key], value)
        return fam


class FollowedCounter(Counter):
    """A counter that follows a running total kept elsewhere (a status field): each
    `follow(total)` adds what the total grew by. A total of a new `generation` (its owner
    was rebuilt: an engine re-attached, a new exchange began), or one that went down,
    counts from 0 again, so the exported counter never goes down."""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, doc, labels)
        self._last: dict[Labels, tuple[object, float]] = {}

    def follow(self, total: float, generation: object = None, **labels: str) -> None:
        key = self._key(labels)
        was, last = self._last.get(key, (generation, 0.0))
        self._last[key] = (generation, total)
        grown = total - last if was == generation and total >= last else total
        if grown > 0:
            self.inc(grown, **labels)


class Gauge(_Instrument):
    """A value that goes up and down, refreshed from a status (`set`, or `replace` for
    every label set at once: label sets that went away disappear)."""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, doc, labels)
        self._values: dict[Labels, float] = {}

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def replace(self, values: Iterable[tuple[Mapping[str, str], float]]) -> None:
        fresh = {self._key(labels): float(v) for labels, v in values}
        with self._lock:
            self._values = fresh

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def family(self, const: Mapping[str, str]) -> Metric:
        fam = GaugeMetricFamily(self.name, self.doc, labels=[*const, *self.labels])
        with self._lock:
            items = list(self._values.items())
        for key, value in items:
            fam.add_metric([*const.values(), *key], value)
        return fam


class Histogram(_Instrument):
    """Observations counted in fixed buckets (upper bounds, `le`), with their sum."""

    def __init__(
        self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> None:
        super().__init__(name, doc, labels)
        self.bounds = sorted(float(b) for b in buckets)
        self._counts: dict[Labels, list[int]] = {}  # per bucket, then the +Inf overflow
        self._sums: dict[Labels, float] = {}
        if not self.labels:  # the series exists, empty, from the start
            self._counts[()] = [0] * (len(self.bounds) + 1)
            self._sums[()] = 0.0

    def observe(self, value: float, **labels: str) -> None:
        if math.isnan(value):
            return
        key = self._key(labels)
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value
        with self._lock:
            counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = [0] * (len(self.bounds) + 1)
            counts[i] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        with self._lock:
            return sum(self._counts.get(self._key(labels), ()))

    def family(self, const: Mapping[str, str]) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=[*const, *self.labels])
        with self._lock:
            items = [(k, list(c), self._sums[k]) for k, c in self._counts.items()]
        for key, counts, total in items:
            cumulative, buckets = 0, []
            for bound, n in zip([*self.bounds, math.inf], counts, strict=True):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            fam.add_metric([*const.values(), *key], buckets, total)
        return fam


class Metrics(Collector):
    """One process's instruments, with labels every sample carries (`const`: e.g. a
    worker's role and model), in a `CollectorRegistry` of its own."""

    def __init__(self, const: Mapping[str, str] | None = None) -> None:
        self.const = dict(const or {})
        self.instruments: list[_Instrument] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, doc, labels))

    def followed(self, name: str, doc: str, labels: Sequence[str] = ()) -> FollowedCounter:
        return self._add(FollowedCounter(name, doc, labels))

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, doc, labels))

    def histogram(
        self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        return self._add(Histogram(name, doc, buckets, labels))

    def _add(self, inst: Any) -> Any:
        if any(i.name == inst.name for i in self.instruments):
            raise ValueError(f"metric {inst.name} registered twice")
        self.instruments.append(inst)
        return inst

    def collect(self) -> Iterator[Metric]:
        for inst in self.instruments:
            yield inst.family(self.const)


class MetricsServer:
    """prometheus_client's WSGI app for one registry (`make_wsgi_app`), served by a
    threading WSGI server in a daemon thread on `address` ("host:port"; port 0 = any).
    `url` is where it serves /metrics (a wildcard host is advertised as `advertise_host`,
    else loopback). `close()` stops it and frees the port.

    Always the text format (0.0.4): prometheus_client's OpenMetrics writer (0.26) turns
    the colons of sample names into underscores ("memserve_..."), and Prometheus asks for
    OpenMetrics first; the text format keeps the names as registered."""

    def __init__(self, registry: CollectorRegistry, address: str, advertise_host: str = "") -> None:
        host, port = split_address(address)
        app = make_wsgi_app(registry)

        def text_only(environ: dict[str, Any], start_response: Any) -> Any:
            environ.pop("HTTP_ACCEPT", None)
            return app(environ, start_response)

        server_class = _V6Server if ":" in host else _Server
        self._server = make_server(
            host, port, text_only, server_class=server_class, handler_class=_Quiet
        )
        # shutdown() waits for the serving loop's next look at its flag: every
        # `poll_interval` (0.5 s by default, half a second added to every service's stop).
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()
        bound = self._server.server_address[1]
        wildcard = ("", "0.0.0.0", "*", "::")
        if advertise_host in wildcard:
            advertise_host = ""
        shown = advertise_host or ("127.0.0.1" if host in wildcard else host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"  # an IPv6 literal
        self.url = f"http://{shown}:{bound}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds close() up


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape on stderr (the service logs JSON there)."""


def split_address(address: str) -> tuple[str, int]:
    """ "host:port" (or "[v6]:port") -> (host, port); ValueError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    v6 = host.startswith("[") and host.endswith("]")
    if (
        not sep
        or not port.isdigit()
        or not 0 <= int(port) <= 65535
        or "/" in host
        or (":" in host and not v6)
    ):
        raise ValueError(f"metrics_address must be host:port (no scheme), got {address!r}")
    return (host[1:-1] if v6 else host) or "0.0.0.0", int(port)


def serve(metrics: Metrics, address: str, advertise_host: str = "") -> MetricsServer | None:
    """Serve `metrics` on `address`; None when `address` is "" (metrics off)."""
    if not address:
        return None
    return MetricsServer(metrics.registry, address, advertise_host)


def check_address(key: str, address: str) -> None:
    """Raise ValueError when `address` (a config's `metrics_address`) is neither "" nor
    host:port."""
    if address:
        try:
            split_address(address)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None


async def refresh_every(refresh: Callable[[], None], interval_s: float = REFRESH_S) -> None:
    """Run `refresh` (a service's gauges from its status) on the event loop, now and then
    every `interval_s`, until cancelled. A refresh that fails (a status read while it
    changed in a worker's step thread) is logged, throttled, and tried again next time:
    metrics never end a service."""
    warn = Throttled(log, burst=1, interval_s=60.0)
    while True:
        try:
            refresh()
        except Exception as exc:
            warn.warning("refresh", "metrics refresh failed", error=repr(exc))
        await asyncio.sleep(interval_s)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))
