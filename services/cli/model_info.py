"""`memserve model info PATH|PRESET`: what a checkpoint is and what it costs in memory;
`memserve model prepare PRESET|FILE.gguf`: write a preset's folder or convert a GGUF into
the model cache now (`make install` prepares smollm2), and print the folder."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from common.cli_errors import fail
from common.model.config import ModelConfig, ModelError
from common.model.presets import resolve_model

MODEL_HELP = (
    "embedded preset (tiny, small), packaged preset (smollm2), a .gguf file (converted "
    "into the model cache once) or a Hugging Face folder"
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("model", help="inspect a model")
    msub = p.add_subparsers(dest="model_command", required=True)
    info = msub.add_parser("info", help="print a model's shape and memory figures")
    info.add_argument("model", help=MODEL_HELP)
    info.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    info.add_argument("--block-size", type=int, default=16)
    info.add_argument(
        "--budget-bytes",
        type=int,
        default=0,
        help="an instance's memory budget (mempool.budget_bytes): print the KV that fits "
        "beside the parameters",
    )
    info.set_defaults(func=run)
    prepare = msub.add_parser(
        "prepare", help="write a preset or convert a .gguf file into the model cache"
    )
    prepare.add_argument("model", help=MODEL_HELP)
    prepare.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from services.worker.model.loader import checkpoint_files

    started = time.perf_counter()
    try:
        folder = resolve_model(args.model)
        ModelConfig.from_folder(folder)  # a plain folder: check it is one we can serve
        checkpoint_files(folder)
    except ModelError as exc:
        return fail(str(exc))
    print(folder)
    print(f"ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    # torch only here: every service process starts through this CLI, most never need it.
    import torch

    from services.worker.kv_cache import KVLayout
    from services.worker.model.loader import checkpoint_files

    try:
        folder = resolve_model(args.model)
        if not folder.is_dir():
            raise ModelError(f"{folder}: model folder does not exist")
        cfg = ModelConfig.from_folder(folder)
        files = checkpoint_files(folder)
    except ModelError as exc:
        return fail(str(exc))
    dtype = getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    layout = KVLayout.for_model(cfg, args.block_size, dtype)
    total = cfg.param_count()
    rows = [
        ("folder", str(folder)),
        ("architecture", cfg.architecture),
        ("layers", cfg.num_layers),
        ("hidden / intermediate", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
        ("heads / kv heads / head dim", f"{cfg.num_heads} / {cfg.num_kv_heads} / {cfg.head_dim}"),
        ("vocab", cfg.vocab_size),
        ("context", cfg.max_position_embeddings),
        ("rope", f"{cfg.rope.rope_type}, theta={cfg.rope.theta:g}"),
        ("tied embeddings", cfg.tie_word_embeddings),
        ("sliding windows", sorted({w for w in cfg.sliding_windows if w}) or "none"),
        ("eos ids", list(cfg.eos_token_ids)),
        ("weight files", len(files)),
        ("parameters", f"{total:,}"),
        (f"parameter bytes ({args.dtype})", f"{total * elem:,}"),
        ("parameter bytes per layer", f"{cfg.layer_param_count() * elem:,}"),
        (f"KV bytes per block ({args.block_size} tokens)", f"{layout.bytes_per_block:,}"),
    ]
    if args.budget_bytes < 0:
        return fail(f"--budget-bytes must be >= 0, got {args.budget_bytes}")
    blocks = max(0, args.budget_bytes - total * elem) // layout.bytes_per_block
    if args.budget_bytes:
        rows += [
            ("budget bytes", f"{args.budget_bytes:,}"),
            ("KV blocks in budget", f"{blocks:,}"),
            ("KV tokens in budget", f"{blocks * args.block_size:,}"),
            ("KV bytes in budget", f"{blocks * layout.bytes_per_block:,}"),
        ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.budget_bytes and not blocks:
        return fail(
            f"a budget of {args.budget_bytes:,} bytes holds no KV block beside "
            f"{total * elem:,} parameter bytes"
        )
    return 0
