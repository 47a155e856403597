"""Tokenizer wrapper over a `tokenizer.json` (the `tokenizers` library), shared by the gateway
and the in-process engine, plus the byte-level tokenizer of the embedded models.

The byte-level tokenizer maps every byte to one token (ids 3..258) after three specials
(<pad>=0, <s>=1, </s>=2); `encode` prepends <s> like Llama's tokenizers do. Any text round
trips; a random model may emit byte sequences that are not valid UTF-8, which `decode`
renders with U+FFFD.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

BYTE_SPECIALS = ("<pad>", "<s>", "</s>")


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, inner: _HFTokenizer):
        self._inner = inner

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{Path(folder)}: no tokenizer.json")
        try:
            return cls(_HFTokenizer.from_file(str(path)))
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"{path}: cannot load tokenizer: {exc}") from None

    @property
    def vocab_size(self) -> int:
        return int(self._inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_id(self, token: str) -> int | None:
        tid = self._inner.token_to_id(token)
        return None if tid is None else int(tid)


def build_byte_tokenizer() -> _HFTokenizer:
    """A byte-level BPE with no merges: one token per byte, specials first."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel.alphabet() is unordered; order by the byte each character stands for.
    byte_chars = sorted(alphabet, key=_byte_of_char)
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    vocab.update({ch: len(BYTE_SPECIALS) + i for i, ch in enumerate(byte_chars)})
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.add_special_tokens(list(BYTE_SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def _byte_of_char(ch: str) -> int:
    # GPT-2 byte-to-unicode map: printable bytes map to themselves, others to 256 + n.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
