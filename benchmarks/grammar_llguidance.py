"""girandole.sampling.grammar on llguidance instead of xgrammar: the same interface, measured
beside it by `bench_grammar.py --compare benchmarks/grammar_llguidance.py` (`pip install
llguidance`). It passes the engine's grammar tests and the API's schema and tool-call tests
(messages of rejected grammars aside: they are llguidance's).

Constrained decoding with llguidance: JSON (any object or a schema), GBNF and regex.

A `GrammarSpec` (plain data, from the request) is compiled once per distinct text by the
`GrammarCache` of a tokenizer; compiling happens in the caller's thread, off the engine loop.
Each constrained sequence holds its own matcher (a copy of the compiled one); every step the
engine fills one bitmask row per constrained sequence and the Sampler applies it before choosing.

llguidance builds its token table from the tokenizer's raw token bytes (special tokens are never
part of a grammar's text), and needs neither transformers nor a GPU compiler.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance as llg
import numpy as np
import torch

from girandole.sampling.grammar import GrammarError, GrammarSpec  # the engine-neutral parts

# Compact JSON (one space after ':' and ','): with free whitespace, small models can loop on
# blank space forever.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# -- schemas --------------------------------------------------------------------------------------

_SCHEMA_VALUED = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


# String formats llguidance does not know, as the patterns they stand for (RFC 3986, 6570, 6901).
_URI_CHAR = r"([A-Za-z0-9\-._~!$&'()*+,;=:@/?#]|%[0-9A-Fa-f]{2})"
_TEMPLATE_VAR = r"([A-Za-z0-9_.]|%[0-9A-Fa-f]{2})+(:[1-9][0-9]{0,3}|\*)?"
_POINTER = r"(/([^/~]|~[01])*)*"
FORMAT_PATTERNS = {
    "uri-reference": _URI_CHAR + "*",
    "uri-template": (
        r"([^{}\"\\\x00-\x20<>^`|]|%[0-9A-Fa-f]{2}"
        rf"|\{{[+#./;?&=,!@|]?{_TEMPLATE_VAR}(,{_TEMPLATE_VAR})*\}})*"
    ),
    "json-pointer": _POINTER,
    "relative-json-pointer": rf"(0|[1-9][0-9]*)(#|{_POINTER})",
}


def strict_schema(schema: Any) -> Any:
    """`schema` as llguidance should enforce it. JSON Schema allows the properties and tuple
    items a schema does not name, and a small model then writes extra properties instead of
    closing the object: an object schema without `additionalProperties` gets `false`, an array
    with `prefixItems` and no `items` gets `items: false`. The formats of FORMAT_PATTERNS become
    their patterns, and `uniqueItems: false` (a no-op llguidance rejects) is dropped."""
    if isinstance(schema, list):  # draft-7 tuple `items`
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "uniqueItems" and value is False:
            continue
        if key in _SCHEMA_VALUED:
            value = strict_schema(value)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            value = [strict_schema(s) for s in value]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            value = {name: strict_schema(s) for name, s in value.items()}
        out[key] = value
    types = out.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types)
    if (is_object or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if "prefixItems" in out and "items" not in out:
        out["items"] = False
    fmt = out.get("format")
    pattern = FORMAT_PATTERNS.get(fmt) if isinstance(fmt, str) else None
    if pattern is not None:
        if "pattern" in out:
            raise GrammarError(f"format '{out['format']}' together with a pattern is not supported")
        del out["format"]
        out["pattern"] = pattern
    return out


# -- compiling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledGrammar:
    matcher: Any  # an llguidance LLMatcher at the grammar's start; each sequence copies it
    stop_ids: frozenset[int]  # the tokens that end the output once the grammar is complete


class GrammarCache:
    """Compiled grammars of one tokenizer, keyed by spec (LRU)."""

    def __init__(self, tokenizer, vocab_size: int, max_entries: int = 256) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (logits) vocabulary, may exceed the tokenizer's
        self.max_entries = max_entries
        self._ll_tokenizer = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()

    def _get_tokenizer(self):
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llg.LLTokenizer(
                _TokenTable(self.tokenizer, self.vocab_size),
                n_vocab=self.vocab_size,
                eos_token=list(self.tokenizer.stop_token_ids),
            )
            _warm_up(self._ll_tokenizer)
        return self._ll_tokenizer

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """`spec` compiled; GrammarError if it is invalid or uses what llguidance cannot
        enforce."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
            tokenizer = self._get_tokenizer()
        what = spec.kind.replace("_", " ")
        try:
            if spec.kind == "json_object":  # any JSON object
                grammar = llg.LLMatcher.grammar_from_json_schema(
                    '{"type": "object"}', overrides=_JSON_OPTIONS
                )
            elif spec.kind == "json_schema":
                try:
                    schema = json.loads(spec.text)
                except json.JSONDecodeError as exc:
                    raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
                grammar = llg.LLMatcher.grammar_from_json_schema(
                    json.dumps(strict_schema(schema)), overrides=_JSON_OPTIONS
                )
            elif spec.kind == "gbnf":
                grammar = llg.grammar_from("gbnf", spec.text)
            elif spec.kind == "regex":
                grammar = llg.LLMatcher.grammar_from_regex(spec.text)
            else:
                raise GrammarError(f"unknown grammar kind: {spec.kind}")
        except GrammarError:
            raise
        except Exception as exc:  # llguidance raises ValueError with a clear text
            raise GrammarError(f"invalid {what}: {exc}") from exc
        matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid {what}: {_first_line(matcher.get_error())}")
        compiled = CompiledGrammar(matcher, frozenset(self.tokenizer.stop_token_ids))
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return compiled


