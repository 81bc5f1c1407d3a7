"""The engine's on/off variables read as README's switch rule says: 1/true/yes/on or
0/false/no/off, a bad word an error naming the variable. They were off only for `0`, so
`GIRANDOLE_NATIVE_KERNELS=false` kept the native kernels on without a word."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile

import pytest

READ_ALL = (
    "from girandole.model.kernels import loader, wq_gemm; from girandole.model import"
    " fused_layers; print(loader.library() is None, loader.amx(), wq_gemm.vnni_default(),"
    " fused_layers.ENABLED)"
)


def _in_fresh_interpreter(code: str, env: dict[str, str], out: str, err: str) -> None:
    """In a process forked from one that imported torch and triton only (seconds each time,
    ~10 times): the engine's modules are imported here for the first time, reading `env`."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    os.environ.update(env)
    assert not any(name.startswith("girandole") for name in sys.modules)
    exec(code, {})


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` run with `env` added, in a fresh process (the variables are read at import)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "triton.language"])
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        process = context.Process(target=_in_fresh_interpreter, args=(code, env, out, err))
        process.start()
        process.join(300)
        if process.exitcode is None:
            process.kill()
            raise AssertionError("still running after 300 s")
        with open(out) as stdout, open(err) as stderr:
            return subprocess.CompletedProcess(code, process.exitcode, stdout.read(),
                                               stderr.read())  # fmt: skip


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
