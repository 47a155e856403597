"""A worker's Prometheus metrics (common/metrics.py), named as vLLM's where they mean the
same; every sample carries the worker's `instance_id`, `role` and `model_name`.

Gauges and the preemption total are refreshed from the worker's own status every
REFRESH_S (`refresh`); the prefix-cache counters are updated inline, once per request
admitted (`prefix`), in tokens as vLLM counts them: a query is the prompt's tokens, a hit
the prompt tokens whose KV was found cached (at the daemon, or arrived by a fetch).
"""

from __future__ import annotations

from common.metrics import Metrics
from services.worker.pipeline.exchanger import ExchangeStats


class WorkerMetrics(Metrics):
    def __init__(self, instance_id: str, role: str, model_name: str) -> None:
        super().__init__({"instance_id": instance_id, "role": role, "model_name": model_name})
        self.running = self.gauge(
            "memserve:num_requests_running", "Requests in the engine's running batch."
        )
        self.waiting = self.gauge(
            "memserve:num_requests_waiting", "Requests waiting to run (queued or swapped out)."
        )
        self.kv_usage = self.gauge(
            "memserve:kv_cache_usage_perc",
            "Fraction of the instance's device KV blocks in use at its MemPool daemon "
            "(0 to 1; cached prefixes count as used).",
        )
        self.queries = self.counter(
            "memserve:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."
        )
        self.hits = self.counter(
            "memserve:prefix_cache_hits_total", "Prompt tokens found in the prefix cache."
        )
        self.preemptions = self.followed(
            "memserve:num_preemptions_total", "Requests preempted (recompute or swap-out)."
        )
        self.healthy = self.gauge(
            "memserve:worker_healthy", "1 while the worker is attached to a live daemon."
        )
        self.exchanged = self.followed(
            "memserve:kunserve_exchanged_requests_total",
            "KunServe: requests whose KV this member exchanged live at a drop.",
        )
        self.exchanged_bytes = self.followed(
            "memserve:kunserve_exchanged_bytes_total",
            "KunServe: KV bytes this member exchanged live at a drop.",
        )
        self.grouped = self.gauge(
            "memserve:kunserve_member",
            "1 while this worker is in a KunServe pipeline group, by its part in it.",
            ["state"],
        )

    def prefix(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.queries.inc(prompt_tokens)
        self.hits.inc(min(cached_tokens, prompt_tokens))

    def refresh(
        self,
        load: tuple[int, int, int, int],
        device_blocks: tuple[int, int],
        preemptions: tuple[int, str],
        healthy: bool,
        elastic_state: str,
        exchange: ExchangeStats | None,
    ) -> None:
        """`preemptions`: the engine's total and its engine's generation (a re-attached
        engine counts from 0); `exchange`: the current exchange's figures, if any."""
        waiting, running, _, _ = load
        self.waiting.set(waiting)
        self.running.set(running)
        used, total = device_blocks
        self.kv_usage.set(used / total if total else 0.0)
        self.preemptions.follow(preemptions[0], preemptions[1])
        if exchange is not None:
            self.exchanged.follow(exchange.exchanged, exchange.started_at)
            self.exchanged_bytes.follow(exchange.nbytes, exchange.started_at)
        self.healthy.set(1.0 if healthy else 0.0)
        grouped = elastic_state in ("leader", "follower")
        self.grouped.replace([({"state": elastic_state}, 1.0)] if grouped else [])
