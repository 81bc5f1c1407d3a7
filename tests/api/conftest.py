"""Real servers for the API tests: `girandole serve` in a subprocess on a free loopback port.

- `server`: the real default model (Gemma 3 270M), with API keys. Started once per session.
- `vision_server`: a tiny random Gemma 3 vision model (images allowed from loopback URLs).
- `open_server`: no keys (open), serving a tiny random Llama whose logits are all zero and whose
  EOS is token 0, so greedy decoding emits EOS at once: a model that always stops on EOS. Its
  context is capped at 64 tokens, its bodies at 64 KiB, and it streams usage the 2025 way (on
  each finish chunk).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_helpers import API_KEY, OTHER_KEY, ROOT  # noqa: E402
from loopback import free_port  # noqa: E402


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None
    health_codes: list[int] = field(default_factory=list)  # /health answers while starting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 60) -> dict:
        """Wait until the engine runs nothing and holds no KV blocks for running requests. The
        blocks too: /health reads the engine's counts while its thread works, and a finished
        sequence leaves `running` before its blocks are freed, one by one."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.health()
            engine = body["engine"]
            idle = engine["num_running"] == 0 and engine["num_waiting"] == 0
            if idle and engine.get("kv_blocks_used", 0) == 0:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy: {body}")
            time.sleep(0.1)


def start_server(tmp: Path, *args: str, api_key: str | None, timeout: float = 300) -> Server:
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if "--data-dir" not in args:  # keys database and usage rows: never the user's own
        args = (*args, "--data-dir", str(tmp / f"data-{port}"))
    cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(port), *args]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = Server(proc, port, log_path, api_key)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            code = httpx.get(server.url + "/health", timeout=5).status_code
            server.health_codes.append(code)
            if code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"server not ready in {timeout} s:\n{server.log()}")
        time.sleep(0.1)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(10)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("server")
    srv = start_server(
        tmp,
        "--api-key", API_KEY,
        "--api-key", OTHER_KEY,
        "--kv-cache-gb", "0.5",
        "--mcp-allowed-hosts", "*,127.0.0.1",  # the MCP test servers (tests/api/mcp_server.py)
        api_key=API_KEY,
    )  # fmt: skip
    yield srv
    stop_server(srv)


def write_eos_model(folder: Path) -> Path:
    """A tiny Llama that always answers EOS first: final norm zeroed (all logits 0, greedy picks
    token 0) and token 0 declared EOS."""
    from safetensors.torch import load_file, save_file

    # the model engineer's helper in tests/conftest.py, loaded under a name of its own
    spec = importlib.util.spec_from_file_location(
        "_girandole_root_conftest", ROOT / "tests/conftest.py"
    )
    helpers = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, helpers)
    spec.loader.exec_module(helpers)
    helpers.write_tiny_llama(folder, eos_token_id=0)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.norm.weight"].zero_()
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_tiny_llama_for_ops(folder: Path, **overrides: int) -> Path:
    """The model engineer's random tiny Llama (generates until max_tokens with ignore_eos);
    `overrides`: its config's sizes changed (hidden_size=...)."""
    spec = importlib.util.spec_from_file_location(
        "_girandole_root_conftest", ROOT / "tests/conftest.py"
    )
    helpers = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, helpers)
    spec.loader.exec_module(helpers)
    return helpers.write_tiny_llama(folder, **{"max_position_embeddings": 8192, **overrides})


def start_store_server(tmp: Path, key: str, prepare: Callable[[Any], None] | None = None) -> Server:
    """A real server on a tiny random Llama (ignore_eos runs to max_tokens) with a data dir, for
    tests of what it stores: `key` is its account's key, `server.other_key` one of another
    account, `server.db_path` its SQLite file. `prepare(db)` writes rows before it starts, as an
    upgraded server finds them."""
    from girandole.registry.keystore import DB_NAME, Database

    data = tmp / "data"
    db = Database(data / DB_NAME)
    other_key, _ = db.create_key("other")
    if prepare is not None:
        prepare(db)
    db.close()
    model = write_tiny_llama_for_ops(tmp / "tiny")
    srv = start_server(
        tmp, "--model", str(model), "--model-id", "tiny", "--account", "testing",
        "--kv-cache-gb", "0.05", "--max-model-len", "8192", "--api-key", key,
        "--data-dir", str(data), api_key=key,
    )  # fmt: skip
    srv.db_path = data / DB_NAME
    srv.other_key = other_key
    return srv


VISION_MODEL = "accounts/testing/models/tiny-vision"


@pytest.fixture(scope="session")
def vision_server(tmp_path_factory, tiny_vision) -> Server:
    """The tiny random Gemma 3 vision checkpoint (tests/conftest.py), as VISION_MODEL; image
    URLs on loopback allowed (the tests fetch images from local servers)."""
    folder, _ = tiny_vision
    tmp = tmp_path_factory.mktemp("vision-server")
    srv = start_server(
        tmp, "--model", str(folder), "--model-id", "tiny-vision", "--account", "testing",
        "--kv-cache-gb", "0.01", "--api-key", API_KEY, "--allow-private-image-urls",
        api_key=API_KEY,
    )  # fmt: skip
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def open_server(tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("open-server")
    model = write_eos_model(tmp / "eos-model")
    srv = start_server(
        tmp, "--model", str(model), "--model-id", "tiny-eos", "--account", "testing",
        "--kv-cache-gb", "0.01", "--max-model-len", "64", "--max-request-bytes", "65536",
        "--stream-usage", "finish", api_key=None,
    )  # fmt: skip
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's real tokenizer, to count tokens independently of the server."""
    from girandole.model.default import default_model_path
    from girandole.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())
