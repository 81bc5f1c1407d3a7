"""A server loads its tokenizer on a thread, and builds there the copy that encodes special-token
strings as text (Tokenizer._plain): the tokenizers library's parse of the default model's 31 MiB
tokenizer.json allocates several times what it keeps, and glibc kept the freed pages in that
thread's arena (never trimmed on its own). engine/heap.py hands them back."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys
import threading
from girandole.tokenizer.loader import load_tokenizer

def anon_mib():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("RssAnon")) / 1024

def load():
    tokenizer = load_tokenizer(None)
    if sys.argv[1] == "plain":  # and the copy that reads special strings as text
        tokenizer.prepare_plain()

before = anon_mib()
thread = threading.Thread(target=load)
thread.start()
thread.join()
print(anon_mib() - before)
"""


LINUX_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; glibc's heap"
)


def _anon_growth(what: str) -> float:
    """MiB of anonymous memory a fresh process holds after loading the default model's
    tokenizer on a thread ("load"), and its plain copy too ("plain")."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, what],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(done.stdout.split()[-1])


@LINUX_ONLY
def test_the_tokenizer_parse_garbage_is_given_back():
    # measured: 322 MiB kept (two tokenizers of a 262,144-token vocabulary and their tables);
    # 543 MiB before the heap was trimmed
    assert _anon_growth("plain") < 430


@LINUX_ONLY
def test_the_parse_garbage_is_given_back_before_the_model_loads():
    # the engine loads its tokenizer, then its model: the parse's garbage was trimmed only after
    # both, so a start's peak held it and the model's own transient memory together.
    # measured: 239 MiB kept by the tokenizer; 421 MiB before load_tokenizer trimmed the heap
    assert _anon_growth("load") < 330
