"""IncrementalDetokenizer on the default GGUF tokenizer: token by token equals full decode."""

from __future__ import annotations

import random

import pytest

from girandole.tokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.slow


def stream(tok, ids, prompt_ids=None, skip_special_tokens=True, chunks=None) -> list[str]:
    det = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    pieces = []
    i = 0
    sizes = chunks or [1] * len(ids)
    for n in sizes:
        pieces.append(det.add(ids[i : i + n]))
        i += n
    assert i == len(ids)
    pieces.append(det.flush())
    return pieces


def test_token_by_token_equals_decode(tok, text):
    ids = tok.encode(text, add_bos=False)
    for skip in (True, False):
        pieces = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)  # valid text: never a broken character


def test_with_prompt_and_random_chunks(tok, text):
    prompt = tok.encode("A prompt that ends in a byte-fallback emoji 🌁")
    ids = tok.encode(text, add_bos=False) + [106]
    expected = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    rng = random.Random(len(text))
    chunks, left = [], len(ids)
    while left:
        chunks.append(min(left, rng.randint(1, 4)))
        left -= chunks[-1]
    assert "".join(stream(tok, ids, prompt, chunks=chunks)) == expected
    assert "".join(stream(tok, ids, prompt)) == expected


def test_emoji_over_byte_tokens_is_held_back(tok):
    ids = tok.encode("x🌁", add_bos=False)
    assert len(ids) == 5  # 'x' + four byte tokens
    det = IncrementalDetokenizer(tok)
    assert [det.add([i]) for i in ids] == ["x", "", "", "", "🌁"]
    assert det.flush() == ""


def test_invalid_bytes_come_out_as_replacement(tok):
    e2 = tok.token_to_id("<0xE2>")
    hello = tok.encode("hello", add_bos=False)
    det = IncrementalDetokenizer(tok)
    assert det.add([e2]) == ""
    out = "".join(det.add([i]) for i in hello) + det.flush()
    assert out == tok.decode([e2, *hello]) == "\ufffdhello"
    # a lone lead byte at the very end is only given up at flush
    det = IncrementalDetokenizer(tok)
    assert det.add(hello) == "hello"
    assert det.add([e2]) == ""
    assert det.flush() == "\ufffd"
    assert det.flush() == ""


def test_special_tokens(tok):
    ids = tok.encode("Hi<end_of_turn>\n", add_bos=False)
    assert "".join(stream(tok, ids)) == "Hi\n"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == "Hi<end_of_turn>\n"
    det = IncrementalDetokenizer(tok)
    assert det.add([]) == "" and det.add([1]) == "" and det.flush() == ""


def test_window_stays_small(tok):
    """The detokenizer keeps a bounded window, whatever the sequence length."""
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 🌁 " * 200, add_bos=False)
    det = IncrementalDetokenizer(tok, prompt_ids=list(range(1000, 3000)))
    out = []
    longest = 0
    for i in ids:
        out.append(det.add([i]))
        longest = max(longest, len(det._ids))
    assert "".join(out) + det.flush() == tok.decode(ids)
    assert longest <= 80


def test_a_broken_character_spoils_nothing_around_it(tok):
    """Invalid UTF-8 among byte tokens is one U+FFFD per broken sequence (as Python decodes it),
    and the valid characters of the same run of byte tokens stay: `tokenizers`' ByteFallback
    decoder made the whole run U+FFFDs, and a window that starts in the middle of a character
    (a prompt ending in byte-fallback emoji) then never showed a character at all."""
    b = {x: tok.token_to_id(f"<0x{x:02X}>") for x in range(256)}
    card = [b[x] for x in "🎴".encode()]  # a byte-fallback emoji
    assert tok.decode([*card, b[0xF0]]) == "🎴\ufffd"
    assert tok.decode([b[0x61], b[0xF0], *card, b[0xC3], b[0xA9]]) == "a\ufffd🎴é"
    assert tok.decode([b[0xB4], *card], skip_special_tokens=False) == "\ufffd🎴"
    prompt = tok.encode("🌁🎴🏑" * 3)
    assert tok.id_to_token(prompt[-5]).startswith("<0x")  # the window starts mid-character
    ids = card * 2 + [b[0xF0]]
    pieces = stream(tok, ids, prompt)
    assert pieces[3] == "🎴" and pieces[7] == "🎴"
    assert "".join(pieces) == "🎴🎴\ufffd" == tok.decode(ids)
