"""Engine test helpers: seeded prompts, stepping an engine until idle, and small random
transformers checkpoints for reference comparisons. The `make_engine` and `tiny_folder`
fixtures are suite-wide (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.protocol import worker as wp
from common.sampling import SamplingParams
from common.sockets import PullSocket, PushSocket
from services.worker.engine import Engine, RequestOutput

MakeEngine = Callable[..., Engine]


def prompt(n: int, seed: int) -> list[int]:
    """`n` byte-token ids (3..258) that depend only on `seed`."""
    rng = random.Random(seed)
    return [rng.randrange(3, 259) for _ in range(n)]


def run_to_end(engine: Engine) -> dict[str, list[int]]:
    """Step until idle; return each request's generated tokens."""
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def run_to_end_outputs(engine: Engine) -> list[RequestOutput]:
    """Step until idle; return every output in the order the engine produced them."""
    outs: list[RequestOutput] = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def save_reference(
    kind: str, folder: Path, *, shard_size: str = "2GB", **overrides: object
) -> torch.nn.Module:
    """Build a small random transformers model of `kind`, save it to `folder`, return it."""
    import transformers

    common: dict[str, object] = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = cls_model(cls_cfg(**common)).eval()
    # Larger weights than the default init: activations of unit scale make logits spread
    # and greedy continuations vary, so a comparison of 32 tokens is a real test.
    # A tied embedding doubles as the lm_head, where unit-scale rows would make every token
    # predict itself; it gets the 1/sqrt(fan_in) scale of the other matrices.
    embed_std = (
        1.0 if not common.get("tie_word_embeddings") else float(common["hidden_size"]) ** -0.5
    )  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, embed_std if "embed" in name else p.shape[-1] ** -0.5)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder, max_shard_size=shard_size)
    return model


class Gateway:
    """What the gateway does on this channel: push requests, collect each stream."""

    def __init__(self, worker_address: str):
        self.replies = PullSocket("tcp://127.0.0.1:0", wp.TokenChunk, bind=True)
        self.requests = PushSocket(worker_address, wp.WorkerRequest, bind=False)  # type: ignore[arg-type]
        self.streams: dict[str, list[wp.TokenChunk]] = {}

    async def generate(self, rid: str, tokens: list[int], params: SamplingParams) -> None:
        await self.requests.send(
            wp.Generate(
                request_id=rid, token_ids=tokens, params=params, reply_to=self.replies.address
            )
        )

    async def collect(
        self, rids: set[str], timeout_s: float = 60
    ) -> dict[str, list[wp.TokenChunk]]:
        pending = set(rids)
        deadline = time.monotonic() + timeout_s
        while pending:
            chunk = await asyncio.wait_for(
                self.replies.recv(), max(0.01, deadline - time.monotonic())
            )
            self.streams.setdefault(chunk.request_id, []).append(chunk)
            if chunk.finished:
                pending.discard(chunk.request_id)
        return {rid: self.streams[rid] for rid in rids}

    def close(self) -> None:
        self.replies.close()
        self.requests.close()


def tokens(chunks: list[wp.TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def tied_copy(src: Path, dst: Path) -> Path:
    """`src` rewritten with tied word embeddings (no lm_head tensor)."""
    dst.mkdir()
    raw = json.loads((src / "config.json").read_text())
    raw["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(raw))
    (dst / "generation_config.json").write_bytes((src / "generation_config.json").read_bytes())
    weights = load_file(str(src / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(dst / "model.safetensors"))
    return dst