def _warm_up(tokenizer) -> None:
    """Compute one mask inside a JSON string. llguidance builds its tables for such wide masks
    on the first one a process needs; here, that cost joins the token table's (the first
    constrained request's) instead of landing in some later request's decode step."""
    grammar = llg.LLMatcher.grammar_from_json_schema('{"type": "string"}')
    matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
    matcher.consume_tokens(tokenizer.tokenize_str('"a'))
    matcher.compute_bitmask()


def _first_line(message: str) -> str:
    # llguidance's messages may go on with the parser state and the grammar, line by line
    return message.strip().split("\n<state>")[0].strip()


class _TokenTable:
    """The tokenizer as llguidance reads it: every id's raw bytes, the special ids (which no
    grammar text can produce) and an encoder."""

    is_tokenizer_wrapper = True

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.stop_token_ids[0] if tokenizer.stop_token_ids else None
        self.bos_token_id = tokenizer.bos_token_id
        n = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)] + [b""] * (vocab_size - n)
        self.special_token_ids = [i for i in range(n) if tokenizer.is_special(i)]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False, parse_special=False)


# -- decoding -------------------------------------------------------------------------------------


class SequenceGrammar:
    """One sequence's position in its grammar."""

    def __init__(self, compiled: CompiledGrammar, spec: GrammarSpec) -> None:
        self.spec = spec
        self.matcher = compiled.matcher.deep_copy()
        self._stop_ids = compiled.stop_ids
        self._terminated = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def accept(self, token_id: int) -> bool:
        ok = self.matcher.consume_token(token_id)
        # ended once it takes a stop token; llguidance also stops at a grammar's last byte,
        # where its mask then allows only the stop tokens
        self._terminated = ok and token_id in self._stop_ids
        return ok

    @property
    def is_terminated(self) -> bool:
        return self._terminated


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """One row of 32-bit words per sequence, bit i of the row = token i allowed."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


_NEG_INF_BITS = -8388608  # 0xFF800000: the bits of float32 -inf, as an int32
_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the disallowed tokens of `logits[rows]` to -inf; bitmask row r masks logits row r.

    The mask's bits become a float32 bias, 0 (allowed) or -inf, by integer arithmetic on the
    bit patterns ((bit - 1) & bits(-inf)), and the bias is added to the logits: vectorised
    passes only, where an element-wise masked fill is several times slower on CPU."""
    vocab = logits.shape[-1]
    words = bitmask[rows]
    if logits.device.type == "cpu":
        bits = torch.from_numpy(  # little-endian words: bit j of word w is token 32w + j
            np.unpackbits(words.numpy().view(np.uint8), axis=-1, bitorder="little")
        ).to(torch.int32)
    else:
        words = words.to(logits.device)
        bits = ((words.unsqueeze(-1) >> _SHIFTS.to(logits.device)) & 1).view(len(rows), -1)
    bias = bits[:, :vocab].sub_(1).bitwise_and_(_NEG_INF_BITS).view(torch.float32)
    bias = bias.to(logits.dtype)
    for i, r in enumerate(rows):
        logits[r].add_(bias[i])
