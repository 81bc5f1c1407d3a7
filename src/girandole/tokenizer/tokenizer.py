"""`Tokenizer`: a `tokenizers.Tokenizer` plus the metadata the server needs around it."""

from __future__ import annotations

import codecs
import json
import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from girandole.engine.heap import release_free_heap
from girandole.tokenizer.harmony import kept_markers, with_markers_special
from girandole.tokenizer.marks import DEFAULT_MARKS, Marks
from girandole.tokenizer.meta import TokenizerMeta

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_decoder_map() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_kind(hf: HFTokenizer) -> str:
    """'byte_level' (GPT-2 style), 'sentencepiece' (▁ and <0xNN> byte fallback) or 'other'."""
    if hf.decoder is None:
        return "other"
    spec = json.loads(hf.decoder.__getstate__())
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte_level"
    if "ByteFallback" in types or "Metaspace" in types:
        return "sentencepiece"
    if any(p.get("type") == "Replace" and p.get("content") == " " for p in parts):
        return "sentencepiece"
    return "other"


def _byte_fallback_strip(hf: HFTokenizer) -> int | None:
    """For a sentencepiece decoder of the usual form, `Replace('▁', ' ')`, `ByteFallback`,
    `Fuse` and maybe a final `Strip(' ', n, 0)` (Llama 2, Mistral): n (0 without a Strip); its
    text is then the UTF-8 of the tokens' bytes less n leading spaces. None for any other."""
    if hf.decoder is None:
        return None
    spec = json.loads(hf.decoder.__getstate__())
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    types = [p.get("type") for p in parts]
    strip = 0
    if types and types[-1] == "Strip":
        last = parts.pop()
        if last.get("content") != " " or last.get("stop"):
            return None
        strip = int(last.get("start") or 0)
        types.pop()
    if types != ["Replace", "ByteFallback", "Fuse"]:
        return None
    replace = parts[0]
    if replace.get("pattern") != {"String": "\u2581"} or replace.get("content") != " ":
        return None
    return strip


# Texts longer than this are encoded through `encode_batch`, which lets go of the GIL while it
# works (`encode` holds it: a 2-million-character prompt tokenized in a worker thread stopped
# the server's event loop for a second; 40 ms this way). Short ones take the plain call.
GIL_FREE_CHARS = 4096
# The same for decoding: longer id lists go through `decode_batch` (`decode` holds the GIL: two
# million ids decoded in a worker thread stopped the event loop for 0.8 s).
GIL_FREE_IDS = 4096


# A text of more characters than this many per token of a limit is counted in pieces before it
# is tokenized whole (`more_tokens_than`): English runs about 5 per token.
COUNT_FIRST_CHARS_PER_TOKEN = 8
# The pieces it is counted in. A piece's tokens differ from the whole text's only next to its
# ends, by a few (1.9M characters: 366,257 tokens in 29 pieces, 366,233 whole); pieces are also
# quicker to tokenize than one long text (3.3 s against 6.0 s there).
COUNT_PIECE_CHARS = 65536
COUNT_SLACK_PER_PIECE = 16


def _encode(hf: HFTokenizer, text: str) -> list[int]:
    if len(text) <= GIL_FREE_CHARS:
        return hf.encode(text, add_special_tokens=False).ids
    return hf.encode_batch([text], add_special_tokens=False)[0].ids


