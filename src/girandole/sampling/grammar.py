"""Constrained decoding with xgrammar: JSON (any object or a schema), GBNF/EBNF and regex.

A `GrammarSpec` (plain data, from the request) is compiled once per distinct text by the
`GrammarCache` of a tokenizer; compiling happens in the caller's thread, off the engine loop.
Each constrained sequence holds its own `GrammarMatcher`; every step the engine fills one bitmask
row per constrained sequence and the Sampler applies it before choosing.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # annotations only: `import girandole` (the CLI's start) stays free of torch
    import torch

GrammarKind = Literal["json_object", "json_schema", "gbnf", "regex"]


@dataclass(frozen=True)
class GrammarSpec:
    kind: GrammarKind
    text: str = ""  # the schema as JSON text, the GBNF grammar or the regex; "" for json_object

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> GrammarSpec:
        text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
        return cls("json_schema", text)

    def describe(self) -> str:
        """The grammar as shown in raw_output.grammar."""
        return "json_object" if self.kind == "json_object" else self.text


class GrammarError(ValueError):
    """The grammar or schema is invalid or uses something the grammar engine does not support."""


COMPILER_CACHE_BYTES = 64 << 20  # xgrammar's compiler cache (it may exceed it slightly)


class GrammarCache:
    """Compiled grammars of one tokenizer, keyed by spec (LRU, bounded in entries and bytes)."""

    def __init__(
        self, tokenizer, vocab_size: int, max_entries: int = 256, max_bytes: int = 256 << 20
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (logits) vocabulary, may exceed the tokenizer's
        self.max_entries = max_entries
        # a schema near the size limits compiles to ~5 MB of token masks: 256 of them are GBs
        self.max_bytes = max_bytes
        self._compiler = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._sizes: dict[GrammarSpec, int] = {}
        self.num_bytes = 0  # the compiled grammars' memory_size_bytes, summed

    def _get_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            tok = self.tokenizer
            # Raw bytes per token; special tokens map to b"" so no grammar can ever emit them.
            vocab = [
                b"" if tok.is_special(i) else tok.token_bytes(i) for i in range(tok.vocab_size)
            ]
            info = xgr.TokenizerInfo(
                vocab,
                xgr.VocabType.RAW,
                vocab_size=self.vocab_size,
                stop_token_ids=list(tok.stop_token_ids),
            )
            # xgrammar's own cache keeps every grammar compiled (no limit by default): each
            # request's distinct schema stayed in memory for good. Without it each compile
            # takes 35x as long (it also caches the shared rules), so it is bounded instead
            self._compiler = xgr.GrammarCompiler(
                info, max_threads=1, cache_limit_bytes=COMPILER_CACHE_BYTES
            )
        return self._compiler

    def cached(self, spec: GrammarSpec):
        """The compiled grammar of `spec` if the cache holds it, else None, without compiling
        and without waiting (the first compile holds the lock while it builds the tokenizer's
        tables): a caller on the event loop takes a hit here instead of queueing for a compile
        thread behind other grammars' compiles."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
            return compiled
        finally:
            self._lock.release()

    def compile(self, spec: GrammarSpec):
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
            compiler = self._get_compiler()
        try:
            if spec.kind == "json_object":  # any JSON object, compact like the schema case
                compiled = compiler.compile_json_schema(
                    '{"type": "object"}', strict_mode=False, any_whitespace=False
                )
            elif spec.kind == "json_schema":
                try:
                    json.loads(spec.text)
                except json.JSONDecodeError as exc:
                    raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
                compiled = compiler.compile_grammar(schema_grammar(spec.text))
            elif spec.kind == "gbnf":
                compiled = compiler.compile_grammar(spec.text)
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.text)
            else:
                raise GrammarError(f"unknown grammar kind: {spec.kind}")
        except GrammarError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with a clear text
            raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {exc}") from exc
        with self._lock:
            if spec not in self._cache:  # another thread may have compiled it meanwhile
                self._cache[spec] = compiled
                self._sizes[spec] = size = compiled.memory_size_bytes
                self.num_bytes += size
            while len(self._cache) > 1 and (
                len(self._cache) > self.max_entries or self.num_bytes > self.max_bytes
            ):
                old, _ = self._cache.popitem(last=False)
                self.num_bytes -= self._sizes.pop(old)
        return compiled

    def __len__(self) -> int:
        return len(self._cache)


# xgrammar (0.2.9) writes a string with minLength/maxLength as characters of this class, which
# lets control characters (a raw tab) in: invalid JSON, refused by every JSON parser. Its
# unbounded strings already exclude them, as this replacement does.
_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


def schema_grammar(schema: str):
    """The xgrammar Grammar of a JSON schema's compact JSON (with free whitespace, small models
    can loop on blank space forever), its length-bounded strings without control characters."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, strict_mode=True, any_whitespace=False)
    text = str(grammar)
    if _BOUNDED_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


# CPU seconds one token's grammar work (its mask and its accept) may take for one sequence. The
# engine does it on its own thread while the whole batch waits, and an ambiguous grammar's cost
# grows with the output: `s ::= s s s | s s | "a"` took 25 ms at token 100 and 0.7 s at token
# 300 (cubic), which would stall every other request for hours. Ordinary grammars stay far below:
# at most ~2 ms a token on the default model's 262k vocabulary (a 2,000-value enum, 2,000
# properties, a 16,000-character regex).
TOKEN_CPU_LIMIT = 0.02


class SequenceGrammar:
    """One sequence's position in its grammar, and the CPU its last token's work took."""

    def __init__(self, compiled, spec: GrammarSpec) -> None:
        import xgrammar as xgr

        self.spec = spec
        self.matcher = xgr.GrammarMatcher(compiled)
        self._pending_cpu = 0.0  # the mask filled for the token not yet accepted
        self.last_token_cpu = 0.0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        start = time.thread_time()  # CPU time: a loaded host must not make a grammar "slow"
        self.matcher.fill_next_token_bitmask(bitmask, row)
        self._pending_cpu += time.thread_time() - start

    def accept(self, token_id: int) -> bool:
        start = time.thread_time()
        accepted = self.matcher.accept_token(token_id)
        self.last_token_cpu = self._pending_cpu + time.thread_time() - start
        self._pending_cpu = 0.0
        return accepted

    @property
    def too_slow(self) -> bool:
        """The last token's grammar work took more than `TOKEN_CPU_LIMIT`."""
        return self.last_token_cpu > TOKEN_CPU_LIMIT

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(batch, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the disallowed tokens of `logits[rows]` to -inf; bitmask row r masks logits row r."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
