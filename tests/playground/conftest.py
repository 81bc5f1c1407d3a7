"""The playground page in a real headless Chromium (Playwright's sync API) against real servers
with the default model (Gemma 3 270M): `open_server` without keys, `keyed_server` with one; and
`qwen_server`, a tiny Qwen3 whose chat template thinks; `vision_server`, a tiny Gemma 3 that
takes images. Each lives for one test file, so no server or browser outlasts the playground's
tests in a pytest worker that goes on to other files.

Chromium: Debian's package (/usr/bin/chromium, installed by .ci/run when missing), else the
browser Playwright downloads (`playwright install chromium`).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))

from api_helpers import API_KEY, api_conftest  # noqa: E402

start_server = api_conftest().start_server
stop_server = api_conftest().stop_server

# the server's defaults would make a CPU test slow: chat answers up to 2048 tokens
MAX_TOKENS = "8"


def _serve(tmp_path_factory, name: str, *args: str, api_key: str | None):
    server = start_server(tmp_path_factory.mktemp(name), "--kv-cache-gb", "0.5", *args,
                          api_key=api_key)  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    yield from _serve(tmp_path_factory, "open", "--mcp-allowed-hosts", "127.0.0.1", api_key=None)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    yield from _serve(tmp_path_factory, "keyed", "--api-key", API_KEY, api_key=API_KEY)


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory, tiny_qwen3_dir):
    """A model that thinks: the tests' tiny random Qwen3 with Qwen3's chat template
    (tests/conftest.py); a GBNF grammar gives its output a thinking block and an answer."""
    yield from _serve(tmp_path_factory, "qwen3", "--model", str(tiny_qwen3_dir),
                      "--model-id", "tiny-qwen3", "--kv-cache-gb", "0.02",
                      "--max-model-len", "2048", "--mcp-allowed-hosts", "127.0.0.1",
                      api_key=None)  # fmt: skip


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory, tiny_vision):
    """A model that takes images: the tests' tiny random Gemma 3 vision checkpoint
    (tests/conftest.py)."""
    folder, _ = tiny_vision
    yield from _serve(tmp_path_factory, "vision", "--model", str(folder),
                      "--model-id", "tiny-vision", "--kv-cache-gb", "0.01", api_key=None)  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Module-scoped: while Playwright's sync API is open its event loop counts as running in
    this thread, so every later asyncio.run() of the same pytest process (a worker of
    `make test` takes other files after this one) would fail."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def context(browser) -> Iterator:
    """A fresh browser profile per test (its own localStorage), allowed to use the clipboard."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.grant_permissions(["clipboard-read", "clipboard-write"])
    yield ctx
    ctx.close()


@pytest.fixture
def page(context):
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    assert not errors, f"the page's script failed: {errors}"
