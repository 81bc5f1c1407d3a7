"""The default GGUF's tokenizer against transformers' GGUF conversion, plus the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from girandole.tokenizer.tokenizer import GIL_FREE_CHARS, GIL_FREE_IDS

pytestmark = pytest.mark.slow


def test_metadata(tok):
    assert tok.vocab_size == 262144
    assert (tok.bos_token_id, tok.eos_token_id) == (2, 1)
    assert (tok.bos_token, tok.eos_token) == ("<bos>", "<eos>")
    assert tok.stop_token_ids == [1, 106]
    assert tok.add_bos is True
    assert tok.chat_template is None
    assert tok.is_special(2) and tok.is_special(105) and tok.is_special(106) and tok.is_special(0)
    assert not tok.is_special(107)  # "\n" is user-defined, not special
    assert not tok.is_special(9259)


def test_known_ids(tok):
    assert tok.encode("<bos>Hello world") == [2, 9259, 1902]
    assert tok.encode("Hello world") == [2, 9259, 1902]
    assert tok.encode("Hello world", add_bos=False) == [9259, 1902]
    assert tok.encode("<start_of_turn>user\nHello<end_of_turn>\n") == [
        2, 105, 2364, 107, 9259, 106, 107,
    ]  # fmt: skip
    assert tok.encode("") == [2]
    assert tok.encode("", add_bos=False) == []


def test_same_tokenizer_json_as_transformers(tok, ref):
    """Our own GGUF build is the very tokenizer transformers builds."""
    ours = json.loads(tok.hf.to_str())
    theirs = json.loads(ref.backend_tokenizer.to_str())
    assert ours == theirs


def test_encode_decode_match_transformers(tok, ref, text):
    ids = tok.encode(text, add_bos=False)
    assert ids == ref(text, add_special_tokens=False).input_ids
    with_bos = tok.encode(text)
    assert with_bos == (ids if ids[:1] == [2] else [2, *ids])
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    if "<" not in text:  # no special-token strings: decode is the exact inverse
        assert tok.decode(ids) == text


def test_encode_batch(tok, texts):
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_long_texts_encode_as_transformers_does(tok, ref, texts):
    """Texts past GIL_FREE_CHARS go through `encode_batch` (which lets go of the GIL): the same
    ids as transformers', special-token strings read as special or, plain, as text."""
    long = "\n".join(texts) * (GIL_FREE_CHARS // len("\n".join(texts)) + 2)
    assert len(long) > GIL_FREE_CHARS
    assert tok.encode(long, add_bos=False) == ref(long, add_special_tokens=False).input_ids
    plain = tok.encode(long, add_bos=False, parse_special=False)
    assert plain == tok._plain().encode(long, add_special_tokens=False).ids
    assert plain != tok.encode(long, add_bos=False)  # "<start_of_turn>" is text there
    marked = tok.encode_marked(long)
    assert marked == tok.encode(long)


def test_long_id_lists_decode_without_the_gil(tok, monkeypatch):
    """Id lists past GIL_FREE_IDS go through `decode_batch` (which lets go of the GIL; `decode`
    held it for 0.8 s of the event loop on two million ids): the same text, specials kept or
    skipped."""
    ids = tok.encode("<start_of_turn>user\nHello world, how are you?<end_of_turn>\n")
    ids = ids * (GIL_FREE_IDS // len(ids) + 2)
    expected = [tok.hf.decode(ids, skip_special_tokens=skip) for skip in (False, True)]
    calls = []

    class Spy:
        def __init__(self, hf):
            self._hf = hf

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self._hf, name)

    monkeypatch.setattr(tok, "hf", Spy(tok.hf))
    assert [tok.decode(ids, skip_special_tokens=skip) for skip in (False, True)] == expected
    assert calls == ["decode_batch", "decode_batch"]
    calls.clear()
    tok.decode(ids[:10])
    assert calls == ["decode"]


def test_token_bytes_concatenate_to_text(tok, text):
    ids = tok.encode(text, add_bos=False)
    joined = b"".join(tok.token_bytes(i) for i in ids)
    assert joined == tok.decode(ids, skip_special_tokens=False).encode("utf-8")
    if "\u2581" not in text:  # a literal '▁' reads back as a space (as in decode)
        assert joined == text.encode("utf-8")


def test_token_bytes_and_str(tok):
    byte_e2 = tok.token_to_id("<0xE2>")
    assert tok.token_bytes(byte_e2) == b"\xe2"
    assert tok.token_str(byte_e2) == "bytes:\\xe2"
    a = tok.token_to_id("<0x41>")
    assert tok.token_bytes(a) == b"A" and tok.token_str(a) == "A"
    world = tok.encode(" world", add_bos=False)
    assert len(world) == 1
    assert tok.token_bytes(world[0]) == b" world" and tok.token_str(world[0]) == " world"
    assert tok.token_bytes(106) == b"<end_of_turn>"
    assert tok.token_str(107) == "\n"
    spaces = tok.encode("    ", add_bos=False)
    assert [tok.token_str(i) for i in spaces] == ["    "]
    assert tok.token_bytes(tok.vocab_size + 5) == b"" and tok.token_str(tok.vocab_size) == ""
    with pytest.raises(IndexError):
        tok.token_bytes(-1)
    table = tok.token_bytes_table()
    assert (
        len(table) == tok.vocab_size
        and table[byte_e2] == b"\xe2"
        and table[106] == b"<end_of_turn>"
    )


def test_emoji_uses_byte_tokens(tok):
    """At least one emoji falls back to byte tokens: the detokenizer tests rely on it."""
    ids = tok.encode("🌁🎴", add_bos=False)
    pieces = [tok.id_to_token(i) for i in ids]
    assert len(ids) == 8 and all(p.startswith("<0x") for p in pieces), pieces


def test_cached_reload_needs_no_gguf_parse(tok, gguf_path, tok_cache_dir):
    """A second process loads from the cache: no gguf or transformers import, same ids."""
    from girandole.tokenizer.loader import gguf_cache_path

    os.environ["GIRANDOLE_CACHE_DIR"], old = (
        str(tok_cache_dir),
        os.environ.get("GIRANDOLE_CACHE_DIR"),
    )
    try:
        entry = gguf_cache_path(gguf_path)
    finally:
        if old is None:
            del os.environ["GIRANDOLE_CACHE_DIR"]
        else:
            os.environ["GIRANDOLE_CACHE_DIR"] = old
    assert (entry / "tokenizer.json").is_file() and (entry / "meta.json").is_file()
    assert [p.name for p in entry.parent.iterdir() if p.name.startswith(".")] == []

    code = textwrap.dedent(
        f"""
        import json, sys, time
        t = time.perf_counter()
        from girandole.tokenizer import load_tokenizer
        tok = load_tokenizer({str(gguf_path)!r})
        dt = time.perf_counter() - t
        print(json.dumps({{
            "seconds": dt,
            "gguf": "gguf" in sys.modules,
            "transformers": "transformers" in sys.modules,
            "ids": tok.encode("<start_of_turn>user\\nHello<end_of_turn>\\n"),
            "stop": tok.stop_token_ids,
        }}))
        """
    )
    env = dict(os.environ, GIRANDOLE_CACHE_DIR=str(tok_cache_dir))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"cached tokenizer load in a fresh process: {result['seconds']:.2f} s")
    assert result["gguf"] is False and result["transformers"] is False
    assert result["ids"] == [2, 105, 2364, 107, 9259, 106, 107]
    assert result["stop"] == [1, 106]


