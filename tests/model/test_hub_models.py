"""Models by Hugging Face repo id (`org/name`, `--revision`, `org/name:file.gguf`), served from a
huggingface_hub cache that the tests lay out themselves (there is no network here)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from model_helpers import write_tiny_gguf, write_tiny_hf

from girandole import LLM, SamplingParams
from girandole.model.default import resolve_model_path
from girandole.model.hub import ModelSourceError, model_id_of, parse_repo_model

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def hub(hub_cache, tmp_path_factory):
    """The shared cache plus two GGUF repos: `tiny-org/tiny-gguf` (two quantizations) and
    `tiny-org/one-gguf` (one model file beside a multimodal projector and a README)."""
    folder = tmp_path_factory.mktemp("gguf-repos")
    hf = write_tiny_hf("llama", folder / "hf")
    write_tiny_gguf(hf, "llama", folder / "tiny-f32.gguf", {})
    write_tiny_gguf(hf, "llama", folder / "tiny-q8.gguf", {"attn_q": "Q8_0", "ffn_up": "Q8_0"})
    (folder / "mmproj-tiny.gguf").write_bytes(b"GGUF not a language model")
    (folder / "README.md").write_text("# tiny\n")
    two = {n: folder / n for n in ("tiny-f32.gguf", "tiny-q8.gguf", "README.md")}
    one = {n: folder / n for n in ("tiny-q8.gguf", "mmproj-tiny.gguf", "README.md")}
    hub_cache.add("tiny-org/tiny-gguf", two)
    hub_cache.add("tiny-org/one-gguf", one)
    hub_cache.sources["gguf"] = folder
    return hub_cache


@pytest.fixture()
def offline(hub, monkeypatch):
    """This process reads `hub`'s cache, offline (huggingface_hub reads its environment once,
    at import, so its settings are set where it keeps them)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def snapshot(hub, key: str) -> Path:
    repo = key.split("@")[0]
    return hub.path / ("models--" + repo.replace("/", "--")) / "snapshots" / hub.commits[key]


def test_repo_id_resolves_to_its_cached_snapshot(offline):
    main = snapshot(offline, "tiny-org/tiny-llama@main")
    v1 = snapshot(offline, "tiny-org/tiny-llama@v1")
    assert resolve_model_path("tiny-org/tiny-llama") == main
    assert resolve_model_path("tiny-org/tiny-llama", "main") == main
    assert resolve_model_path("tiny-org/tiny-llama", "v1") == v1
    assert resolve_model_path("tiny-org/tiny-llama", v1.name) == v1  # a commit hash
    assert (main / "config.json").is_symlink() and (main / "config.json").is_file()


def test_gguf_repo_file_by_name_and_the_only_one(offline):
    gguf = snapshot(offline, "tiny-org/tiny-gguf@main")
    assert resolve_model_path("tiny-org/tiny-gguf:tiny-q8.gguf") == gguf / "tiny-q8.gguf"
    assert resolve_model_path("tiny-org/tiny-gguf:tiny-f32.gguf") == gguf / "tiny-f32.gguf"
    one = snapshot(offline, "tiny-org/one-gguf@main")
    assert resolve_model_path("tiny-org/one-gguf") == one / "tiny-q8.gguf"  # not the mmproj


