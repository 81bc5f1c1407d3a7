"""Turn the vocabulary stored in a GGUF file into a `tokenizers.Tokenizer` plus metadata.

A GGUF carries no `tokenizer.json`, only llama.cpp's `tokenizer.ggml.*` keys. For Gemma-family
files (`tokenizer.ggml.model='llama'`, architecture gemma/gemma2/gemma3) we build the tokenizer
ourselves with `tokenizers` alone; the result is the same `tokenizer.json`, byte for byte, as
transformers' GGUF conversion (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), which the
tests check. Any other tokenizer type falls back to that transformers conversion (the optional
`girandole[convert]` extra adds what it needs beside transformers); it is done once and cached by
`girandole.tokenizer.loader`.

Parsing the GGUF (about 9 s for Gemma's 262k vocabulary) is shared with the weight loader through
`girandole.model.loader.gguf_file.open_gguf`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from girandole.tokenizer.meta import TokenizerMeta, eog_token_ids

# llama.cpp token types (gguf.TokenType)
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_gguf_tokenizer_fields(reader: Any) -> dict[str, Any]:
    """The `tokenizer.ggml.*` keys of a parsed GGUF under short names (arrays as Python lists)."""
    keys = {
        "model": "tokenizer.ggml.model",
        "pre": "tokenizer.ggml.pre",
        "tokens": "tokenizer.ggml.tokens",
        "token_type": "tokenizer.ggml.token_type",
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
        "eot_token_id": "tokenizer.ggml.eot_token_id",
        "eom_token_id": "tokenizer.ggml.eom_token_id",
        "unk_token_id": "tokenizer.ggml.unknown_token_id",
        "pad_token_id": "tokenizer.ggml.padding_token_id",
        "add_bos_token": "tokenizer.ggml.add_bos_token",
        "add_eos_token": "tokenizer.ggml.add_eos_token",
        "add_space_prefix": "tokenizer.ggml.add_space_prefix",
        "chat_template": "tokenizer.chat_template",
    }
    out = {name: _field(reader, key) for name, key in keys.items()}
    out["architecture"] = _field(reader, "general.architecture")
    if out["tokens"] is None:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens (no vocabulary)")
    return out


def gguf_meta(fields: dict[str, Any]) -> TokenizerMeta:
    """Metadata (special ids, BOS flag, stop ids, chat template) from the GGUF tokenizer keys."""
    tokens: list[str] = fields["tokens"]
    types: list[int] = fields["token_type"] or [0] * len(tokens)
    add_bos = fields["add_bos_token"]
    if add_bos is None:
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
        add_bos = fields["model"] == "llama"
    bos, eos = fields["bos_token_id"], fields["eos_token_id"]
    stop: list[int] = []
    for tid in (eos, fields["eot_token_id"], fields["eom_token_id"]):
        if tid is not None and 0 <= tid < len(tokens) and tid not in stop:
            stop.append(int(tid))
    for tid in eog_token_ids(
        (i, t) for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_TYPE_CONTROL
    ):
        if tid not in stop:
            stop.append(tid)

    def name(tid: int | None) -> str | None:
        return tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None

    return TokenizerMeta(
        bos_token_id=bos,
        eos_token_id=eos,
        bos_token=name(bos),
        eos_token=name(eos),
        stop_token_ids=stop,
        add_bos=bool(add_bos),
        add_eos=bool(fields["add_eos_token"] or False),
        chat_template=fields["chat_template"],
        source="gguf",
    )


def _sentencepiece_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a merge-less vocabulary, best first, ranked by position in the file.

    Same result as transformers' `generate_merges(vocab, {token: -index})`: every split of a token
    into two in-vocabulary halves, ordered by the token's position, then longer left, longer right.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges: list[tuple[str, str, int]] = []
    for merge, index in vocab.items():
        local = []
        for cut in range(1, len(merge)):
            left, right = merge[:cut], merge[cut:]
            if left in vocab and right in vocab:
                local.append((left, right, index))
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    # transformers sorts by (-index, len(left), len(right)) descending; the sort is stable
    merges.sort(key=lambda m: (-m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def build_gemma_tokenizer(fields: dict[str, Any]) -> Tokenizer:
    """Gemma's sentencepiece-style BPE (byte fallback, spaces as '▁', no prefix space).

    Mirrors transformers' `gemma_tokenizer` GGUF builder: tokens made only of spaces are respelled
    with '▁' (as the merges expect), merges are rebuilt from the order of the vocabulary, control
    tokens become special added tokens and user-defined tokens plain added tokens.
    """
    raw: list[str] = fields["tokens"]
    types: list[int] = fields["token_type"] or [0] * len(raw)
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in raw]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk_id = fields["unk_token_id"]
    unk = raw[unk_id] if unk_id is not None else "<unk>"
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=_sentencepiece_merges(tokens),
            fuse_unk=True,
            unk_token=unk,
            dropout=None,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(
        pattern=" ", behavior="merged_with_previous", invert=False
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, ty in zip(raw, types)
            if ty == TOKEN_TYPE_CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(raw, types)
            if ty == TOKEN_TYPE_USER_DEFINED and t in vocab
        ]
    )
    bos_id = fields["bos_token_id"]
    add_bos = fields["add_bos_token"]
    if bos_id is not None and add_bos is not False:
        bos = raw[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    return tok


def _convert_with_transformers(path: Path, tokenizer_class: Any = None) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            f"converting this GGUF tokenizer needs transformers (pip install 'girandole[convert]'): {path}"
        ) from exc
    if tokenizer_class is not None:
        try:
            return tokenizer_class.from_pretrained(
                str(path.parent), gguf_file=path.name
            ).backend_tokenizer
        except Exception:  # noqa: BLE001 - AutoTokenizer's own way below says what is wrong
            pass
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return hf.backend_tokenizer


# general.architecture -> the model type transformers' GGUF config gets where the two differ
_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}


def _auto_tokenizer_class(architecture: str | None, name: str | None) -> Any:
    """The class AutoTokenizer picks for a GGUF of this architecture: the one registered for its
    model type, else TokenizersBackend. AutoTokenizer learns the model type by parsing the whole
    file with gguf's reader (~10 s for a 150k-token vocabulary: most of a first start); the class
    then reads only the tokenizer's keys. None where unsure (AutoTokenizer's full way is taken)."""
    try:
        from transformers import TokenizersBackend
        from transformers.models.auto.tokenization_auto import (
            TOKENIZER_MAPPING_NAMES,
            tokenizer_class_from_name,
        )
    except ImportError:  # another transformers: its own way
        return None
    if not architecture or "t5" in architecture:
        return None
    model_type = _MODEL_TYPES.get(architecture, architecture)
    if "llama" in architecture and "mistral" in (name or "").lower():
        return None  # transformers reads it as mistral, with Mistral's own checks
    class_name = TOKENIZER_MAPPING_NAMES.get(model_type)
    if class_name is None:
        return TokenizersBackend
    if "Mistral" in class_name:
        return None
    return tokenizer_class_from_name(class_name)


def convert_gguf(path: str | os.PathLike) -> tuple[Tokenizer, TokenizerMeta]:
    """Build the tokenizer and metadata of a GGUF file (slow: parses the file; cache the result)."""
    from girandole.model.loader.gguf_file import open_gguf

    path = Path(path)
    reader = open_gguf(path)
    fields = read_gguf_tokenizer_fields(reader)
    meta = gguf_meta(fields)
    if fields["model"] == "llama" and fields["architecture"] in _GEMMA_ARCHS:
        tok = build_gemma_tokenizer(fields)
    else:
        tok_class = _auto_tokenizer_class(fields["architecture"], _field(reader, "general.name"))
        tok = _convert_with_transformers(path, tok_class)
    return tok, meta
