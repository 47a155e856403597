"""The engine benchmark's parameters: command-line values over the defaults (or the
`--quick` smoke-test values), validated once."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUICK = {"models": "tiny", "concurrency": "1,8", "gen_len": 16, "prefill_len": 64}
DEFAULTS: dict[str, Any] = {
    "models": "tiny,small",
    "concurrency": "1,8,32,64",
    "gen_len": 128,
    "prefill_len": 512,
}
# `--peer`: one model by default (each peer process loads it), our engine and the peer
# both on every core.
PEER_DEFAULTS = {"models": "small"}
PEER_QUICK = {"models": "tiny"}
DEFAULT_ROUNDS = 3


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
    # side-by-side mode (bench/engine/versus.py); peer None = ours vs transformers only
    peer: str | None = None
    peer_python: str | None = None
    rounds: int = DEFAULT_ROUNDS
    engine_opts: list[str] = field(default_factory=list)
    peer_engine_opts: list[str] = field(default_factory=list)
    ready_timeout_s: float = 900.0
    tcmalloc: bool = True
    command_timeout_s: float = 1800.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchParams:
        peer = getattr(args, "peer", None)
        base = {**DEFAULTS, **(QUICK if args.quick else {})}
        if peer:
            base.update(PEER_QUICK if args.quick else PEER_DEFAULTS)

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
            threads=args.threads or (os.cpu_count() or 1 if peer else None),
            seed=args.seed,
            out=args.out or _default_out(peer),
            hf=not args.no_hf,
            quick=args.quick,
            peer=peer,
            peer_python=getattr(args, "peer_python", None),
            rounds=DEFAULT_ROUNDS if getattr(args, "rounds", None) is None else args.rounds,
            engine_opts=list(getattr(args, "engine_opt", None) or []),
            peer_engine_opts=list(getattr(args, "peer_engine_opt", None) or []),
            ready_timeout_s=getattr(args, "ready_timeout", None) or 900.0,
            tcmalloc=not getattr(args, "no_tcmalloc", False),
        )
        if not peer:
            for flag, value in (
                ("--rounds", getattr(args, "rounds", None)),
                ("--peer-python", params.peer_python),
                ("--peer-engine-opt", params.peer_engine_opts or None),
                ("--ready-timeout", getattr(args, "ready_timeout", None)),
                ("--no-tcmalloc", True if getattr(args, "no_tcmalloc", False) else None),
            ):
                if value is not None:
                    raise ValueError(f"{flag} needs --peer (vllm or memserve)")
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
        for flag, opts in (
            ("--engine-opt", self.engine_opts),
            ("--peer-engine-opt", self.peer_engine_opts),
        ):
            for opt in opts:
                key, sep, _ = opt.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"{flag} takes key=value, got {opt!r}")
        if self.peer is None:
            return
        if self.peer not in ("vllm", "memserve"):
            raise ValueError(f"--peer must be vllm or memserve, got {self.peer!r}")
        if self.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if self.ready_timeout_s <= 0:
            raise ValueError("--ready-timeout must be > 0")
        if self.peer_python is None:
            from bench.engine.peers import default_peer_python

            self.peer_python = default_peer_python(self.peer)
            if self.peer_python is None:
                raise ValueError(
                    "--peer vllm needs --peer-python (a python with vllm; `make peer-vllm` "
                    "builds one at .peers/vllm/bin/python)"
                )
        python = Path(self.peer_python)
        if not python.is_file() or not os.access(python, os.X_OK):
            raise ValueError(f"--peer-python {self.peer_python}: not an executable file")


def _default_out(peer: str | None) -> str:
    return f"results/bench_engine_{peer}.json" if peer else "results/bench_engine.json"
