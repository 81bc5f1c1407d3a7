"""The package as a new user gets it: the wheel built with `python -m build`, installed into a
fresh venv (no system site packages, no extras) after torch's CPU wheel, then `girandole serve`
with an empty cache. Structured output and tool calls must work with only the declared
dependencies: the default model loads and the grammar engine is there.

pip's own cache makes the installs quick after the first run, and the venv's dependencies are
kept (VENV_CACHE): a later run whose wheel declares the same requirements starts from a
hard-linked copy of the venv the first one made, and pip installs the wheel into it (its
dependencies resolved and checked again, all there already): about 10 s instead of 75.
GIRANDOLE_TEST_FRESH_VENV=1 makes and keeps a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "api"))

from loopback import free_port  # noqa: E402

pytestmark = pytest.mark.slow

TORCH = "torch==2.13.0"  # the CPU wheel, as the Makefile installs it
MODEL = "accounts/fireworks/models/gemma-3-270m"
COPY_IGNORE = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "node_modules",
)
# the venvs a run keeps for the next (see the module's docstring)
VENV_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "girandole-tests" / "wheel"
)

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}


def _clean_env() -> dict[str, str]:
    """This environment without what would show the venv our sources (PYTHONPATH=src holds a
    girandole that pip would take as installed)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(cmd: list[str], **kw) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"


def _venv_key(wheel: Path) -> str:
    """What the venv's dependencies follow from: the interpreter, torch's pin and the wheel's
    declared requirements (its METADATA's Requires-Dist lines)."""
    with zipfile.ZipFile(wheel) as whl:
        (metadata,) = (n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        lines = whl.read(metadata).decode().splitlines()
    requires = sorted(line for line in lines if line.startswith("Requires-Dist:"))
    text = "\n".join([sys.version, os.path.realpath(sys.base_prefix), TORCH, *requires])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _copy_tree(source: Path, target: Path) -> None:
    """New directories, the files hard-linked (a second for 2.5 GB): what Python or pip writes
    in one tree stays there. Copied where links cannot be made (another file system)."""
    linked = subprocess.run(["cp", "-al", str(source), str(target)], capture_output=True)
    if linked.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        _run(["cp", "-a", str(source), str(target)])


def _keep_dependencies(venv: Path, cached: Path) -> None:
    """`cached`: a hard-linked copy of `venv` without girandole itself, what the next run
    starts from. Made beside it and renamed into place: a run cut short, or one beside this
    one, never finds half a venv there."""
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    _copy_tree(venv, partial)
    # pip unlinks girandole's files in the copy only (the links in `venv` stay)
    _run([str(partial / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "girandole"])
    for old in cached.parent.glob("venv-*"):  # another requirement set's venv: 2.5 GB each
        being_made = old.name.endswith(".partial") and time.time() - old.stat().st_mtime < 3600
        if old != partial and not being_made:
            shutil.rmtree(old, ignore_errors=True)
    try:
        partial.rename(cached)
    except OSError:  # a run beside this one kept its own first
        shutil.rmtree(partial, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The venv's bin folder, the wheel (no extras) installed in it."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*COPY_IGNORE))
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp / "dist"), str(source)])
    (wheel,) = (tmp / "dist").glob("girandole-*.whl")
    venv = tmp / "venv"
    cached = VENV_CACHE / f"venv-{_venv_key(wheel)}"
    # --no-compile: byte-compiling torch's ~10k files took half a minute; imports compile what
    # they use
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    if cached.is_dir() and not os.environ.get("GIRANDOLE_TEST_FRESH_VENV"):
        _copy_tree(cached, venv)
        _run([*pip, str(wheel)])
        return venv / "bin"
    _run([sys.executable, "-m", "venv", str(venv)])  # no system site packages
    _run([*pip, TORCH])
    _run([*pip, str(wheel)])
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    _keep_dependencies(venv, cached)
    return venv / "bin"


@pytest.fixture(scope="module")
def server(installed, tmp_path_factory):
    """`girandole serve` from the venv on a free loopback port, with its own empty cache."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = _clean_env()
    env.update(GIRANDOLE_CACHE_DIR=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    log_path = tmp / "server.log"
    cmd = [str(installed / "girandole"), "serve", "--port", str(port),
           "--kv-cache-gb", "0.25", "--data-dir", str(tmp / "data")]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text(errors='replace')}"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and anything it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _chat(url: str, **body) -> dict:
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": MODEL, "max_tokens": 120, "temperature": 0, **body},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_the_venv_is_consistent(installed):
    """Every installed distribution's requirements are met (what pip's resolver ERROR reports)."""
    _run([str(installed / "python"), "-m", "pip", "check"])


def test_response_format_json_schema(server):
    choice = _chat(
        server,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}},
    )
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_tool_call(server):
    choice = _chat(
        server,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice="required",
    )
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather", choice
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert choice["finish_reason"] == "tool_calls", choice
