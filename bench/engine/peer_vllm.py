"""vLLM (CPU build) as a benchmark peer: one `LLM` in this process, answering the engine
benchmark's commands as JSON lines. STANDALONE: run by the peer's own python (a venv with
vllm, never a project dependency), so it imports nothing from this repository; only the
stdlib at module level (vllm and torch inside `VllmPeer`), which also lets our own peer
(`peer_ours.py`) reuse the protocol half below.

Protocol (one JSON object per line; the parent is bench/engine/peers.py)::

    peer -> parent   {"ready": true, "engine": ..., "load_s": ..., "rss_bytes": ..., ...}
    parent -> peer   {"cmd": "decode", "prompts": [[id, ...], ...], "gen_len": G}
    peer -> parent   {"ok": true, "tokens": [[...]], "decode_tokens": D, "decode_s": S,
                      "step_s": [...], "prefill_s": P, "prefill_steps": K}
    parent -> peer   {"cmd": "prefill", "prompts": [...]}    -> {"ok": true, "seconds": W}
    parent -> peer   {"cmd": "stats"}   -> {"ok": true, "rss_bytes": R, "peak_rss_bytes": H}
    parent -> peer   {"cmd": "quit"}    -> {"ok": true}, then exit 0
    any failure      {"ok": false, "error": "..."} (the peer stays up)

`decode` measures exactly what OursBench.generate measures for our engine: every request
added at once (greedy, max_tokens=G, ignore_eos), steps until each has its first token
(the prefill phase, untimed), then each remaining `step()` timed on its own. The protocol
channel is a private duplicate of the original stdout; fd 1 is pointed at stderr before
any library loads, so a library's print can never corrupt a reply.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any


def claim_protocol_channel() -> IO[str]:
    """The original stdout as a private line-buffered stream; fd 1 (and sys.stdout) now
    go to stderr, so only `send` writes to the parent."""
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, "w", buffering=1)


def memory_stats() -> dict[str, int]:
    """Resident set size now and its peak (VmRSS, VmHWM from /proc/self/status)."""
    out = {"rss_bytes": -1, "peak_rss_bytes": -1}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    out["peak_rss_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def send(channel: IO[str], message: dict[str, Any]) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def serve(
    channel: IO[str],
    decode: Callable[[list[list[int]], int], dict[str, Any]],
    prefill: Callable[[list[list[int]]], float],
) -> int:
    """Answer commands from stdin until `quit` or end of input. A failing command is
    answered with its error; the loop goes on (the parent decides whether to stop)."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "quit":
                send(channel, {"ok": True})
                return 0
            if cmd == "decode":
                reply = {"ok": True, **decode(msg["prompts"], int(msg["gen_len"]))}
            elif cmd == "prefill":
                reply = {"ok": True, "seconds": prefill(msg["prompts"])}
            elif cmd == "stats":
                reply = {"ok": True, **memory_stats()}
            else:
                reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        except Exception as exc:  # reported to the parent, which decides
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        send(channel, reply)
    return 0


def step_decode(
    add: Callable[[str, list[int]], None],
    step: Callable[[], list[tuple[str, list[int]]]],
    unfinished: Callable[[], bool],
    prompts: Sequence[list[int]],
    gen_len: int,
    tag: str,
) -> dict[str, Any]:
    """The decode measurement over any engine: `add(rid, prompt)` queues a greedy request
    of `gen_len` tokens, `step()` runs one engine step and returns (rid, new token ids)
    pairs, `unfinished()` says whether any request is left."""
    rids = [f"{tag}-{i}" for i in range(len(prompts))]
    index = {rid: i for i, rid in enumerate(rids)}
    tokens: list[list[int]] = [[] for _ in prompts]
    for rid, prompt in zip(rids, prompts, strict=True):
        add(rid, prompt)
    guard = sum(len(p) for p in prompts) + len(prompts) * gen_len + 16
    started = steps = 0
    t0 = time.perf_counter()
    while started < len(prompts):
        for rid, new in step():
            i = index[rid]
            if not tokens[i] and new:
                started += 1
            tokens[i].extend(new)
        steps += 1
        if steps > guard:
            raise RuntimeError("engine made no progress in the prefill phase")
    prefill_s = time.perf_counter() - t0
    step_s: list[float] = []
    decode_tokens = 0
    clock = time.perf_counter
    while unfinished():
        s = clock()
        outs = step()
        step_s.append(clock() - s)
        for rid, new in outs:
            tokens[index[rid]].extend(new)
            decode_tokens += len(new)
        if len(step_s) > guard:
            raise RuntimeError("engine made no progress in the decode phase")
    for i, t in enumerate(tokens):
        if len(t) != gen_len:
            raise RuntimeError(f"request {i} produced {len(t)} tokens, expected {gen_len}")
    return {
        "tokens": tokens,
        "decode_tokens": decode_tokens,
        "decode_s": sum(step_s),
        "step_s": step_s,
        "prefill_s": prefill_s,
        "prefill_steps": steps,
    }


