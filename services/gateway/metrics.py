"""The gateway's Prometheus metrics (common/metrics.py): what clients were served, seen
where every request begins and ends. Names follow vLLM's where they mean the same.

Updated inline: `finished` once per request that ends (its `Final`), `refused` once per
refused request; `refresh` sets the in-flight gauge from the core every REFRESH_S.
"""

from __future__ import annotations

from common.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, Metrics
from common.protocol import client as cp

# A P/D hand-off gap: the prefill's first token -> the decode instance's next one.
HANDOFF_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


class GatewayMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.ttft = self.histogram(
            "memserve:time_to_first_token_seconds",
            "Gateway receipt to first token out, per request.",
            TTFT_BUCKETS,
        )
        self.itl = self.histogram(
            "memserve:inter_token_latency_seconds",
            "Mean time per output token after the first, one observation per request "
            "(Final.tpot_s).",
            ITL_BUCKETS,
        )
        self.e2e = self.histogram(
            "memserve:e2e_request_latency_seconds",
            "Gateway receipt to the request's end, per request that produced a token.",
            E2E_BUCKETS,
        )
        self.handoff = self.histogram(
            "memserve:pd_handoff_gap_seconds",
            "P/D: the prefill's first token to the decode instance's next token.",
            HANDOFF_BUCKETS,
        )
        self.success = self.counter(
            "memserve:request_success_total",
            "Requests ended, by finish reason (stop | length | abort | error).",
            ["finished_reason"],
        )
        self.prompt_tokens = self.counter(
            "memserve:prompt_tokens_total", "Prompt tokens of the requests ended."
        )
        self.cached_tokens = self.counter(
            "memserve:prompt_tokens_cached_total",
            "Prompt tokens found in the KV cache (not computed), of the requests ended.",
        )
        self.generation_tokens = self.counter(
            "memserve:generation_tokens_total", "Output tokens sent to clients."
        )
        self.refused_total = self.counter(
            "memserve:requests_refused_total",
            "Requests refused at admission (bounds, overload, bad input).",
        )
        self.inflight = self.gauge(
            "memserve:num_requests_inflight", "Requests admitted and not yet ended."
        )

    def finished(self, final: cp.Final, handoff_gap_s: float | None = None) -> None:
        """Count one request that ended with `final` (latencies only when a token came)."""
        reason = final.finish_reason if final.finish_reason in FINISH_REASONS else "error"
        self.success.inc(finished_reason=reason)
        self.prompt_tokens.inc(final.num_prompt_tokens)
        self.cached_tokens.inc(final.num_cached_tokens)
        self.generation_tokens.inc(final.num_output_tokens)
        if final.num_output_tokens:
            self.ttft.observe(final.ttft_s)
            self.e2e.observe(final.total_s)
        if final.num_output_tokens > 1:
            self.itl.observe(final.tpot_s)
        if handoff_gap_s is not None:
            self.handoff.observe(handoff_gap_s)

    def refused(self) -> None:
        self.refused_total.inc()

    def refresh(self, inflight: int) -> None:
        self.inflight.set(inflight)
