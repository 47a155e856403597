"""The papers' headline figures (../shared/design/memserve.md), as fractions lower, and
which of our runs each one is compared with; KunServe's as P99 TTFT ratios (x times lower).

MemServe (Llama2-13B, TP=2, 8x H800, vs vLLM 0.4.0): context caching on top of
disaggregation, per workload; disaggregation vs colocation on ShareGPT; prompt-tree
(locality) routing vs session-id routing on LooGLE.
"""

from __future__ import annotations

from typing import Any

# workload -> metric -> fraction lower with caching (PD-Caching-3 vs PD-Basic)
CACHING = {
    "chat": {"ttft_mean": 0.58, "ttft_p99": 0.45, "jct_mean": 0.17, "jct_p99": 0.29},
    "docs": {"ttft_mean": 0.562, "ttft_p99": 0.452, "jct_mean": 0.269, "jct_p99": 0.225},
    "agent": {"ttft_mean": 0.785, "ttft_p99": 0.849, "jct_mean": 0.267, "jct_p99": 0.214},
}
CACHING["sharegpt"] = CACHING["chat"]
DISAGGREGATION = {"jct_mean": 0.30, "jct_p99": 0.42}  # ShareGPT, PD vs colocated
ROUTING = {"ttft_p99": 0.59}  # LooGLE: prompt trees vs session ids

# KunServe (arXiv 2412.18169, §6): P99 TTFT of a baseline over KunServe's (x times lower
# with KunServe), as (low, high) over its workloads; one range for vLLM, InferCept and
# Llumnix together, and restore against none. (name, base mode, new mode, paper range or
# None: no figure in the paper.)
KUNSERVE_RATIOS: list[tuple[str, str, str, tuple[float, float] | None]] = [
    ("KunServe vs vLLM (recompute)", "dp-recompute", "kunserve", (12.7, 72.2)),
    ("KunServe vs InferCept (swap)", "dp-swap", "kunserve", (12.7, 72.2)),
    ("KunServe vs Llumnix (migrate)", "dp-migrate", "kunserve", (12.7, 72.2)),
    ("restore vs none", "kunserve-norestore", "kunserve", (6.4, 6.4)),
    ("live exchange vs recompute", "kunserve-recompute", "kunserve", None),
]


def comparison_specs(workload: str, labels: list[str]) -> list[dict[str, Any]]:
    """(name, base, new, paper) for every pair of runs present that a claim is about."""
    specs: list[dict[str, Any]] = []
    caching = CACHING.get(workload, {})

    def add(name: str, base: str, new: str, paper: dict[str, float]) -> None:
        if base in labels and new in labels:
            specs.append({"name": name, "base": base, "new": new, "paper": paper})

    add("caching (PD)", "pd-basic", "pd-caching-3", caching)
    add("caching (PD, no decode-phase KV back)", "pd-basic", "pd-caching-2", {})
    add("caching (colocated)", "colocated-nocache", "colocated", caching)
    disagg = DISAGGREGATION if workload in ("chat", "sharegpt") else {}
    add("disaggregation (no caching)", "colocated-nocache", "pd-basic", disagg)
    add("disaggregation (caching)", "colocated", "pd-caching-3", {})
    for name, base, new, _ in KUNSERVE_RATIOS:
        add(name, base, new, {})
    # Routing: labels "MODE/POLICY"; locality against every other policy of the same mode.
    for label in labels:
        mode, _, policy = label.partition("/")
        if policy and policy != "locality":
            paper = ROUTING if policy == "session" and workload == "docs" else {}
            add(f"routing: locality vs {policy}", label, f"{mode}/locality", paper)
    return specs