def test_damaged_cache_is_rebuilt(gguf_path, tmp_path, monkeypatch, tok):
    """A damaged cache entry is replaced (the conversion reuses this process's GGUF parse)."""
    from girandole.tokenizer.loader import gguf_cache_path, load_gguf_tokenizer

    monkeypatch.setenv("GIRANDOLE_CACHE_DIR", str(tmp_path))
    entry = gguf_cache_path(gguf_path)
    entry.mkdir(parents=True)
    (entry / "tokenizer.json").write_text("{not json")
    (entry / "meta.json").write_text("{}")
    again = load_gguf_tokenizer(gguf_path)
    assert again.encode("Hello world") == [2, 9259, 1902]
    assert json.loads((entry / "meta.json").read_text())["stop_token_ids"] == [1, 106]


def test_load_tokenizer_default_is_shared(gguf_path):
    from girandole.tokenizer import load_tokenizer

    a = load_tokenizer(None)
    assert a is load_tokenizer(gguf_path)
    assert a.encode("Hello world") == [2, 9259, 1902]


def test_bad_paths(tmp_path):
    from girandole.tokenizer import load_tokenizer

    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)  # a folder without tokenizer.json
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path / "x.bin")


def test_a_text_far_over_a_limit_is_known_to_be_after_counting_part_of_it(tok, texts, monkeypatch):
    """`more_tokens_than` counts a long text in pieces and stops once they hold twice the
    limit: True only then, after tokenizing about that much; never True for a text within the
    limit (its pieces' cuts cost a few tokens, not half)."""
    from girandole.tokenizer import tokenizer as module

    long = "\n".join(texts) * (300_000 // len("\n".join(texts)) + 1)
    total = len(tok.encode(long, add_bos=False))
    encoded: list[int] = []
    real = module._encode
    monkeypatch.setattr(
        module, "_encode", lambda hf, text: encoded.append(len(text)) or real(hf, text)
    )
    assert tok.more_tokens_than(long, total // 4)
    assert sum(encoded) < len(long) * 3 / 4  # it stopped early
    assert not tok.more_tokens_than(long, total)
    assert not tok.more_tokens_than(long, total // 2 + 1)
    assert not tok.more_tokens_than(long[: total * 4], total)  # too short to count: False
    spaces = " " * 400_000  # 16 spaces a token: the fewest tokens a text can have
    assert not tok.more_tokens_than(spaces, len(tok.encode(spaces, add_bos=False)))


class _Parses:
    """`tokenizers.Tokenizer` as tokenizer.py sees it, counting how each copy was made."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.real, self.made = HFTokenizer, []

    def from_file(self, path: str):
        self.made.append("file")
        return self.real.from_file(path)

    def from_str(self, text: str):
        self.made.append("str")
        return self.real.from_str(text)


def test_the_plain_copy_is_read_again_from_the_tokenizers_file(tok, tmp_path, monkeypatch):
    # before: `hf` written out (to_str, ~0.5 s) and parsed back, holding the GIL for ~1.7 s of
    # a server's start, where reading the file it came from takes ~1.2-1.5 s
    import girandole.tokenizer.tokenizer as module
    from girandole.tokenizer.tokenizer import Tokenizer

    parses = _Parses()
    monkeypatch.setattr(module, "HFTokenizer", parses)
    assert tok._source is not None and tok._source.is_file()  # read from the cache entry
    from_file = Tokenizer(tok.hf, tok.meta, source=tok._source)._plain()
    written = Tokenizer(tok.hf, tok.meta)._plain()
    assert parses.made == ["file", "str"]
    assert from_file.to_str() == written.to_str()
    special = "<start_of_turn>user\nhi<end_of_turn> <bos>"
    ids = from_file.encode(special, add_special_tokens=False).ids
    assert ids == written.encode(special, add_special_tokens=False).ids
    assert ids != tok.encode(special, add_bos=False)  # the spellings read as text

    # a file changed or damaged since `hf` was read from it, or none: `hf` is written out
    other = tmp_path / "tokenizer.json"
    changed = json.dumps({**json.loads(tok.hf.to_str()), "added_tokens": []})
    for since in (changed, "{not json", None):
        other.write_text(tok.hf.to_str())
        copy = Tokenizer(tok.hf, tok.meta, source=other)
        if since is None:
            other.unlink()
        else:
            other.write_text(since)
        parses.made.clear()
        assert copy._plain().to_str() == written.to_str()
        assert parses.made == ["str"]
