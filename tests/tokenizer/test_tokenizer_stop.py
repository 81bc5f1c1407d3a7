"""StopStringMatcher: pure text, and over streamed Gemma tokens."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

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


class _ReferenceMatcher:
    """The matcher before its KMP rewrite (str.find over the whole held buffer per feed): the
    specification the differential test holds the new one to."""

    def __init__(self, stops: Iterable[str] | None, include_stop: bool = False) -> None:
        self.stops: list[str] = sorted({s for s in (stops or []) if s}, key=len)
        self.include_stop = include_stop
        self._held = ""
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self.stopped = False
        self.matched: str | None = None

    def _find(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stops:
            i = text.find(s)
            if i >= 0:
                cand = (i + len(s), i, s)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        return None if best is None else (best[1], best[2])

    def _hold_len(self, text: str) -> int:
        longest = min(self._max_hold, len(text))
        for k in range(longest, 0, -1):
            tail = text[-k:]
            for s in self.stops:
                if len(s) > k and s.startswith(tail):
                    return k
        return 0

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        found = self._find(buf)
        if found is not None:
            start, stop = found
            self.stopped, self.matched, self._held = True, stop, ""
            return buf[: start + len(stop)] if self.include_stop else buf[:start], True
        k = self._hold_len(buf)
        if k:
            self._held = buf[-k:]
            return buf[:-k], False
        self._held = ""
        return buf, False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _random_pieces(rng: random.Random, text: str) -> list[str]:
    """`text` cut at random places, with empty pieces now and then."""
    pieces, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 2, 3, 4, 7, 20])
        pieces.append(text[i : i + n])
        i += n
    return pieces


@pytest.mark.parametrize("alphabet", ["ab", "abc", "a🌁é\n"])
def test_matches_reference_on_random_text(alphabet):
    rng = random.Random(alphabet)

    def word(lo: int, hi: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))

    for case in range(1500):
        stops = [word(1, 5) for _ in range(rng.randint(0, 4))]
        if stops and rng.random() < 0.3:  # a stop that is a prefix or suffix of another
            s = rng.choice(stops)
            stops.append(
                s[: rng.randint(1, len(s))] if rng.random() < 0.5 else s[-rng.randint(1, len(s)) :]
            )
        if rng.random() < 0.2:
            stops += ["aab", "abab", ""]  # self-overlapping stops, and an ignored empty one
        text = word(0, 40)
        if stops and rng.random() < 0.5:  # plant a stop, often preceded by a partial one
            s = rng.choice([s for s in stops if s] or ["a"])
            at = rng.randint(0, len(text))
            text = text[:at] + s[: rng.randint(0, len(s))] + s + text[at:]
        include_stop = rng.random() < 0.5
        new, ref = StopStringMatcher(stops, include_stop), _ReferenceMatcher(stops, include_stop)
        pieces = _random_pieces(rng, text)
        for p in pieces + ["", "b", "ab"]:  # feeds after a stop return ("", True)
            got, want = new.feed(p), ref.feed(p)
            assert got == want, (case, stops, include_stop, pieces, p)
            assert (new.stopped, new.matched) == (ref.stopped, ref.matched), (case, stops, pieces)
        assert new.flush() == ref.flush(), (case, stops, pieces)
        # the outcome does not depend on the split
        assert run(stops, [text], include_stop)[:2] == run(stops, pieces, include_stop)[:2]


def test_matches_reference_after_flush():
    """A feed after flush starts afresh (the held tail was handed out), as before."""
    new, ref = StopStringMatcher(["abc"]), _ReferenceMatcher(["abc"])
    for p in ["xab", None, "c", "ab", "c"]:
        if p is None:
            assert new.flush() == ref.flush() == "ab"
        else:
            assert new.feed(p) == ref.feed(p)


@pytest.mark.parametrize("include_stop", [False, True])
def test_long_stop_prefix_held_in_small_pieces(include_stop):
    """A 100,000-character stop whose prefix comes 1-4 characters a piece is held back whole,
    then released on a mismatch (and its tail kept if that can still start the stop), or
    stopped on."""
    rng = random.Random(7)
    stop = "".join(rng.choice("xyz ") for _ in range(100_000))

    def feed_prefix(m: StopStringMatcher, upto: int) -> None:
        i = 0
        while i < upto:
            n = min(rng.randint(1, 4), upto - i)
            assert m.feed(stop[i : i + n]) == ("", False)
            i += n

    m = StopStringMatcher([stop, "END"], include_stop)
    assert m.feed("intro ") == ("intro ", False)
    feed_prefix(m, len(stop) - 1)
    assert m.flush() == stop[:-1]  # everything was held back

    # a mismatch after the long prefix: the held text comes out, bar a tail that may start it
    m, ref = StopStringMatcher([stop, "END"], include_stop), _ReferenceMatcher([stop, "END"])
    feed_prefix(m, 60_000)
    ref.feed(stop[:60_000])
    out, stopped = m.feed("#")
    assert (out, stopped) == ref.feed("#") and out == stop[:60_000] + "#"
    feed_prefix(m, len(stop) - 1)
    assert m.feed(stop[-1] + " after") == (stop if include_stop else "", True)
    assert m.matched == stop
    # a short stop completing inside the long stop's held prefix wins
    m = StopStringMatcher([stop, stop[10:13]], include_stop)
    feed_prefix(m, 12)
    assert m.feed(stop[12:16]) == ((stop[:13] if include_stop else stop[:10]), True)
    assert m.matched == stop[10:13]
