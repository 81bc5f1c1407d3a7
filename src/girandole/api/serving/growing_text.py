"""Text that grows a piece at a time on an object (a stream's output so far), grown in place."""

from __future__ import annotations


def append_text(obj: object, name: str, piece: str) -> None:
    """`obj.<name> += piece`, without copying the text so far: CPython resizes a str in place
    only when a local variable holds its one reference, never an attribute's, so `+=` on the
    attribute copied the whole text at every token (quadratic over a long stream: up to
    400 us a token at 300,000 tokens)."""
    text = getattr(obj, name)
    setattr(obj, name, "")
    text += piece
    setattr(obj, name, text)
