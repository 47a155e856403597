"""Run as a subprocess by test_model_drop: load a preset, drop it to a follower stage,
restore it, drop it again, and print the resident set size at each point as JSON.

A process of its own, so the RSS it reads belongs to this model alone (the test process
holds other models and pytest's own allocations).

    python -m tests.worker.rss_drop_probe PRESET FIRST LAST
"""

from __future__ import annotations

import json
import os
import sys

import torch

from common.model.presets import resolve_model
from services.worker.model.loader import load_model

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def main() -> None:
    preset, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    folder = resolve_model(preset)
    model, _ = load_model(folder)
    fresh = {name: p.clone() for name, p in model.named_parameters()}
    out: dict[str, object] = {"params": model.param_bytes(), "loaded": rss()}
    # Twice: the second drop frees tensors the restore allocated after loading had raised
    # glibc's mmap threshold, i.e. heap chunks that free() alone does not give back.
    pins: list[torch.Tensor] = []
    for k in range(2):
        out[f"freed{k}"] = model.drop_layers(range(first, last), keep_embed=False, keep_head=False)
        out[f"dropped{k}"] = rss()
        out[f"reloaded{k}"] = model.restore_layers(folder)
        out[f"restored{k}"] = rss()
        # A serving worker keeps allocating after a restore; live small tensors above the
        # restored ones keep the heap from shrinking by its top alone.
        pins.extend(torch.ones(4096) for _ in range(64))
    now = dict(model.named_parameters())
    out["equal"] = now.keys() == fresh.keys() and all(torch.equal(now[n], fresh[n]) for n in fresh)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
