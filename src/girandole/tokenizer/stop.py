"""Stop strings over streamed text."""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    """Finds stop strings in text that arrives in pieces (detokenizer output).

    `feed(text)` returns `(safe_text, stopped)`. Text that could be the start of a stop string is
    held back until it is known not to be one, so a stop string split over many pieces is still
    caught and never partly emitted. On a stop, the emitted text ends just before the stop string
    (Fireworks' current behaviour) or just after it with `include_stop=True` (old Fireworks
    behaviour); everything after it is dropped and later feeds return `("", True)`.
    `flush()` at the end of generation (no stop hit) returns the held-back tail.

    When several stop strings occur, the one that completes first in the text wins (ties: the one
    starting first), so the result does not depend on how the text was split into pieces.
    `matched` is the stop string that matched, or None (Fireworks/vLLM `stop_reason`).

    Each stop string has a KMP matcher: its state is the length of the longest tail of the text
    that is a proper prefix of the stop. The held-back tail is the longest of these prefixes, kept
    as (stop index, length) rather than a copy, so a feed costs O(piece length) per stop however
    long the held tail is (linear in the text fed, not quadratic in a long stop's held prefix).
    """

    __slots__ = (
        "stops",
        "include_stop",
        "_firsts",
        "_states",
        "_borders",
        "_held_stop",
        "_held_len",
        "stopped",
        "matched",
    )

    def __init__(self, stops: Iterable[str] | None, include_stop: bool = False) -> None:
        self.stops: list[str] = sorted({s for s in (stops or []) if s}, key=len)
        self.include_stop = include_stop
        # per stop: KMP state (matched prefix length) and its prefix function, extended lazily
        # (only as far as the state has reached, so a huge stop costs nothing up front)
        self._states: list[int] = [0] * len(self.stops)
        self._firsts = tuple({s[0] for s in self.stops})  # characters a stop can start with
        self._borders: list[list[int]] = [[0] for _ in self.stops]
        # the held-back text is self.stops[_held_stop][:_held_len]
        self._held_stop = 0
        self._held_len = 0
        self.stopped = False
        self.matched: str | None = None

    def _scan(self, k: int, text: str) -> int:
        """Runs stop k's KMP over `text` from its state: the end in `text` of the stop's first
        completion, or -1 with the state updated."""
        s = self.stops[k]
        n, last = len(text), len(s)
        first = s[0]
        border = self._borders[k]
        j = self._states[k]
        i = 0
        if not j:
            i = text.find(first)
            if i < 0:
                return -1
        while i < n:
            c = text[i]
            while j and s[j] != c:
                if j > len(border):
                    _extend_borders(s, border, j)
                j = border[j - 1]
            if s[j] == c:
                j += 1
                if j == last:
                    return i + 1
            i += 1
            if not j:
                # nothing pending: skip to where the stop could start (str.find runs in C)
                i = text.find(first, i)
                if i < 0:
                    break
        self._states[k] = j
        return -1

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was hit."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        if not self._held_len:
            # the common case, nothing held: a piece in which no stop can start passes (C scans)
            for c in self._firsts:
                if c in text:
                    break
            else:
                return text, False
        stops = self.stops
        states = self._states
        best, best_end = -1, -1  # the stop completing first, its end in `text`
        hold, hold_stop = 0, 0
        for k, s in enumerate(stops):
            j = states[k]
            if j and s.startswith(text, j):
                # the whole piece continues the pending match (a long stop's prefix): O(piece)
                j += len(text)
                if j == len(s):
                    end = len(text)
                else:
                    states[k] = j
                    if j > hold:
                        hold, hold_stop = j, k
                    continue
            elif not j and s[0] not in text:
                continue  # the common case: no stop starts in this piece
            else:
                end = self._scan(k, text)
                if end < 0:
                    j = states[k]
                    if j > hold:
                        hold, hold_stop = j, k
                    continue
            # sorted by length: on the same end the later (longer) stop started first
            if best_end < 0 or end <= best_end:
                best, best_end = k, end
        held_len, held_stop = self._held_len, self._held_stop
        if best >= 0:
            stop = stops[best]
            self.stopped, self.matched, self._held_len = True, stop, 0
            cut = best_end if self.include_stop else best_end - len(stop)
        else:
            self._held_len, self._held_stop = hold, hold_stop
            cut = len(text) - hold
        # emit (held + text)[: held_len + cut] without copying more than is emitted
        if cut <= 0:
            return stops[held_stop][: held_len + cut], best >= 0
        if held_len:
            return stops[held_stop][:held_len] + text[:cut], best >= 0
        return (text if cut == len(text) else text[:cut]), best >= 0

    def flush(self) -> str:
        """The held-back tail, at the end of generation without a stop."""
        held_len, self._held_len = self._held_len, 0
        self._states = [0] * len(self.stops)  # the held tail is gone: a later feed starts afresh
        if self.stopped or not held_len:
            return ""
        return self.stops[self._held_stop][:held_len]


def _extend_borders(s: str, border: list[int], upto: int) -> None:
    """Extends the KMP prefix function `border` of `s` (border[q]: length of the longest proper
    border of s[: q + 1]) to `upto` entries; amortized O(1) per entry."""
    q = len(border)
    b = border[q - 1]
    while q < upto:
        c = s[q]
        while b and s[b] != c:
            b = border[b - 1]
        if s[b] == c:
            b += 1
        border.append(b)
        q += 1
