"""KunServe parameter drop on the model (kunserve-plan.md sections 4.3, 8.2): a dropped model
is a pipeline stage that computes exactly what the whole model computes, a restore gives
back exactly the loaded model, and the freed memory really leaves the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.model.config import ModelConfig, ModelError
from common.model.presets import resolve_model
from common.sampling import SamplingParams
from services.worker.attention import AttentionMetadata, PrefillSpan
from services.worker.kv_cache import KVCache, KVLayout, split_blocks
from services.worker.model.llama import LlamaModel, stage_param_bytes
from services.worker.model.loader import load_model
from services.worker.model_runner import ModelRunner
from services.worker.request import Request
from services.worker.scheduler import ScheduledChunk
from tests.worker.helpers import prompt, tied_copy

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
REPO = Path(__file__).resolve().parents[2]


def remap(meta: AttentionMetadata, f: Callable[[torch.Tensor], torch.Tensor]) -> AttentionMetadata:
    """The same step on a stage whose block b is `f(b)` (positions and offsets are shared)."""
    return AttentionMetadata(
        slot_blocks=f(meta.slot_blocks),
        slot_offsets=meta.slot_offsets,
        positions=meta.positions,
        num_decodes=meta.num_decodes,
        decode_block_tables=None
        if meta.decode_block_tables is None
        else f(meta.decode_block_tables),
        decode_ctx_lens=meta.decode_ctx_lens,
        prefills=[
            PrefillSpan(p.q_start, p.q_len, p.ctx_len, f(p.block_ids)) for p in meta.prefills
        ],
    )


def snapshot(model: LlamaModel) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Storage and shape of every parameter, by name with the layer's index in the whole
    model (`layers[i]` is layer `first_layer + i`)."""

    def global_name(name: str) -> str:
        parts = name.split(".")
        if parts[0] == "layers":
            parts[1] = str(model.first_layer + int(parts[1]))
        return ".".join(parts)

    return {global_name(n): (p.data_ptr(), tuple(p.shape)) for n, p in model.named_parameters()}


def prefill_logits(model: LlamaModel, tokens: list[int]) -> torch.Tensor:
    cfg = model.cfg
    cache = KVCache.allocate(KVLayout.for_model(cfg, 16, torch.float32), 4)
    runner = ModelRunner(model, cache)
    req = Request("r", tokens, GREEDY, owned_block_ids=[0, 1, 2, 3])
    return runner.execute([ScheduledChunk(req, len(tokens))]).logits


def test_two_stage_composition_matches_whole_model(tiny_folder: Path) -> None:
    whole, cfg = load_model(tiny_folder)
    leader, _ = load_model(tiny_folder)
    follower, _ = load_model(tiny_folder)
    L, half = cfg.num_layers, cfg.num_layers // 2
    freed_a = leader.drop_layers(range(0, half), keep_embed=True, keep_head=True)
    freed_b = follower.drop_layers(range(half, L), keep_embed=False, keep_head=False)
    assert freed_a + leader.param_bytes() == whole.param_bytes() == freed_b + follower.param_bytes()
    assert (leader.first_layer, leader.last_layer, len(leader.layers)) == (0, half, half)
    assert (follower.first_layer, follower.last_layer, len(follower.layers)) == (half, L, L - half)
    assert leader.has_embed and leader.has_head
    assert not follower.has_embed and not follower.has_head
    assert [d.layer for d in follower.layers] == list(range(half, L))
    with pytest.raises(RuntimeError, match="no embedding"):
        follower.embed(torch.tensor([3]))
    with pytest.raises(RuntimeError, match="no head"):
        follower.compute_logits(torch.zeros(1, cfg.hidden_size))

    # The whole model's cache, and the same memory for the group: block b of L layers is
    # stage-0 sub-block 2b (layers [0, L/2)) and stage-1 sub-block 2b+1 (layers [L/2, L)).
    layout = KVLayout.for_model(cfg, 16, torch.float32)
    full, group = KVCache.allocate(layout, 8), KVCache.allocate(layout, 8)
    stages = split_blocks(group, 2)
    ModelRunner(leader, stages)  # a dropped model is a valid stage for the runner
    runner = ModelRunner(whole, full)
    reqs = [
        Request("a", prompt(37, 1), GREEDY, owned_block_ids=[0, 1, 2]),
        Request("b", prompt(21, 2), GREEDY, owned_block_ids=[3, 4]),
    ]
    steps = 0
    with torch.inference_mode():
        for step in range(5):
            # Step 0 prefills a; later steps decode a, and step 1 also prefills b (mixed batch).
            active = reqs[:1] if step == 0 else reqs
            chunks = [ScheduledChunk(r, r.num_tokens - r.num_computed_tokens) for r in active]
            ordered, ids, meta = runner.build_metadata(chunks)
            tokens = torch.tensor(ids)
            last_rows = torch.tensor(
                [sum(c.num_tokens for c in ordered[: i + 1]) - 1 for i in range(len(ordered))]
            )
            ref = whole.compute_logits(whole(whole.embed(tokens), meta, full)[last_rows])
            h = leader(leader.embed(tokens), remap(meta, lambda b: 2 * b), stages)
            h = follower(h, remap(meta, lambda b: 2 * b + 1), stages)
            got = leader.compute_logits(h[last_rows])
            # Same kernels on the same values in the same order: bit-identical.
            assert torch.equal(ref, got)
            for c, row in zip(ordered, ref, strict=True):
                c.request.num_computed_tokens += c.num_tokens
                c.request.append_token(int(row.argmax()))
            steps += 1
    assert steps == 5 and reqs[0].num_output_tokens == 5
    # The stages wrote exactly the whole model's KV, each into its own half of every block.
    assert torch.equal(group.tensor, full.tensor) and full.tensor.abs().sum() > 0


