"""gpt-oss's tokenizer (o200k_harmony): the markers that structure its "harmony" messages are
special tokens, which decoding drops; the chat output needs them to tell the reasoning
(`analysis` channel) from the answer (`final`), as Qwen3's needs `<think>` (api/chat/harmony.py).
Here they are made ordinary added tokens: still one token each, encoded from their text as
before, but decoded as text, and not end-of-generation tokens (`<|end|>` ends a message, not the
answer; `<|return|>` and `<|call|>` stay special: they end generation and never show)."""

from __future__ import annotations

import json

from tokenizers import Tokenizer as HFTokenizer

# The markers decoding keeps as text.
HARMONY_MARKERS = frozenset({"<|start|>", "<|end|>", "<|channel|>", "<|message|>", "<|constrain|>"})
# A vocabulary with these is harmony's.
_SIGNATURE = ("<|channel|>", "<|message|>", "<|return|>")


def is_harmony_vocab(hf: HFTokenizer) -> bool:
    return all(hf.token_to_id(t) is not None for t in _SIGNATURE)


def kept_markers(hf: HFTokenizer) -> frozenset[str]:
    """The harmony markers `hf` decodes as text (keep_harmony_markers'); empty for others."""
    if not is_harmony_vocab(hf):
        return frozenset()
    added = hf.get_added_tokens_decoder().values()
    return frozenset(a.content for a in added if a.content in HARMONY_MARKERS and not a.special)


def with_markers_special(hf_json: str, markers: frozenset[str]) -> str:
    """A tokenizer's JSON with `markers` special again: the copy that reads user-supplied
    special strings as text (safe tokenization) reads these as text too."""
    data = json.loads(hf_json)
    for token in data.get("added_tokens", []):
        if token.get("content") in markers:
            token["special"] = True
    return json.dumps(data)


def keep_harmony_markers(hf: HFTokenizer) -> HFTokenizer:
    """`hf` with harmony's markers as non-special added tokens; `hf` itself for any other
    vocabulary."""
    if not is_harmony_vocab(hf):
        return hf
    data = json.loads(hf.to_str())
    changed = False
    for token in data.get("added_tokens", []):
        if token.get("content") in HARMONY_MARKERS and token.get("special"):
            token["special"] = False
            changed = True
    if not changed:
        return hf
    out = HFTokenizer.from_str(json.dumps(data))
    out.no_truncation()
    out.no_padding()
    return out