def test_local_path_wins_over_a_repo_id(offline, tmp_path, monkeypatch):
    local = tmp_path / "tiny-org" / "tiny-llama"
    local.mkdir(parents=True)
    for p in offline.sources["tiny-org/tiny-llama@v1"].iterdir():
        (local / p.name).write_bytes(p.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("tiny-org/tiny-llama") == Path("tiny-org/tiny-llama")


@pytest.mark.parametrize(
    "model, revision, expected",
    [
        (
            "tiny-org/missing",
            None,
            "model tiny-org/missing is neither a local path nor in the Hugging Face cache",
        ),
        (
            "tiny-org/tiny-llama",
            "v2",
            "tiny-org/tiny-llama (revision v2) is neither a local path nor in the Hugging",
        ),
        (
            "tiny-org/tiny-gguf",
            None,
            "tiny-org/tiny-gguf has several .gguf files in the Hugging Face cache (HF_HUB_OFFLINE"
            " is set); name one as tiny-org/tiny-gguf:FILE, one of: tiny-f32.gguf, tiny-q8.gguf",
        ),
        (
            "tiny-org/tiny-gguf:tiny-q4.gguf",
            None,
            "tiny-org/tiny-gguf has no file tiny-q4.gguf in the Hugging Face cache (HF_HUB_OFFLINE"
            " is set); the .gguf files there: tiny-f32.gguf, tiny-q8.gguf",
        ),
        ("tiny-org/no-weights", None, "tiny-org/no-weights has no .gguf file and no config.json"),
        ("tiny-org/tiny-llama:model.bin", None, "after 'org/name:' give a .gguf file"),
    ],
)
def test_errors_name_the_repo_and_the_problem(offline, model, revision, expected):
    with pytest.raises(ModelSourceError) as info:
        resolve_model_path(model, revision)
    assert expected in str(info.value)
    if "nor in the Hugging" in expected:
        assert str(offline.path) in str(info.value) and "HF_HUB_OFFLINE is set" in str(info.value)


@pytest.mark.parametrize(
    "model, model_id",
    [
        ("Qwen/Qwen3-0.6B", "qwen3-0-6b"),
        ("meta-llama/Llama-3.2-1B-Instruct", "llama-3-2-1b-instruct"),
        ("unsloth/gemma-3-1b-it-GGUF:gemma-3-1b-it-Q4_K_M.gguf", "gemma-3-1b-it-q4-k-m"),
        ("org/7b-chat", "b-chat"),
        ("org/___", "model"),
    ],
)
def test_served_model_id_of_a_repo_id(model, model_id):
    import argparse

    from girandole.api.server import add_serve_parser, settings_from_args
    from girandole.registry.naming import is_valid_id

    assert model_id_of(parse_repo_model(model)) == model_id and is_valid_id(model_id)
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    settings = settings_from_args(parser.parse_args(["serve", "--model", model]))
    assert settings.model_id == model_id
    named = parser.parse_args(["serve", "--model", model, "--model-id", "mine"])
    assert settings_from_args(named).model_id == "mine"


def test_a_path_that_is_no_repo_id_is_still_a_missing_path(offline):
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        resolve_model_path("/nonexistent/model.gguf")
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        resolve_model_path("./tiny-org/tiny-llama/extra")
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        resolve_model_path("models/tiny.gguf")


def test_llm_by_repo_id_generates_as_the_local_checkpoint(offline):
    def greedy(llm: LLM) -> list[int]:
        return llm.generate([[1, 17, 42, 99]], GREEDY)[0].token_ids

    by_name = greedy(LLM(model="tiny-org/tiny-llama", revision="v1", kv_cache_gb=0.01))
    local = greedy(LLM(model=str(offline.sources["tiny-org/tiny-llama@v1"]), kv_cache_gb=0.01))
    main = greedy(LLM(model="tiny-org/tiny-llama", kv_cache_gb=0.01))
    assert by_name == local and by_name != main
    gguf = greedy(LLM(model="tiny-org/tiny-gguf:tiny-q8.gguf", kv_cache_gb=0.01))
    assert gguf == greedy(
        LLM(model=str(offline.sources["gguf"] / "tiny-q8.gguf"), kv_cache_gb=0.01)
    )


def generate(hub, *args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "girandole.cli", "generate", "Once upon a time", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=hub.env(**env)
    )


def test_cli_generate_by_repo_id_and_revision(hub, tmp_path):
    cache = {"GIRANDOLE_CACHE_DIR": str(tmp_path)}
    flags = ("--max-tokens", "8")
    main = generate(hub, "--model", "tiny-org/tiny-llama", *flags, **cache)
    v1 = generate(hub, "--model", "tiny-org/tiny-llama", "--revision", "v1", *flags, **cache)
    assert main.returncode == 0 and v1.returncode == 0, main.stderr + v1.stderr
    for out, ref in ((main, "main"), (v1, "v1")):
        llm = LLM(model=str(hub.sources[f"tiny-org/tiny-llama@{ref}"]), kv_cache_gb=0.01)
        text = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=8))
        assert out.stdout == "Once upon a time" + text[0].text + "\n"
    assert main.stdout != v1.stdout


def test_cli_errors_are_one_clear_line(hub, tmp_path):
    missing = generate(hub, "--model", "tiny-org/missing")
    assert missing.returncode == 2
    assert missing.stderr.startswith("girandole generate: model tiny-org/missing is neither a")
    assert "Traceback" not in missing.stderr
    several = generate(hub, "--model", "tiny-org/tiny-gguf")
    assert several.returncode == 2 and "name one as tiny-org/tiny-gguf:FILE" in several.stderr


