"""Our engine as a benchmark peer: the protocol of peer_vllm.py (JSON lines, same commands,
same measurement) over OursBench, so `memserve bench engine --peer ...` runs both engines
as processes alike. Run by our venv's python with the repository on PYTHONPATH:

    python -m bench.engine.peer_ours --model small --max-seqs 64 --max-tokens-per-seq 576 \\
        --threads 2 --engine-opt compile=false

`--engine-opt key=value` overrides an EngineConfig field (value parsed as JSON when it
parses); an unknown field or bad value fails before ready, with the error on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.engine.peer_vllm import (
    claim_protocol_channel,
    memory_stats,
    parse_options,
    send,
    serve,
)


def main(argv: Sequence[str] | None = None) -> int:
    t_start = time.perf_counter()
    channel = claim_protocol_channel()
    ap = argparse.ArgumentParser(description="our engine as an engine-benchmark peer")
    ap.add_argument("--model", required=True, help="preset or model folder")
    ap.add_argument("--max-seqs", type=int, required=True, help="largest batch to be run")
    ap.add_argument(
        "--max-tokens-per-seq", type=int, required=True, help="longest prompt + generation"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument(
        "--engine-opt", action="append", default=[], help="EngineConfig field, key=value"
    )
    args = ap.parse_args(argv)

    import torch

    from bench.engine.measure import OursBench

    ours = OursBench(
        args.model,
        args.max_seqs,
        args.max_tokens_per_seq,
        args.threads,
        parse_options(args.engine_opt),
    )

    def decode(prompts: list[list[int]], gen_len: int) -> dict[str, Any]:
        run = ours.generate(prompts, gen_len)
        return {
            "tokens": run.tokens,
            "decode_tokens": run.decode_tokens,
            "decode_s": run.decode_s,
            "step_s": run.decode_step_s,
            "prefill_s": run.prefill_s,
            "prefill_steps": run.prefill_steps,
        }

    config = {f: getattr(ours.config, f) for f in ours.config.__struct_fields__}
    print(f"peer_ours: {args.model} loaded, pid {os.getpid()}, config {config}", file=sys.stderr)
    send(
        channel,
        {
            "ready": True,
            "engine": "memserve",
            "version": None,
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_s": time.perf_counter() - t_start,
            "config": config,
            **memory_stats(),
        },
    )
    return serve(channel, decode, ours.prefill)


if __name__ == "__main__":
    sys.exit(main())