@pytest.mark.parametrize("tied", [False, True])
def test_restore_gives_back_the_loaded_model(tiny_folder: Path, tmp_path: Path, tied: bool) -> None:
    folder = tied_copy(tiny_folder, tmp_path / "tied") if tied else tiny_folder
    fresh, cfg = load_model(folder)
    model, _ = load_model(folder)
    tokens = prompt(29, 7)
    expected = prefill_logits(fresh, tokens)

    freed = model.drop_layers(range(1, 3), keep_embed=False, keep_head=False)
    assert model.param_bytes() == stage_param_bytes(
        cfg, range(1, 3), embed=False, head=False, dtype=torch.float32
    )
    kept = snapshot(model)
    assert model.restore_layers(folder) == freed
    assert (model.first_layer, model.last_layer, model.has_embed, model.has_head) == (
        0,
        cfg.num_layers,
        True,
        True,
    )
    assert [d.layer for d in model.layers] == list(range(cfg.num_layers))
    # Held tensors were not reloaded: same storage as before the restore.
    assert {n: v for n, v in snapshot(model).items() if n in kept} == kept
    now, ref = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert now.keys() == ref.keys() and model.param_bytes() == fresh.param_bytes()
    for name, p in ref.items():
        assert torch.equal(now[name], p), name
    assert torch.equal(prefill_logits(model, tokens), expected)
    # Restoring a whole model loads nothing.
    assert model.restore_layers(folder) == 0


