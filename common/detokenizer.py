"""Incremental detokenization and stop strings for streaming text.

Decoding token by token breaks multi-byte characters and tokenizers that merge spaces, so
the detokenizer re-decodes a short window of tokens (`prefix_offset:`) and emits only the
text past what it already emitted, holding back a trailing U+FFFD (an unfinished UTF-8
sequence). Stop strings are searched in the full text; the last `max(len(stop)) - 1`
characters are held back until they cannot start a match, so a client never receives text
that a later stop string would have cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.tokenizer import Tokenizer

# Prompt tokens decoded with the first outputs, so leading-space rules see their context.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ):
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._skip = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""  # all output text decoded so far (cut at a stop string once matched)
        self._emitted = 0
        self.stopped_by: str | None = None

    def add(self, new_ids: Sequence[int]) -> str:
        """Feed new token ids; return the text that may be streamed now."""
        if self.stopped_by is not None:
            return ""
        for tid in new_ids:
            self._ids.append(tid)
            self._decode_step()
            if self._stop and self._check_stop():
                break
        return self._drain(final=self.stopped_by is not None)

    def finish(self) -> str:
        """At the end of the request: flush held-back text (even an unfinished character)."""
        if self.stopped_by is None and self._read_offset < len(self._ids):
            tail = self._decode(self._ids[self._prefix_offset :])
            head = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self.text += tail[len(head) :]
            self._read_offset = len(self._ids)
        return self._drain(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _decode_step(self) -> None:
        head = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(head) and not full.endswith("\ufffd"):
            self.text += full[len(head) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def _check_stop(self) -> bool:
        # Only the tail can hold a new match: search from where the last match could start.
        start = max(0, self._emitted - self._hold)
        best: tuple[int, str] | None = None
        for s in self._stop:
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return False
        self.text = self.text[: best[0]]
        self.stopped_by = best[1]
        return True

    def _drain(self, final: bool) -> str:
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
