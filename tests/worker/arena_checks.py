"""The instance arena's checks on any device (tests/worker/test_arena.py runs them on the
CPU, test_arena_cuda.py on a GPU): the tiny model placed at the top of one byte buffer, its
KV cache in the same buffer's bottom, through drop, compaction and restore."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.sampling import SamplingParams
from services.worker.kv_cache import KVCache, KVLayout
from services.worker.model.arena import ArenaError, ParamArena
from services.worker.model.llama import LlamaModel, stage_param_bytes
from services.worker.model.loader import load_model
from services.worker.model_runner import ModelRunner
from services.worker.request import Request
from services.worker.scheduler import ScheduledChunk
from tests.worker.helpers import prompt

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)
BLOCK = 16
KV_BLOCKS = 4  # a prefill of up to 64 tokens
TOKENS = prompt(45, 3)


def global_params(model: LlamaModel) -> dict[str, torch.Tensor]:
    """Parameters by their name in the whole model (`layers[i]` is `first_layer + i`)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "layers":
            parts[1] = str(model.first_layer + int(parts[1]))
        out[".".join(parts)] = p
    return out


def stage_forward(model: LlamaModel, kv: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """A prefill of `tokens` through the model's held layers with its KV cache in the
    bytes `kv`: the hidden states after its last layer [T, hidden]."""
    layout = KVLayout.for_model(model.cfg, BLOCK, model.dtype, model.num_local_layers)
    cache = KVCache.from_bytes(layout, kv, KV_BLOCKS)
    runner = ModelRunner(model, cache)
    req = Request("r", tokens, GREEDY, owned_block_ids=list(range(KV_BLOCKS)))
    with torch.inference_mode():
        _, ids, meta = runner.build_metadata([ScheduledChunk(req, len(tokens))])
        embedded = model.embed(torch.tensor(ids, device=model.device))
        return model(embedded, meta, cache)


def kv_block_bytes(model: LlamaModel) -> int:
    return KVLayout.for_model(model.cfg, BLOCK, model.dtype).bytes_per_block


def new_arena(model: LlamaModel, kv_blocks: int, spare: int, device: str) -> ParamArena:
    """An arena of the model's bytes + `kv_blocks` whole blocks + `spare` bytes."""
    size = model.param_bytes() + kv_blocks * kv_block_bytes(model) + spare
    buf = torch.zeros(size, dtype=torch.uint8, device=device)
    return ParamArena(buf, kv_bytes=KV_BLOCKS * kv_block_bytes(model))


def assert_equal_params(model: LlamaModel, ref: LlamaModel) -> None:
    now, want = global_params(model), global_params(ref)
    assert now.keys() == want.keys()
    for name, p in want.items():
        assert torch.equal(now[name], p), name


def check_place_keeps_logits(folder: Path, device: str) -> None:
    ref, _ = load_model(folder, device=device)
    model, _ = load_model(folder, device=device)
    arena = new_arena(model, kv_blocks=8, spare=0, device=device)
    scratch = torch.zeros(KV_BLOCKS * kv_block_bytes(model), dtype=torch.uint8, device=device)
    expected = ref.compute_logits(stage_forward(ref, scratch, TOKENS))

    assert arena.place(model) == model.param_bytes() == ref.param_bytes()
    arena.check_integrity(model)
    assert arena.footprint == arena.param_bytes == model.param_bytes()  # presets: 256-aligned
    assert arena.param_bottom == arena.size - model.param_bytes()
    assert_equal_params(model, ref)
    # The KV cache lives in the arena's bottom, the parameters above: same logits, bit for bit.
    kv = arena.buffer[: arena.kv_bytes]
    got = model.compute_logits(stage_forward(model, kv, TOKENS))
    assert torch.equal(got, expected) and kv.any()
    arena.check_integrity(model)
    assert_equal_params(model, ref)  # the KV writes did not touch the parameters


def check_drop_compact_restore(folder: Path, device: str) -> None:
    """Leader stage keep [0, 2) + embed + head: same stage computation as a fresh 2-layer
    stage, the boundary rises by exactly the dropped bytes, KV may grow there without
    touching parameters; restore gives back the loaded model with every tensor in the arena."""
    fresh, cfg = load_model(folder, device=device)
    stage_ref, _ = load_model(folder, device=device, last_layer=2)
    model, _ = load_model(folder, device=device)
    arena = new_arena(model, kv_blocks=8, spare=4096, device=device)
    arena.place(model)
    bottom0 = arena.param_bottom
    f32 = model.dtype

    freed = model.drop_layers(range(0, 2), keep_embed=True, keep_head=True)
    bottom1 = arena.compact(model)
    arena.check_integrity(model)
    kept = stage_param_bytes(cfg, range(0, 2), embed=True, head=True, dtype=f32)
    full = stage_param_bytes(cfg, range(0, cfg.num_layers), embed=True, head=True, dtype=f32)
    assert bottom1 - bottom0 == freed == full - kept
    assert arena.footprint == model.param_bytes() == kept
    for name, p in global_params(model).items():
        assert torch.equal(p, global_params(fresh)[name]), name

    # KV grows into what the drop freed; a forward over it leaves the parameters intact.
    arena.set_kv_bytes(arena.kv_limit_blocks(kv_block_bytes(model)) * kv_block_bytes(model))
    assert arena.kv_bytes > bottom0
    arena.buffer[: arena.kv_bytes].fill_(0x5A)
    kv = arena.buffer[: KV_BLOCKS * kv_block_bytes(model)]
    ref_kv = torch.zeros_like(kv)
    hidden = stage_forward(model, kv, TOKENS)
    assert torch.equal(hidden, stage_forward(stage_ref, ref_kv, TOKENS))
    assert torch.equal(model.compute_logits(hidden), fresh.compute_logits(hidden))
    arena.check_integrity(model)

    # Restore: refused until KV shrinks below the reservation, then the whole model.
    need = arena.restore_bytes(model)
    assert need == freed
    before = {n: p.data_ptr() for n, p in global_params(model).items()}
    with pytest.raises(ArenaError, match="shrink KV"):
        arena.restore(model, folder)
    assert {n: p.data_ptr() for n, p in global_params(model).items()} == before
    arena.set_kv_bytes(arena.reserve_for(need) // kv_block_bytes(model) * kv_block_bytes(model))
    tail = arena.buffer[: arena.kv_bytes].clone()
    assert arena.restore(model, folder) == freed
    arena.check_integrity(model)
    assert arena.param_bottom == bottom0 and model.param_bytes() == fresh.param_bytes()
    assert {n: p.data_ptr() for n, p in global_params(model).items() if n in before} == before
    assert_equal_params(model, fresh)
    assert torch.equal(arena.buffer[: arena.kv_bytes], tail)  # the KV kept was not touched
    assert all(p.device.type == torch.device(device).type for p in model.parameters())
    assert torch.equal(
        model.compute_logits(stage_forward(model, kv, TOKENS)),
        fresh.compute_logits(stage_forward(fresh, ref_kv, TOKENS)),
    )


def check_cycles(folder: Path, device: str) -> None:
    """Leader, follower and head-less drops in turn, each compacted and restored, with a
    small scratch (overlapping moves go through it in many chunks): invariants hold, KV
    bytes below the boundary survive every step, the model comes back equal each time."""
    fresh, cfg = load_model(folder, device=device)
    model, _ = load_model(folder, device=device)
    buf = torch.zeros(
        model.param_bytes() + 8 * kv_block_bytes(model), dtype=torch.uint8, device=device
    )
    arena = ParamArena(buf, kv_bytes=0, scratch_bytes=4000)
    arena.place(model)
    bottom0 = arena.param_bottom
    gen = torch.Generator().manual_seed(7)
    L = cfg.num_layers
    drops = [
        (range(0, L // 2), True, True),
        (range(L // 2, L), False, False),
        (range(0, L), True, False),  # lm_head goes: layer 0's big tensors move into it
        (range(1, 3), False, False),
    ]
    for keep, embed, head in drops:
        freed = model.drop_layers(keep, keep_embed=embed, keep_head=head)
        assert arena.compact(model) == bottom0 + freed
        arena.check_integrity(model)
        arena.set_kv_bytes(arena.param_bottom)
        pattern = torch.randint(0, 256, (arena.kv_bytes,), dtype=torch.uint8, generator=gen)
        arena.buffer[: arena.kv_bytes].copy_(pattern)
        arena.set_kv_bytes(arena.reserve_for(arena.restore_bytes(model)))
        assert arena.restore(model, folder) == freed
        arena.check_integrity(model)
        assert arena.param_bottom == bottom0
        assert torch.equal(arena.buffer[: arena.kv_bytes].cpu(), pattern[: arena.kv_bytes])
        assert_equal_params(model, fresh)


def check_refusals(folder: Path, device: str) -> None:
    model, _ = load_model(folder, device=device)
    size = model.param_bytes()
    ptrs = [p.data_ptr() for p in model.parameters()]
    # Too small, or too small above the KV: nothing moves.
    for buf_bytes, kv_bytes in ((size - 256, 0), (size, 256)):
        buf = torch.zeros(buf_bytes, dtype=torch.uint8, device=device)
        arena = ParamArena(buf, kv_bytes=kv_bytes)
        with pytest.raises(ArenaError, match="do not fit"):
            arena.place(model)
        assert [p.data_ptr() for p in model.parameters()] == ptrs
        assert arena.param_bottom == arena.size and arena.param_bytes == 0
    arena = ParamArena(torch.zeros(size, dtype=torch.uint8, device=device))
    arena.place(model)
    arena.check_integrity(model)
    with pytest.raises(ArenaError, match="overlap the parameters"):
        arena.set_kv_bytes(1)  # no room at all
    with pytest.raises(ArenaError, match="do not fit below"):
        arena.reserve_for(1)
    model.drop_layers(range(0, 1), keep_embed=True, keep_head=True)
    arena.compact(model)
    # KV takes everything freed: restore is refused and changes nothing.
    arena.set_kv_bytes(arena.param_bottom)
    layers = (model.first_layer, model.last_layer, model.param_bytes())
    with pytest.raises(ArenaError, match="shrink KV"):
        arena.restore(model, folder)
    assert (model.first_layer, model.last_layer, model.param_bytes()) == layers
    arena.check_integrity(model)
    # A parameter that left the arena behind its back is caught.
    p = next(iter(model.parameters()))
    p.data = p.data.clone()
    with pytest.raises(AssertionError, match="not at its slot"):
        arena.check_integrity(model)
    # A model parameter the arena never placed is refused by compact.
    other = ParamArena(torch.zeros(size, dtype=torch.uint8, device=device))
    with pytest.raises(ArenaError, match="not in the arena"):
        other.compact(model)
