"""`Marks`: the two characters that wrap user-supplied special-token strings in a rendered chat
(safe tokenization), so that the tokenizer reads those spans as plain text."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

# private-use code points, planes 15 and 16 first (rarely typed), then the BMP's (icon fonts)
_CANDIDATES = (range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE), range(0xE000, 0xF900))
_PRIVATE_USE = re.compile("[\ue000-\uf8ff\U000f0000-\U000ffffd\U00100000-\U0010fffd]")


class MarksExhausted(ValueError):
    """Every private-use character appears in the prompt's own strings: none is left to mark."""


@lru_cache(maxsize=16)
def _patterns(start: str, end: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    s, e = re.escape(start), re.escape(end)
    return re.compile(f"{s}(.*?){e}", re.DOTALL), re.compile(f"[{s}{e}]")


@dataclass(frozen=True)
class Marks:
    """A pair of private-use characters that no string of this prompt contains: a fixed pair
    would drop a user's own use of it (the text could not tell the two apart)."""

    start: str = "\U000f0000"
    end: str = "\U000f0001"

    @classmethod
    def avoiding(cls, texts: Iterable[str]) -> Marks:
        """The first free pair, in the order of `_CANDIDATES`, given every string of the prompt."""
        used: set[str] = set()
        for text in texts:
            # isascii is O(1) in CPython: most prompts skip the scan
            if not text.isascii() and _PRIVATE_USE.search(text) is not None:
                used.update(_PRIVATE_USE.findall(text))
        if not used:
            return cls()
        free = (c for c in map(chr, itertools.chain(*_CANDIDATES)) if c not in used)
        start, end = next(free, None), next(free, None)
        if start is None or end is None:
            raise MarksExhausted(
                "the messages use all but at most one private-use character (U+E000-U+F8FF, "
                "U+F0000-U+10FFFD); safe tokenization needs two free ones to mark the "
                "special-token spellings in them as text"
            )
        return cls(start, end)

    def wrap(self, text: str, pattern: re.Pattern[str]) -> str:
        """`text` with each match of `pattern` (special-token spellings) between the marks."""
        return pattern.sub(lambda m: f"{self.start}{m.group(0)}{self.end}", text)

    def strip(self, text: str) -> str:
        return text.replace(self.start, "").replace(self.end, "")

    def split(self, text: str) -> list[tuple[str, bool]]:
        """`text` in pieces, each (piece, marked); a lone mark (a template cut a marked span)
        still breaks the text, so that the text on either side cannot join into a control token."""
        spans, lone = _patterns(self.start, self.end)
        pieces: list[tuple[str, bool]] = []
        for i, part in enumerate(spans.split(text)):
            pieces.extend((piece, i % 2 == 1) for piece in lone.split(part) if piece)
        return pieces


DEFAULT_MARKS = Marks()
