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
    """

    __slots__ = ("stops", "include_stop", "_held", "_max_hold", "stopped", "matched")

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
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = min(self._max_hold, len(text))
        for k in range(longest, 0, -1):
            tail = text[-k:]
            for s in self.stops:
                if len(s) > k and s.startswith(tail):
                    return k
        return 0

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was hit."""
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
        """The held-back tail, at the end of generation without a stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