def test_failed_restore_leaves_the_stage_as_it_was(tiny_folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "generation_config.json"):
        (broken / name).write_bytes((tiny_folder / name).read_bytes())
    weights = load_file(str(tiny_folder / "model.safetensors"))
    del weights["model.layers.0.mlp.down_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"))
    model, _ = load_model(tiny_folder)
    model.drop_layers(range(2, 4), keep_embed=False, keep_head=True)
    before = snapshot(model)
    with pytest.raises(ModelError, match="model.layers.0.mlp.down_proj.weight"):
        model.restore_layers(broken)
    assert snapshot(model) == before
    assert (model.first_layer, model.last_layer, len(model.layers)) == (2, 4, 2)
    assert model.restore_layers(tiny_folder) > 0 and model.first_layer == 0


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_stage_param_bytes_matches_a_dropped_model(preset: str) -> None:
    folder = resolve_model(preset)
    model, cfg = load_model(folder)
    L, f32 = cfg.num_layers, torch.float32
    assert model.param_bytes() == stage_param_bytes(
        cfg, range(0, L), embed=True, head=True, dtype=f32
    )
    model.drop_layers(range(0, L // 2), keep_embed=True, keep_head=True)
    assert model.param_bytes() == stage_param_bytes(
        cfg, range(0, L // 2), embed=True, head=True, dtype=f32
    )
    model.restore_layers(folder)
    model.drop_layers(range(L // 2, L), keep_embed=False, keep_head=False)
    assert model.param_bytes() == stage_param_bytes(
        cfg, range(L // 2, L), embed=False, head=False, dtype=f32
    )


def test_drop_frees_resident_memory() -> None:
    """In a process of its own: RSS falls by what drop_layers reports, rises on restore,
    and falls again on a second drop (tensors the restore allocated from glibc's heap)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.worker.rss_drop_probe", "small", "4", "8"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.splitlines()[-1])
    freed = r["freed0"]
    assert freed == r["freed1"] == r["reloaded0"] == r["reloaded1"] > 40_000_000
    assert r["loaded"] - r["dropped0"] >= 0.8 * freed, r
    assert r["restored0"] - r["dropped0"] >= 0.8 * freed, r
    assert r["restored0"] - r["dropped1"] >= 0.8 * freed, r
    assert r["restored1"] - r["dropped1"] >= 0.8 * freed, r
    assert r["equal"], "restored parameters differ from the loaded ones"


def test_bad_drop_is_refused_and_changes_nothing(tiny_folder: Path) -> None:
    model, cfg = load_model(tiny_folder)
    model.drop_layers(range(1, 4), keep_embed=True, keep_head=True)
    before, nbytes = snapshot(model), model.param_bytes()
    bad: list[tuple[range, bool, bool, str]] = [
        (range(0, 2), True, True, "not inside the held layers"),
        (range(2, 5), True, True, "not inside the held layers"),
        (range(2, 2), True, True, "non-empty"),
        (range(1, 4, 2), True, True, "step 1"),
    ]
    for keep, embed, head, msg in bad:
        with pytest.raises(ValueError, match=msg):
            model.drop_layers(keep, keep_embed=embed, keep_head=head)
        assert snapshot(model) == before and model.param_bytes() == nbytes
        assert (model.first_layer, model.last_layer) == (1, 4)
    model.drop_layers(range(2, 4), keep_embed=False, keep_head=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="holds no embedding"):
        model.drop_layers(range(2, 4), keep_embed=True, keep_head=False)
    with pytest.raises(ValueError, match="holds no head"):
        model.drop_layers(range(2, 4), keep_embed=False, keep_head=True)
    assert snapshot(model) == before and (model.first_layer, model.last_layer) == (2, 4)

    # Tied head: the head is the embedding, it cannot go while the head stays.
    raw = json.loads((tiny_folder / "config.json").read_text())
    tied = LlamaModel(ModelConfig.from_dict({**raw, "tie_word_embeddings": True}))
    assert tied.lm_head is None and tied.has_head
    before, nbytes = snapshot(tied), tied.param_bytes()
    with pytest.raises(ValueError, match="tied word embeddings"):
        tied.drop_layers(range(0, 2), keep_embed=False, keep_head=True)
    assert (snapshot(tied), tied.param_bytes(), tied.first_layer, tied.last_layer) == (
        before,
        nbytes,
        0,
        cfg.num_layers,
    )
    # Keeping the embedding without the head frees only the final norm.
    assert tied.drop_layers(range(0, cfg.num_layers), keep_embed=True, keep_head=False) == 4 * (
        cfg.hidden_size
    )
    assert tied.has_embed and not tied.has_head


def test_load_weights_fills_only_the_names_asked(tiny_folder: Path) -> None:
    from services.worker.model.loader import load_weights

    model, cfg = load_model(tiny_folder)
    fresh = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    names = {"model.layers.1.self_attn.q_proj.weight", "model.norm.weight"}
    load_weights(model, tiny_folder, only=names)
    filled = {"layers.1.self_attn.qkv_weight", "norm.weight"}
    for n, p in model.named_parameters():
        if n == "layers.1.self_attn.qkv_weight":  # q rows filled, k/v rows untouched
            assert torch.equal(p[: cfg.q_size], fresh[n][: cfg.q_size])
            assert bool((p[cfg.q_size :] == 0.5).all())
        elif n in filled:
            assert torch.equal(p, fresh[n]), n
        else:
            assert bool((p == 0.5).all()), n
    with pytest.raises(ValueError, match="not held"):
        load_weights(model, tiny_folder, only={"model.layers.9.mlp.up_proj.weight"})
