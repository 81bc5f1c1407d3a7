"""Incremental detokenization for streaming: text out as token ids come in.

Decoding each token alone is wrong (sentencepiece spaces, byte-fallback tokens that are a piece
of one UTF-8 character, decoders that strip a leading space); decoding the whole sequence on
every step is O(n) per token. Like vLLM, we decode a small window: `prefix_offset..read_offset`
is text already emitted, `read_offset..` is new; the new text is the window's decode minus the
prefix's decode, and it is held back while it ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from girandole.tokenizer.tokenizer import Tokenizer

# how many prompt tokens seed the window (context for the first generated token)
INITIAL_WINDOW = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text pieces.

    `add(new_ids)` returns the text that became final since the last call. A multi-byte character
    split over byte tokens is held back until complete, so no piece ends in a broken character.
    Each call decodes only a few tokens (the window since the last emitted character), so the
    cost per token does not grow with the sequence. `flush()` at the end returns whatever is still
    held back (with U+FFFD only for bytes that really are invalid UTF-8).

    Concatenating all pieces equals `tok.decode(generated_ids)` when there is no prompt, and the
    continuation of `tok.decode(prompt_ids)` in `tok.decode(prompt_ids + generated_ids)` with one.
    Special tokens are dropped when `skip_special_tokens` (EOS/stop tokens never show as text).
    """

    __slots__ = (
        "_decode",
        "_ids",
        "_prefix_offset",
        "_read_offset",
        "_prefix_text",
        "skip_special_tokens",
    )

    def __init__(
        self,
        tok: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._decode = tok.decode
        self.skip_special_tokens = skip_special_tokens
        # keep only the prompt tail that seeds the window
        self._ids: list[int] = list(prompt_ids[-INITIAL_WINDOW:]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids, skip_special_tokens=skip_special_tokens)

    def add(self, new_ids: Sequence[int]) -> str:
        """New text since the last call (may be '' while a character is incomplete)."""
        if not new_ids:
            return ""
        ids = self._ids
        ids.extend(new_ids)
        text = self._decode(
            ids[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens
        )
        if text.endswith(_REPLACEMENT):
            return ""  # an incomplete character: wait for its next byte
        out = text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""
        # the window now starts at the first token not yet in the emitted prefix
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        self._prefix_text = self._decode(
            ids[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens
        )
        if self._prefix_offset > 64:  # drop ids no window will look at again
            del ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return out

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end becomes U+FFFD)."""
        ids = self._ids
        if self._read_offset >= len(ids):
            return ""
        text = self._decode(
            ids[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens
        )
        out = text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""
        self._prefix_offset = self._read_offset = len(ids)
        self._prefix_text = ""
        return out
