"""Fireworks' Completions guide, run as written against our server: only the base URL, the model
and the deployment name change (see tests/api/guide/README.md). Python (fireworks-ai and openai
SDKs), curl, and the JavaScript example on Node's `openai` package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from api_helpers import (
    API_KEY,
    DEFAULT_MAX_TOKENS,
    DEPLOYMENT,
    MODEL,
    ROOT,
    assert_default_length,
    npm_install,
)

pytestmark = pytest.mark.slow

GUIDE = Path(__file__).resolve().parent / "guide"
JS = ROOT / "tests" / "js"
GUIDE_MODEL = "accounts/fireworks/models/deepseek-v3p1"
GUIDE_DEPLOYMENT = "accounts/<ACCOUNT_ID>/deployments/<DEPLOYMENT_ID>"
FIREWORKS_URL = "https://api.fireworks.ai/inference/v1"
CLIENT_SETUP = "from fireworks import Fireworks\n\nclient = Fireworks()\n\n"


def localize(text: str, server) -> str:
    text = text.replace(FIREWORKS_URL, server.url + "/inference/v1")
    text = text.replace(GUIDE_MODEL, MODEL)
    return text.replace(GUIDE_DEPLOYMENT, DEPLOYMENT)


def env_for(server) -> dict[str, str]:
    # Fireworks() reads both; with FIREWORKS_BASE_URL it posts to {base}/v1/completions.
    return dict(os.environ, FIREWORKS_API_KEY=API_KEY, FIREWORKS_BASE_URL=server.url)


def run_python(code: str, server, tmp_path: Path) -> str:
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], env=env_for(server), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


# The basic examples print the text alone, at the default temperature 1: the model may sample
# its end of text first (an empty text). The tests print the finish_reason after it, to tell.
SHOW_FINISH = '\nprint("finish_reason:", response.choices[0].finish_reason)\n'


def assert_printed_text(out: str) -> None:
    """The example printed a text (then the finish_reason line the test added), or stopped."""
    text, _, finish_reason = out.rstrip("\n").rpartition("\nfinish_reason: ")
    assert text.strip() or finish_reason == "stop", out


def test_fireworks_sdk_basic(server, tmp_path):
    code = localize((GUIDE / "fireworks_basic.py").read_text(), server)
    assert_printed_text(run_python(code + SHOW_FINISH, server, tmp_path))


def test_openai_sdk_basic(server, tmp_path):
    code = localize((GUIDE / "openai_basic.py").read_text(), server)
    assert server.url in code
    assert_printed_text(run_python(code + SHOW_FINISH, server, tmp_path))


def test_few_shot_sentiment(server, tmp_path):
    code = CLIENT_SETUP + localize((GUIDE / "few_shot.py").read_text(), server)
    out = run_python(code, server, tmp_path)
    assert out.strip(), "the few-shot example printed nothing"


def test_querying_deployments(server, tmp_path):
    snippet = localize((GUIDE / "deployment.py").read_text(), server)
    assert DEPLOYMENT in snippet
    shown = "response.model, response.choices[0].finish_reason, response.usage.completion_tokens"
    code = CLIENT_SETUP + snippet + f"\nprint({shown})\n"
    model, finish_reason, completion_tokens = run_python(code, server, tmp_path).split()
    assert model == DEPLOYMENT
    assert_default_length(finish_reason, int(completion_tokens))


def test_streaming(server, tmp_path):
    code = localize((GUIDE / "stream.py").read_text(), server)
    out = run_python(code, server, tmp_path)
    text, _, usage = out.rpartition("\nusage: ")
    # The guide prints no finish_reason: at most the default max_tokens (end of text may come
    # first, the first token even: no text then)
    assert 0 < int(usage) <= DEFAULT_MAX_TOKENS
    assert text.strip() or int(usage) < DEFAULT_MAX_TOKENS, out


def test_curl(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    command = localize((GUIDE / "curl.sh").read_text(), server)
    done = subprocess.run(
        ["bash", "-c", command.rstrip() + " --fail-with-body -sS"], env=env_for(server),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    import json

    body = json.loads(done.stdout)
    (choice,) = body["choices"]
    assert body["object"] == "text_completion"
    assert choice["text"] or choice["finish_reason"] == "stop"  # an end of text sampled first
    assert_default_length(choice["finish_reason"], body["usage"]["completion_tokens"])


def test_curl_streaming(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    command = localize((GUIDE / "curl.sh").read_text(), server).replace(
        '"prompt": "Once upon a time"', '"prompt": "Once upon a time", "stream": true'
    )
    done = subprocess.run(
        ["bash", "-c", command.rstrip() + " -N -sS"], env=env_for(server), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    events = [block for block in done.stdout.split("\n\n") if block]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def install_openai_js() -> None:
    if not (JS / "node_modules" / "openai" / "package.json").exists():
        npm_install(JS, "the openai npm package")


def test_javascript_example(server):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the guide's JavaScript example needs Node.js")
    install_openai_js()
    generated = JS / ".generated"
    generated.mkdir(exist_ok=True)
    script = generated / "basic.mjs"
    show_finish = '\nconsole.log("finish_reason:", response.choices[0].finish_reason);\n'
    script.write_text(localize((JS / "basic.mjs").read_text(), server) + show_finish)
    done = subprocess.run(
        [node, str(script)], env=env_for(server), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert_printed_text(done.stdout)
