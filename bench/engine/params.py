"""The engine benchmark's parameters: command-line values over the defaults (or the
`--quick` smoke-test values), validated once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

QUICK = {"models": "tiny", "concurrency": "1,8", "gen_len": 16, "prefill_len": 64}
DEFAULTS: dict[str, Any] = {
    "models": "tiny,small",
    "concurrency": "1,8,32,64",
    "gen_len": 128,
    "prefill_len": 512,
}


@dataclass
class BenchParams:
    models: list[str]
    concurrency: list[int]
    prompt_len: int
    gen_len: int
    prefill_len: int
    prefill_batch: int
    hf_single_requests: int
    repeats: int
    threads: int | None
    seed: int
    out: str
    hf: bool
    quick: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchParams:
        base = {**DEFAULTS, **(QUICK if args.quick else {})}

        def pick(name: str) -> Any:
            value = getattr(args, name)
            return base[name] if value is None else value

        params = cls(
            models=[m.strip() for m in str(pick("models")).split(",") if m.strip()],
            concurrency=[int(c) for c in str(pick("concurrency")).split(",") if c.strip()],
            prompt_len=args.prompt_len,
            gen_len=int(pick("gen_len")),
            prefill_len=int(pick("prefill_len")),
            prefill_batch=args.prefill_batch,
            hf_single_requests=args.hf_single_requests,
            repeats=args.repeats,
            threads=args.threads,
            seed=args.seed,
            out=args.out,
            hf=not args.no_hf,
            quick=args.quick,
        )
        params.validate()
        return params

    def validate(self) -> None:
        if not self.models:
            raise ValueError("--models is empty")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("--concurrency needs positive integers")
        if self.gen_len < 2:
            raise ValueError("--gen-len must be >= 2 (the first token ends the prefill phase)")
        for name in ("prompt_len", "prefill_len", "prefill_batch", "hf_single_requests", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be >= 1")
