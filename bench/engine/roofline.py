"""What this machine's fp32 matmuls allow, to put an engine's tokens/s in perspective.

FLOPs per token of a Llama-style model (config.json)::

    matmul    = 2 x (layers x (q + k + v + o + gate + up + down params) + hidden x vocab)
    attention = 4 x layers x heads x head_dim x context     (QK^T and AV over `context`)

The roofline at batch M is measured, not quoted: torch's `F.linear` on the model's own
weight shapes with M rows, at the benchmark's thread count, best of `repeats` — the time
one forward's matmuls alone would take for M tokens. An engine's achieved GFLOP/s (tokens/s
x FLOPs per token) over that roofline says how much of the machine's matmul throughput at
that batch it turns into tokens; everything else (attention, norms, sampling, Python,
scheduling) is in the gap.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelShape:
        cfg = json.loads((Path(folder) / "config.json").read_text())
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            layers=int(cfg["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(cfg["intermediate_size"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=int(cfg["vocab_size"]),
        )

    def linears(self) -> list[tuple[int, int, int]]:
        """(out_features, in_features, how many per forward) of every matmul."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return [
            (q, h, self.layers),
            (kv, h, 2 * self.layers),
            (h, q, self.layers),
            (i, h, 2 * self.layers),
            (h, i, self.layers),
            (self.vocab, h, 1),  # lm_head (counted even when tied to the embedding)
        ]

    def matmul_flops_per_token(self) -> float:
        return 2.0 * sum(o * k * c for o, k, c in self.linears())

    def attention_flops_per_token(self, context: float) -> float:
        return 4.0 * self.layers * self.heads * self.head_dim * context


def measure_gemm(
    shape: ModelShape, m: int, repeats: int = 3, min_s: float = 0.05
) -> dict[str, Any]:
    """Matmul GFLOP/s of one forward's linears at M rows: best of `repeats`, each repeat
    looping for at least `min_s` so small shapes are not lost in timer noise."""
    gen = torch.Generator().manual_seed(0)
    ops = [
        (torch.randn(m, k, generator=gen), torch.randn(o, k, generator=gen), c)
        for o, k, c in shape.linears()
    ]
    flops = 2.0 * m * sum(o * k * c for o, k, c in shape.linears())

    def forward() -> None:
        for x, w, c in ops:
            for _ in range(c):
                F.linear(x, w)

    with torch.inference_mode():
        forward()  # first call: allocations, kernel choice
        best = float("inf")
        for _ in range(repeats):
            n = 0
            t0 = time.perf_counter()
            while True:
                forward()
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_s:
                    break
            best = min(best, elapsed / n)
    return {"m": m, "forward_s": best, "gflops": flops / best / 1e9}


def achieved(
    shape: ModelShape, tok_s: float, context: float, roof_gflops: float
) -> dict[str, float]:
    """An engine's tokens/s as GFLOP/s (matmul + attention at `context`) and the fraction
    of the measured matmul roofline."""
    per_token = shape.matmul_flops_per_token() + shape.attention_flops_per_token(context)
    gflops = tok_s * per_token / 1e9
    return {
        "gflops": gflops,
        "roofline_fraction": gflops / roof_gflops if roof_gflops > 0 else float("nan"),
    }
