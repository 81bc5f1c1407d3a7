"""StopStringMatcher: pure text, and over streamed Gemma tokens."""

from __future__ import annotations

import itertools

import pytest

from girandole.tokenizer import IncrementalDetokenizer, StopStringMatcher


def run(stops, pieces, include_stop=False):
    m = StopStringMatcher(stops, include_stop=include_stop)
    out = []
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            return "".join(out), True, m
    out.append(m.flush())
    return "".join(out), False, m


def all_splits(text: str, parts: int = 3):
    """Every way to cut `text` into up to `parts` pieces."""
    n = len(text)
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = [0, *cuts, n]
        yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_no_stops_passes_through():
    assert run([], ["a", "b"])[:2] == ("ab", False)
    m = StopStringMatcher(None)
    assert m.feed("abc") == ("abc", False) and m.flush() == ""
    m = StopStringMatcher(["", ""])  # empty stop strings are ignored
    assert m.feed("abc") == ("abc", False)


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_split_every_way(include_stop):
    text = "Hello world\n\nUser: more text"
    expected = "Hello world\n\nUser:" if include_stop else "Hello world"
    for pieces in all_splits(text, 3):
        out, stopped, m = run(["\n\nUser:"], pieces, include_stop)
        assert (out, stopped) == (expected, True), pieces
        assert m.matched == "\n\nUser:"


def test_stop_split_char_by_char_and_held_back():
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc S") == ("abc ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("O") == ("", False)
    assert m.feed("x") == ("STOx", False)  # not a stop after all: released
    assert m.feed("ST") == ("", False)
    assert m.feed("OP and the rest") == ("", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_flush_returns_held_tail():
    m = StopStringMatcher(["</s>"])
    assert m.feed("end </") == ("end ", False)
    assert m.flush() == "</"


def test_earliest_completed_stop_wins_regardless_of_chunking():
    stops = ["abcd", "bc", "zz"]
    text = "xxabcdzz"
    results = {run(stops, pieces)[0] for pieces in all_splits(text, 3)}
    assert results == {"xxa"}
    assert run(stops, [text], include_stop=True)[0] == "xxabc"
    # a longer stop that completes at the same character as a shorter one: the longer wins
    assert run(["abc", "bc"], ["xabcy"], include_stop=True)[0] == "xabc"


def test_overlapping_prefixes():
    # "aab": after "aa" the tail "a" and "aa" are both candidate starts
    assert run(["aab"], ["a", "a", "a", "b", "c"])[:2] == ("a", True)
    out, stopped, _ = run(["aab"], ["aaaac"])
    assert (out, stopped) == ("aaaac", False)


def test_unicode_stop():
    out, stopped, _ = run(["🌁"], ["snow ", "🌁", " fog"])
    assert (out, stopped) == ("snow ", True)


@pytest.mark.slow
def test_stop_across_tokens_with_detokenizer(tok):
    """A stop string spread over several tokens (incl. byte tokens) is caught and trimmed."""
    text = "The answer is 42.\n\n###🌁 END of answer\nnext"
    ids = tok.encode(text, add_bos=False)
    for stop, expected in [
        ("\n\n###", "The answer is 42."),
        ("###🌁 END", "The answer is 42.\n\n"),
        ("🌁", "The answer is 42.\n\n###"),
        ("answer\nnext", "The answer is 42.\n\n###🌁 END of "),
        ("nowhere", text),
    ]:
        det = IncrementalDetokenizer(tok)
        m = StopStringMatcher([stop])
        out, stopped = [], False
        for i in ids:
            piece, stopped = m.feed(det.add([i]))
            out.append(piece)
            if stopped:
                break
        if not stopped:
            piece, stopped = m.feed(det.flush())
            out.append(piece)
            out.append(m.flush())
        assert "".join(out) == expected, stop
        assert stopped == (stop != "nowhere")