def _stamp(path: Path | None) -> tuple[int, int] | None:
    """A file's size and modification time, or None where there is none."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class Tokenizer:
    """Encode/decode plus model metadata; built by `load_tokenizer` from a GGUF or HF folder.

    Attributes:
        hf: the underlying `tokenizers.Tokenizer` (thread-safe; shared, do not mutate).
        vocab_size: number of ids, added tokens included.
        bos_token_id / eos_token_id: ids or None; bos_token / eos_token: their strings.
        stop_token_ids: every end-of-generation id (EOS, EOT/EOM, and special tokens such as
            `<end_of_turn>`, `<|im_end|>`, `<|eot_id|>`; Gemma: [1, 106]).
        add_bos: whether `encode` prepends BOS by default (from the model's metadata).
        chat_template: the model's Jinja chat template, or None.
    """

    def __init__(
        self, hf: HFTokenizer, meta: TokenizerMeta, name: str = "", source: Path | None = None
    ) -> None:
        """`source`: the tokenizer.json `hf` was read from (but for its truncation and padding,
        which girandole turns off), for its plain copy to be read from too."""
        self.hf = hf
        self._source = source
        self._source_stamp = _stamp(source)
        self.meta = meta
        self.name = name
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = meta.bos_token_id
        self.eos_token_id: int | None = meta.eos_token_id
        self.bos_token: str | None = meta.bos_token
        self.eos_token: str | None = meta.eos_token
        self.stop_token_ids: list[int] = list(meta.stop_token_ids)
        self.add_bos: bool = meta.add_bos and meta.bos_token_id is not None
        self.chat_template: str | None = meta.chat_template
        added = hf.get_added_tokens_decoder()
        self._added: dict[int, str] = {i: a.content for i, a in added.items()}
        self._special: frozenset[int] = frozenset(i for i, a in added.items() if a.special)
        # gpt-oss's harmony markers: decoded as text, yet control strings to safe tokenization
        self._text_markers = kept_markers(hf)
        self._kind = _decoder_kind(hf)
        # byte-fallback tokenizers: the <0xNN> ids, whose runs `decode` reads itself
        self._strip = _byte_fallback_strip(hf)
        byte_ids = (hf.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self._byte_ids = frozenset(i for i in byte_ids if i is not None)
        if not self._byte_ids:
            self._strip = None
        self._bytes_cache: dict[int, bytes] = {}
        self._whole_cache: dict[int, bool] = {}  # per id: `_whole_text`
        self._plain_hf: HFTokenizer | None = None  # copy that reads special strings as text
        self._plain_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    # -- encode / decode ---------------------------------------------------------------------

    def encode(
        self, text: str, add_bos: bool | None = None, *, parse_special: bool = True
    ) -> list[int]:
        """Token ids of `text`.

        Special-token strings in the text (e.g. "<start_of_turn>") become their special ids, as
        llama.cpp and Fireworks do for raw prompts; with `parse_special=False` they are read as
        plain text instead (Fireworks' `safe_tokenization`). `add_bos=None` follows the model's
        metadata (`self.add_bos`). BOS is never doubled: if the text already starts with the BOS
        string (e.g. a rendered chat template), no second BOS is added. No EOS is ever appended.
        """
        hf = self.hf if parse_special else self._plain()
        return self._with_bos(_encode(hf, text), add_bos)

    def more_tokens_than(self, text: str, limit: int) -> bool:
        """Whether `text` surely has more than `limit` tokens, learnt by tokenizing it in pieces
        only until they hold twice `limit` (less the slack of their cuts): a text far too long
        for a context costs that much tokenizing, not all of it (1.9M characters of English
        for a 32k context: 1.3 s of the 6 s under load). False when it is short of that."""
        if len(text) <= limit * COUNT_FIRST_CHARS_PER_TOKEN:
            return False
        count = 0
        for start in range(0, len(text), COUNT_PIECE_CHARS):
            piece = text[start : start + COUNT_PIECE_CHARS]
            count += len(_encode(self.hf, piece)) - COUNT_SLACK_PER_PIECE
            if count > 2 * limit:
                return True
        return False

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def prepare_plain(self) -> None:
        """Build `_plain`'s copy now (a server, while it loads): building it holds the GIL for
        about a second, which a first Messages or safe_tokenization request would otherwise
        cost every request the server is running."""
        self._plain()

    def _plain(self) -> HFTokenizer:
        """A copy of `hf` that encodes special-token strings as text (built on first use)."""
        with self._plain_lock:
            if self._plain_hf is None:
                plain = self._plain_from_source() if not self._text_markers else None
                if plain is None:
                    text = self.hf.to_str()
                    if self._text_markers:
                        text = with_markers_special(text, self._text_markers)
                    plain = HFTokenizer.from_str(text)
                plain.encode_special_tokens = True
                self._plain_hf = plain
                release_free_heap()  # the parse's garbage, as much as the copy (engine/heap.py)
            return self._plain_hf

    def _plain_from_source(self) -> HFTokenizer | None:
        """`hf` read again from its file, or None (none, or it changed since `hf` was read: its
        size or modification time, as the tokenizer cache's keys are made): without writing
        `hf` out first (`to_str`, ~0.5 s for the default model's), the plain copy of a server's
        start takes 1.16-1.49 s instead of 1.65-1.82 (alternating, 3 each), holding the GIL."""
        if self._source_stamp is None or _stamp(self._source) != self._source_stamp:
            return None
        try:
            plain = HFTokenizer.from_file(str(self._source))
        except Exception:  # noqa: BLE001 - unreadable: `hf` itself will do
            return None
        plain.no_truncation()
        plain.no_padding()
        return plain

    def encode_marked(
        self, text: str, add_bos: bool | None = None, marks: Marks = DEFAULT_MARKS
    ) -> list[int]:
        """Encode text in which user-supplied special-token strings were wrapped in `marks`
        (see `chat_template.render_chat_prompt`): marked spans are read as plain text, the rest
        (the template's own control tokens) as usual. Marks never reach the ids."""
        ids: list[int] = []
        for piece, marked in marks.split(text):
            ids.extend(_encode(self._plain() if marked else self.hf, piece))
        return self._with_bos(ids, add_bos)

    @property
    def special_tokens(self) -> list[str]:
        """The strings of all special (control) tokens (harmony's markers among them)."""
        return [self._added[i] for i in sorted(self._special)] + sorted(self._text_markers)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """`encode` for many texts at once (tokenizers runs them in parallel)."""
        out = [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_token_id is not None:
            for ids in out:
                if not ids or ids[0] != self.bos_token_id:
                    ids.insert(0, self.bos_token_id)
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special (control) tokens are dropped when `skip_special_tokens`.
        Invalid UTF-8 from byte tokens becomes U+FFFD, one per maximal invalid subpart as
        Python's (and Unicode's) decoders do: valid characters around it stay as they are.

        (The `ByteFallback` decoder of `tokenizers` turns a whole run of byte tokens into
        U+FFFDs when any byte of it is invalid: 🎴 followed by the first byte of another emoji
        became five U+FFFDs, and a text whose first token is the middle of a character never
        came out at all. Runs of byte tokens are read from the tokens' bytes here instead.)"""
        ids = list(ids)
        if self._strip is not None and not self._byte_ids.isdisjoint(ids):
            special = self._special if skip_special_tokens else frozenset()
            raw = b"".join(self.token_bytes(i) for i in ids if i not in special)
            text = raw.decode("utf-8", errors="replace")
            stripped = len(text) - len(text.lstrip(" "))
            return text[min(stripped, self._strip) :]
        if len(ids) <= GIL_FREE_IDS:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        # `decode` holds the GIL (as `encode` does); `decode_batch` lets go of it
        return self.hf.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]

    # -- per-token views -----------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (e.g. '▁world', '<0xE2>', 'Ġworld'), not its text."""
        return self.hf.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """True for special (control) tokens: BOS/EOS/PAD, `<start_of_turn>`, `<|im_end|>`..."""
        return token_id in self._special

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for: a byte-fallback token `<0xE2>` gives
        b'\\xe2', '▁' gives a space, byte-level (GPT-2) pieces map back to their bytes, added and
        special tokens give their UTF-8 text; ids past the tokenizer's vocabulary (padded embedding
        rows) give b''. For logprobs `bytes` and grammar engines."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if token_id >= self.vocab_size:
            return b""  # the model's embedding may be padded past the tokenizer's vocabulary
        if token_id < 0:
            raise IndexError(f"token id {token_id} is negative")
        out = self._compute_token_bytes(token_id)
        self._bytes_cache[token_id] = out
        return out

    def _compute_token_bytes(self, token_id: int) -> bytes:
        added = self._added.get(token_id)
        piece = self.hf.id_to_token(token_id)
        if piece is None:
            return b""
        if self._kind == "sentencepiece":
            m = _BYTE_TOKEN.match(piece)
            if m is not None:
                return bytes([int(m.group(1), 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        if added is not None:
            return added.encode("utf-8")
        if self._kind == "byte_level":
            table = byte_level_decoder_map()
            try:
                return bytes(table[c] for c in piece)
            except KeyError:
                return piece.encode("utf-8")
        return self.hf.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def incomplete_tail(self, ids: Sequence[int]) -> int:
        """How many of the last `ids` hold the first bytes of a character that `ids` do not
        finish (a prompt given as ids and cut inside a byte-fallback emoji): 0 when they end on
        a character boundary (or in bytes that are invalid whatever follows). Text after such
        ids carries that character: the generated bytes that complete it, or U+FFFD."""
        if ids and self._whole_text(ids[-1]):
            return 0  # the usual case, per streamed token: ends on a boundary whatever came before
        tail = list(ids[-8:])
        raw = b"".join(self.token_bytes(i) for i in tail if not self.is_special(i))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(raw)
        pending = len(decoder.getstate()[0])
        count = 0
        while pending > 0 and count < len(tail):
            count += 1
            token = tail[-count]
            if not self.is_special(token):
                pending -= len(self.token_bytes(token))
        return count

    def _whole_text(self, token_id: int) -> bool:
        """Whether the token's bytes are non-empty valid UTF-8 of whole characters: after it,
        no character is unfinished (bytes left pending before it are broken by its first)."""
        whole = self._whole_cache.get(token_id)
        if whole is None:
            raw = b"" if self.is_special(token_id) else self.token_bytes(token_id)
            try:
                whole = bool(raw) and bool(raw.decode("utf-8"))
            except UnicodeDecodeError:
                whole = False
            self._whole_cache[token_id] = whole
        return whole

    def token_bytes_table(self) -> list[bytes]:
        """`token_bytes` of every id, index = id (for grammar engines: xgrammar's RAW vocab)."""
        return [self.token_bytes(i) for i in range(self.vocab_size)]

    def token_str(self, token_id: int) -> str:
        """The token's text as printed in logprobs `tokens`: its bytes decoded as UTF-8, or for a
        token that is not valid UTF-8 on its own (a lone byte of a multi-byte character) a form
        like 'bytes:\\xe2' (OpenAI's convention)."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
