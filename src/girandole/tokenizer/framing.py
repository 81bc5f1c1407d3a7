"""The special tokens a tokenizer's post-processor puts around one text or a pair of texts.

An encoder reads `[CLS] text [SEP]` (BERT) or `<s> text </s>` (RoBERTa), a cross-encoder
`[CLS] query [SEP] document [SEP]` with the document's tokens of type 1; Qwen3-Embedding's
tokenizer appends `<|endoftext|>`, whose state is the embedding. The server tokenizes without
special tokens (girandole.tokenizer.tokenizer) and frames the ids itself, so that a text too long
for the model is refused with a 400 instead of being cut by a truncation setting in
tokenizer.json, and token-id inputs are framed as text is. The frame is learnt by tokenizing a
probe text with and without the post-processor.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer

_PROBE_A, _PROBE_B = "hello", "world"


@dataclass(frozen=True)
class PairFrame:
    """[p0] A [p1] B [p2], with each piece's token types and those of A's and B's tokens."""

    pieces: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    piece_types: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    type_a: int
    type_b: int

    def join(self, a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
        """(ids, token type ids) of the pair."""
        (p0, p1, p2), (t0, t1, t2) = self.pieces, self.piece_types
        ids = [*p0, *a, *p1, *b, *p2]
        types = [*t0, *[self.type_a] * len(a), *t1, *[self.type_b] * len(b), *t2]
        return ids, types

    @property
    def num_special(self) -> int:
        return sum(len(p) for p in self.pieces)


def _find(ids: list[int], part: list[int], start: int = 0) -> int:
    for i in range(start, len(ids) - len(part) + 1):
        if ids[i : i + len(part)] == part:
            return i
    raise ValueError("the tokenizer's post-processor changes a text's own tokens")


def _plain(hf: HFTokenizer, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


def single_frame(hf: HFTokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prefix, suffix): the special ids the post-processor adds before and after one text."""
    whole = hf.encode(_PROBE_A, add_special_tokens=True).ids
    part = _plain(hf, _PROBE_A)
    at = _find(whole, part)
    return tuple(whole[:at]), tuple(whole[at + len(part) :])


def pair_frame(hf: HFTokenizer) -> PairFrame:
    """How the post-processor frames a pair (a cross-encoder's query and document)."""
    enc = hf.encode(_PROBE_A, _PROBE_B, add_special_tokens=True)
    ids, types = enc.ids, enc.type_ids
    a, b = _plain(hf, _PROBE_A), _plain(hf, _PROBE_B)
    ia = _find(ids, a)
    ib = _find(ids, b, ia + len(a))
    cuts = ((0, ia), (ia + len(a), ib), (ib + len(b), len(ids)))
    return PairFrame(
        tuple(tuple(ids[s:e]) for s, e in cuts),  # type: ignore[arg-type]
        tuple(tuple(types[s:e]) for s, e in cuts),  # type: ignore[arg-type]
        types[ia],
        types[ib],
    )
