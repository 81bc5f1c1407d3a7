"""Session fixtures: the default GGUF's tokenizer (converted once into a session cache folder)
and transformers' own GGUF conversion of it, the reference."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

# A varied text set: English, code, whitespace runs, emoji (incl. ZWJ sequences and flags),
# CJK, other scripts, special and user-defined token strings, and look-alikes of vocab syntax.
TEXTS = [
    "",
    "Hello world",
    "<bos>Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing spaces   ",
    "tabs\there\t\tand\n\nnewlines\n\n\n\nmany",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 🫠 🧑🏿‍🚀",
    "byte-fallback emoji: 🌁🎴x🏑 \U00020001 end",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트.",
    "Ελληνικά, русский, العربية, हिन्दी, ไทย",
    "Café naïve résumé — “quotes” … ½ ∑ ∞ ≠",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "<table><tr><td>cell</td></tr></table>",
    "literal <0x41> and ▁ and <unused3> and <eos> text",
    "rare chars: \U0001d54f \U00010348 \u2603 \x7f \x01",
    "1234567890 3.14159 1e-10 0xDEADBEEF",
    "a" * 50 + " " * 17 + "b",
]


def pytest_generate_tests(metafunc):
    """Tests taking a `text` argument run once per text in TEXTS."""
    if "text" in metafunc.fixturenames:
        metafunc.parametrize("text", TEXTS, ids=[f"t{i}" for i in range(len(TEXTS))])


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return list(TEXTS)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from girandole.model.default import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="session")
def tok_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokcache")


@pytest.fixture(scope="session")
def tok(gguf_path, tok_cache_dir):
    """The default model's tokenizer, converted from the GGUF in this session (fresh cache)."""
    from girandole.tokenizer.loader import load_gguf_tokenizer

    old = os.environ.get("GIRANDOLE_CACHE_DIR")
    os.environ["GIRANDOLE_CACHE_DIR"] = str(tok_cache_dir)
    try:
        return load_gguf_tokenizer(gguf_path)
    finally:
        if old is None:
            del os.environ["GIRANDOLE_CACHE_DIR"]
        else:
            os.environ["GIRANDOLE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def ref(gguf_path, tmp_path_factory):
    """transformers' conversion of the same GGUF (the reference implementation). Converted once
    a run (~25 s: its GGUF reader parses 262k strings in Python) and handed, pickled, to the
    run's other pytest-xdist workers (two of these files) through the run's temporary folder."""
    transformers = pytest.importorskip("transformers")
    from filelock import FileLock

    run = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run = run.parent  # the workers' folders are in the run's own
    saved = run / f"transformers-{transformers.__version__}-{gguf_path.name}.pickle"
    with FileLock(f"{saved}.lock"):
        if saved.exists():
            return pickle.loads(saved.read_bytes())
        ref = transformers.AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name
        )
        saved.write_bytes(pickle.dumps(ref))
        return ref
