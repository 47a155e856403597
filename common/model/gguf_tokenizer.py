"""A `tokenizer.json` rebuilt from a GGUF file's tokenizer metadata (llama.cpp's keys).

Only byte-level BPE (`tokenizer.ggml.model = gpt2`) is supported: the vocabulary
(`tokens`, spelled in GPT-2's byte alphabet), the `merges`, and `token_type`, where control
tokens (3) become special added tokens and user-defined ones (4) plain added tokens, so
both stay whole in text. `tokenizer.ggml.pre` names how text is split before BPE; each
name maps to the split its vocabulary was trained with (llama.cpp's `llama-vocab.cpp`):

    gpt2, default : GPT-2's regex (ByteLevel's own)
    smollm        : every digit alone, then GPT-2's regex (SmolLM's tokenizer.json)
    llama-bpe ... : Llama 3's regex; qwen2 ...: Qwen2's

`add_bos_token` / `add_eos_token` decide the post-processor, so `encode` adds exactly the
special tokens the model expects and nothing more. transformers' own GGUF conversion
builds the same tokenizer (tests compare ids on varied text).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from common.model.config import ModelError

_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("gpt2", "default"):
        return _byte_level()
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), _byte_level()]
        )
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"):
        return _split_then_bytes(_LLAMA3_SPLIT)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _split_then_bytes(_QWEN2_SPLIT)
    raise ModelError(
        f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; "
        "supported: default, gpt2, smollm, llama-bpe (llama3), qwen2"
    )


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelled = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(256 + extra)
            extra += 1
    return spelled


def build_tokenizer(meta: Mapping[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer a GGUF's metadata describes, and its `tokenizer_config.json` (special
    token strings, `add_bos_token`, `chat_template`)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(
            f"unsupported GGUF tokenizer tokenizer.ggml.model={kind!r}; supported: gpt2 "
            "(byte-level BPE)"
        )
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ModelError("GGUF has no tokenizer.ggml.tokens")
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())

    def spell(token: str) -> str:
        # A token outside the byte alphabet (a mislabelled raw string) is respelled byte-wise.
        if set(token) <= letters:
            return token
        return "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab = {spell(t): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ModelError(f"GGUF merge {' '.join(bad[0])!r} is not a pair of tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()

    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind_ in zip(tokens, types, strict=False)
        if kind_ == _CONTROL and set(t) <= letters
    ]
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind_ in zip(tokens, types, strict=False)
        if kind_ == _USER_DEFINED and t in vocab
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    def token_of(key: str) -> str | None:
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is None:
            return None
        if not 0 <= int(tid) < len(tokens):
            raise ModelError(f"GGUF tokenizer.ggml.{key}={tid} is outside the vocabulary")
        return tokens[int(tid)]

    bos, eos = token_of("bos_token_id"), token_of("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tok.post_processor = _post_processor(
        (bos, vocab[spell(bos)]) if add_bos and bos is not None else None,
        (eos, vocab[spell(eos)]) if add_eos and eos is not None else None,
    )
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_of("unknown_token_id"),
        "pad_token": token_of("padding_token_id"),
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return tok, {k: v for k, v in config.items() if v is not None}


def _post_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.PostProcessor:
    head = [bos[0]] if bos else []
    tail = [eos[0]] if eos else []
    specials = [t for t in (bos, eos) if t is not None]
    return processors.TemplateProcessing(
        single=[*head, "$A", *tail],
        pair=[*head, "$A", *tail, *head, "$B:1", *tail],
        special_tokens=specials,
    )