class VllmPeer:
    """One vLLM V1 engine, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), stepped by
    hand through `llm.llm_engine`. Prefix caching is off so a repeated prompt is always
    computed; outputs are deltas (only new tokens per step) and never detokenized."""

    def __init__(self, model: str, options: dict[str, Any]):
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {
            "model": model,
            "dtype": "float32",
            "max_model_len": 4096,
            "block_size": 32,  # the CPU attention backend wants a multiple of 32
            "enable_prefix_caching": False,
            "skip_tokenizer_init": True,
            "seed": 0,
        }
        kwargs.update(options)
        self.kwargs = kwargs
        self.llm = LLM(**kwargs)
        self.engine = self.llm.llm_engine
        self._SamplingParams = SamplingParams
        self._delta = RequestOutputKind.DELTA
        self._counter = 0

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"llm_kwargs": self.kwargs}
        try:
            sc = self.engine.vllm_config.scheduler_config
            cc = self.engine.vllm_config.cache_config
            out.update(
                max_num_seqs=sc.max_num_seqs,
                max_num_batched_tokens=sc.max_num_batched_tokens,
                block_size=cc.block_size,
                num_kv_blocks=getattr(cc, "num_cpu_blocks", None)
                or getattr(cc, "num_gpu_blocks", None),
            )
        except AttributeError:
            pass
        return out

    def _params(self, max_tokens: int) -> Any:
        return self._SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=True,
            detokenize=False,
            output_kind=self._delta,
        )

    def _add(self, rid: str, prompt: list[int], max_tokens: int) -> None:
        self.engine.add_request(rid, {"prompt_token_ids": prompt}, self._params(max_tokens))

    def _step(self) -> list[tuple[str, list[int]]]:
        return [(o.request_id, list(o.outputs[0].token_ids)) for o in self.engine.step()]

    def decode(self, prompts: list[list[int]], gen_len: int) -> dict[str, Any]:
        self._counter += 1
        return step_decode(
            lambda rid, p: self._add(rid, p, gen_len),
            self._step,
            self.engine.has_unfinished_requests,
            prompts,
            gen_len,
            f"d{self._counter}",
        )

    def prefill(self, prompts: list[list[int]]) -> float:
        self._counter += 1
        for i, p in enumerate(prompts):
            self._add(f"p{self._counter}-{i}", p, 1)
        t0 = time.perf_counter()
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return time.perf_counter() - t0


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs; a value is JSON when it parses (numbers, true/false, null),
    else the string itself."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    t_start = time.perf_counter()
    channel = claim_protocol_channel()
    ap = argparse.ArgumentParser(description="vLLM CPU as an engine-benchmark peer")
    ap.add_argument("--model", required=True, help="model folder")
    ap.add_argument(
        "--opt", action="append", default=[], help="LLM(...) keyword override, key=value"
    )
    args = ap.parse_args(argv)
    import torch
    import vllm

    peer = VllmPeer(args.model, parse_options(args.opt))
    send(
        channel,
        {
            "ready": True,
            "engine": "vllm",
            "version": vllm.__version__,
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_s": time.perf_counter() - t_start,
            "config": peer.config(),
            **memory_stats(),
        },
    )
    return serve(channel, peer.decode, peer.prefill)


if __name__ == "__main__":
    sys.exit(main())