def test_no_network_falls_back_to_the_cache(hub, tmp_path):
    """Online mode with the Hub unreachable (a closed port): served from the cache when there,
    else an error that says the Hub could not be reached."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": closed, "GIRANDOLE_CACHE_DIR": str(tmp_path)}
    ok = generate(hub, "--model", "tiny-org/one-gguf", "--max-tokens", "2", **env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Once upon a time")
    missing = generate(hub, "--model", "tiny-org/missing", **env)
    assert missing.returncode == 2
    assert (
        "model tiny-org/missing is neither a local path nor in the Hugging Face cache"
        in missing.stderr
    )
    assert "the Hugging Face Hub could not be reached" in missing.stderr


class LocalHub(http.server.BaseHTTPRequestHandler):
    """A server on 127.0.0.1 answering as the Hugging Face Hub does for the calls a download
    makes (model info, file tree, file HEAD and GET), for the repos in REPOS, and with the Hub's
    refusals (status and X-Error-Code header) for the names in REFUSALS."""

    REPOS: dict[str, dict[str, bytes]] = {}  # repo id -> file name -> bytes (commit "main")
    REFUSALS = {
        "org/missing": (404, "RepoNotFound"),
        "org/gated": (403, "GatedRepo"),
        "org/name/revision/v9": (404, "RevisionNotFound"),
        "org/down": (503, None),
    }

    @staticmethod
    def commit(repo: str) -> str:
        import hashlib

        return hashlib.sha1(repo.encode()).hexdigest()

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _api(self, path: str) -> None:
        import json

        rest = path.removeprefix("/api/models/")
        if rest in self.REFUSALS:
            status, code = self.REFUSALS[rest]
            return self._send(status, headers={"X-Error-Code": code} if code else {})
        repo, _, tail = rest.partition("/revision/")
        if "/tree/" in rest:
            repo, _, tail = rest.partition("/tree/")
        files = self.REPOS.get(repo)
        if files is None:
            return self._send(404, headers={"X-Error-Code": "RepoNotFound"})
        if "/tree/" in rest:
            body = [{"type": "file", "path": n, "size": len(b), "oid": self.commit(n)}
                    for n, b in files.items()]  # fmt: skip
        else:
            body = {"id": repo, "sha": self.commit(repo),
                    "siblings": [{"rfilename": n} for n in files]}  # fmt: skip
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path.startswith("/api/models/"):
            return self._api(path)
        repo, _, rest = path.lstrip("/").partition("/resolve/")
        name = rest.partition("/")[2]
        data = self.REPOS.get(repo, {}).get(name)
        if data is None:
            return self._send(404, headers={"X-Error-Code": "EntryNotFound"})
        etag = self.commit(repo + name)
        headers = {"X-Repo-Commit": self.commit(repo), "ETag": f'"{etag}"'}
        self._send(200, data, headers)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def local_hub(hub):
    main = hub.sources["tiny-org/tiny-llama@main"]
    LocalHub.REPOS = {
        "hub-org/tiny-llama": {p.name: p.read_bytes() for p in main.iterdir() if p.is_file()},
        "hub-org/tiny-gguf": {
            n: (hub.sources["gguf"] / n).read_bytes() for n in ("tiny-q8.gguf", "README.md")
        },
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LocalHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_hub_answers_become_errors_naming_the_repo(hub, local_hub, monkeypatch):
    """Online, the Hub's refusals are named."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", local_hub)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cases = [
        (
            "org/missing",
            None,
            "model org/missing is neither a local path nor a model on the Hugging Face Hub",
        ),
        ("org/gated", None, "model org/gated is gated: accept its terms"),
        ("org/name", "v9", "model org/name has no revision 'v9'"),
        ("org/down", None, "the Hugging Face Hub could not be reached (HfHubHTTPError"),
    ]
    for model, revision, expected in cases:
        with pytest.raises(ModelSourceError) as info:
            resolve_model_path(model, revision)
        assert expected in str(info.value)


def test_download_into_the_cache_then_serve_offline_from_it(hub, local_hub, tmp_path):
    """Online (the local Hub): `generate --model org/name` downloads the checkpoint into an
    empty cache, with huggingface_hub's progress bars, then generates as the local copy does;
    offline afterwards, the same name is served from what was downloaded."""
    cache = tmp_path / "hub"
    env = {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": local_hub, "HF_HUB_OFFLINE": "0",
           "GIRANDOLE_CACHE_DIR": str(tmp_path / "girandole")}  # fmt: skip
    online = generate(hub, "--model", "hub-org/tiny-llama", "--max-tokens", "8", **env)
    assert online.returncode == 0, online.stderr
    assert "100%" in online.stderr  # the download's progress bar
    snapshot = (
        cache / "models--hub-org--tiny-llama" / "snapshots" / LocalHub.commit("hub-org/tiny-llama")
    )
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in snapshot.iterdir()
    }
    llm = LLM(model=str(hub.sources["tiny-org/tiny-llama@main"]), kv_cache_gb=0.01)
    text = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=8))
    assert online.stdout == "Once upon a time" + text[0].text + "\n"
    offline = generate(hub, "--model", "hub-org/tiny-llama", "--max-tokens", "8",
                       **{**env, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert offline.returncode == 0 and offline.stdout == online.stdout, offline.stderr
    gguf = generate(hub, "--model", "hub-org/tiny-gguf", "--max-tokens", "2", **env)
    assert gguf.returncode == 0, gguf.stderr
    folder = cache / "models--hub-org--tiny-gguf" / "snapshots"
    assert [p.name for p in folder.glob("*/*")] == ["tiny-q8.gguf"]  # the README stays there
