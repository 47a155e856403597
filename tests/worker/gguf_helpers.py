"""A small llama GGUF written with the `gguf` package, the way llama.cpp's converter writes
one: q/k rows permuted for its rope, some tensors quantized, a byte-level BPE vocabulary
with merges, control tokens and a ChatML template."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Merged tokens, in merge order: each is the concatenation of an earlier pair. No merge
# involves a digit (the `smollm` split keeps every digit alone).
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
    ("Ġ", "w"), ("r", "e"), ("Ġ", "s"), ("a", "t"), ("e", "n"), ("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"),
    ("Ċ", "Ċ"), ("Ġ", "c"), ("i", "s"), ("Ġa", "n"), ("o", "r"), ("Ġc", "a"),
    ("Ã", "©"), ("a", "f"), ("Ġc", "af"), ("u", "s"), ("ð", "Ł"), ("Ġ", "ðŁ"),
]  # fmt: skip


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of bytes 0..255, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """tokens, token types (3 control, 1 normal) and merges ("a b") of the tiny vocab."""
    tokens = [*SPECIALS, *byte_alphabet()]
    merges: list[str] = []
    for a, b in MERGES:
        assert a in tokens and b in tokens, f"merge {a} {b} before its parts"
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py `permute`: rotary halves -> interleaved pairs.
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tied: bool = True,
    add_bos: bool = False,
    layers: int = 2,
    seed: int = 0,
    drop: str = "",
    tokenizer_model: str = "gpt2",
) -> Path:
    """Write the GGUF: hidden 64, 4 heads (2 kv), ffn 128; token_embd and the attention
    matrices in Q8_0, the MLP of layer 0 in Q4_1 (when gguf can quantize it), the rest F32.
    Without `tied`, an `output.weight` too. The tensor named `drop` is left out."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    tokens, types, merges = vocabulary()
    hidden, heads, kv_heads, ffn = 64, 4, 2, 128
    head_dim = hidden // heads
    vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def normal(rows: int, cols: int, std: float | None = None) -> np.ndarray:
        scale = cols**-0.5 if std is None else std
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)

    def put(name: str, data: np.ndarray, qtype: Q = Q.F32) -> None:
        if name == drop:
            return
        if qtype != Q.F32:
            try:
                quantized = gguf.quants.quantize(data, qtype)
            except NotImplementedError:
                quantized = None
            if quantized is not None:
                w.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=qtype)
                return
        w.add_tensor(name, data)

    # A tied embedding doubles as the lm_head: unit-scale rows would make every token
    # predict itself, so it gets the 1/sqrt(hidden) scale of the other matrices.
    put("token_embd.weight", normal(vocab, hidden, hidden**-0.5 if tied else 1.0), Q.Q8_0)
    put("output_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    if not tied:
        put("output.weight", normal(vocab, hidden))
    for layer in range(layers):
        p = f"blk.{layer}."
        put(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        put(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        put(p + "attn_q.weight", _permute(normal(hidden, hidden), heads), Q.Q8_0)
        put(p + "attn_k.weight", _permute(normal(kv_heads * head_dim, hidden), kv_heads), Q.Q8_0)
        put(p + "attn_v.weight", normal(kv_heads * head_dim, hidden), Q.Q8_0)
        put(p + "attn_output.weight", normal(hidden, hidden))
        mlp_type = Q.Q4_1 if layer == 0 else Q.F32
        put(p + "ffn_gate.weight", normal(ffn, hidden), mlp_type)
        put(p + "ffn_up.weight", normal(ffn, hidden), mlp_type)
        put(p + "ffn_down.weight", normal(hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
