"""Streaming text equals the full decode; stop strings cut the text and nothing past them streams."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from common.detokenizer import IncrementalDetokenizer
from common.tokenizer import Tokenizer, build_byte_tokenizer

TOK = Tokenizer(build_byte_tokenizer())


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(min_size=0, max_size=40),
    split=st.lists(st.integers(1, 5), min_size=1, max_size=20),
)
def test_streamed_text_equals_full_decode(text: str, split: list[int]) -> None:
    ids = TOK.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(TOK, prompt_ids=TOK.encode("prompt"))
    streamed = ""
    i = 0
    for n in split * (len(ids) // max(1, sum(split)) + 1):
        if i >= len(ids):
            break
        chunk = detok.add(ids[i : i + n])
        assert "\ufffd" not in chunk or "\ufffd" in text
        streamed += chunk
        i += n
    streamed += detok.finish()
    assert streamed == text


def test_multibyte_characters_wait_for_their_last_byte() -> None:
    ids = TOK.encode("é€", add_special_tokens=False)
    assert len(ids) == 5
    detok = IncrementalDetokenizer(TOK)
    assert [detok.add([t]) for t in ids] == ["", "é", "", "", "€"]


def test_invalid_utf8_is_flushed_at_the_end() -> None:
    detok = IncrementalDetokenizer(TOK)
    assert detok.add([0xE2 + 3]) == ""  # a lone lead byte
    assert detok.finish() == "\ufffd"


def test_stop_string_cuts_text_and_holds_back_partial_matches() -> None:
    detok = IncrementalDetokenizer(TOK, stop=["STOP"])
    out = ""
    for ch in "hello ST":
        out += detok.add(TOK.encode(ch, add_special_tokens=False))
    assert out == "hello"  # " ST" may begin the stop string: held back
    assert detok.stopped_by is None
    out += detok.add(TOK.encode("OP and more", add_special_tokens=False))
    assert detok.stopped_by == "STOP"
    out += detok.finish()
    assert out == "hello "


def test_held_back_text_is_released_when_it_cannot_match() -> None:
    detok = IncrementalDetokenizer(TOK, stop=["STOP"])
    out = detok.add(TOK.encode("abcSTAB", add_special_tokens=False))
    assert out == "abcS"  # the last len('STOP') - 1 characters wait for more text
    out += detok.finish()
    assert out == "abcSTAB" and detok.stopped_by is None


def test_earliest_of_several_stop_strings_wins() -> None:
    detok = IncrementalDetokenizer(TOK, stop=["world", "lo"])
    text = detok.add(TOK.encode("hello world", add_special_tokens=False)) + detok.finish()
    assert text == "hel" and detok.stopped_by == "lo"
