"""The engine's on/off variables read as README's switch rule says: 1/true/yes/on or
0/false/no/off, a bad word an error naming the variable. They were off only for `0`, so
`GIRANDOLE_NATIVE_KERNELS=false` kept the native kernels on without a word."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

READ_ALL = (
    "from girandole.model.kernels import loader, wq_gemm; from girandole.model import"
    " fused_layers; print(loader.library() is None, loader.amx(), wq_gemm.vnni_default(),"
    " fused_layers.ENABLED)"
)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("word", ["false", "OFF", "no", "0"])
def test_every_off_word_turns_the_engine_switches_off(word):
    off = {f"GIRANDOLE_{n}": word for n in ("NATIVE_KERNELS", "VNNI", "FUSED_LAYERS")}
    done = _run(READ_ALL, **off)
    assert done.stdout.split() == ["True", "False", "False", "False"], done.stderr
    done = _run(READ_ALL, GIRANDOLE_AMX=word, GIRANDOLE_VNNI=word)
    _, amx, vnni, _ = done.stdout.split()
    assert (amx, vnni) == ("False", "False"), done.stderr


def test_on_words_and_blank_keep_the_defaults():
    default = _run(READ_ALL).stdout.split()
    on = {f"GIRANDOLE_{n}": "Yes" for n in ("NATIVE_KERNELS", "AMX", "VNNI")}
    assert _run(READ_ALL, **on, GIRANDOLE_FUSED_LAYERS=" ").stdout.split() == default


def test_a_word_that_is_no_switch_is_an_error_naming_the_variable():
    done = _run(READ_ALL, GIRANDOLE_NATIVE_KERNELS="fals")
    assert done.returncode != 0
    assert "GIRANDOLE_NATIVE_KERNELS must be one of 1, true, yes, on, 0, false" in done.stderr
