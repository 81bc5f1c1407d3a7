"""Screenshots of the playground's modes for the docs: docs/playground/{chat,raw,tokens,code,key,
mcp,embeddings,rerank,branches,thinking,images}.png.

Starts `girandole serve` (the default model, with a key) on a free loopback port, drives the page
in headless Chromium (Debian's /usr/bin/chromium, else Playwright's own) and stops the server.
`--tabs` takes only some of them: the header's tabs (generate: every Generate screenshot but
branches and thinking; embeddings; rerank), branches (versions of a turn) and thinking (a second
server: the tests' tiny Qwen3, whose chat template thinks, its output shaped by a grammar) and
images (a server on the tests' tiny random Gemma 3 vision checkpoint, its answer fixed by a
grammar).

    .venv/bin/python scripts/playground_screenshots.py [--out docs/playground]
        [--tabs generate embeddings rerank branches thinking images]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-playground-screenshots"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(data_dir: str, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(port), "--api-key", KEY,
           "--data-dir", data_dir, "--kv-cache-gb", "0.5",
           "--mcp-allowed-hosts", "127.0.0.1", *args]  # the tests' MCP server  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"girandole serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not become ready in 300 s")


def ready(page: Page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")


def done(page: Page, pane: str = "#messages") -> None:
    page.wait_for_selector(f"{pane} .msg:last-child .stats", timeout=300_000)


def shoot(page: Page, out: Path, name: str) -> None:
    page.screenshot(path=str(out / f"{name}.png"))
    print(out / f"{name}.png")


TABS = ("generate", "embeddings", "rerank", "branches", "thinking", "images")
VIEWPORT = {"width": 1280, "height": 800}


def screenshots(url: str, out: Path, tabs: set[str]) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(viewport=VIEWPORT)
        context.add_init_script(f"localStorage.setItem('girandole.apiKey', {json.dumps(KEY)})")
        if "generate" in tabs:
            generate(browser, context, url, out)
        if "embeddings" in tabs:
            embeddings(context, url, out)
        if "rerank" in tabs:
            rerank(context, url, out)
        if "branches" in tabs:
            branches(context, url, out)
        if "thinking" in tabs:
            thinking(context, out)
        if "images" in tabs:
            images(context, out)
        context.close()
        browser.close()


def embeddings(context, url: str, out: Path) -> None:
    page = context.new_page()
    ready(page, url)
    page.click("#tab-embeddings")
    page.fill("#embed-input", "\n".join([
        "The cat sat on the mat.",
        "A kitten slept on the rug.",
        "Paris is the capital of France.",
        "The Eiffel Tower is in Paris.",
    ]))  # fmt: skip
    page.check("#embed-normalize")
    page.click("#embed-send")
    page.wait_for_selector("#embed-output:not([hidden])", timeout=300_000)
    shoot(page, out, "embeddings")
    page.close()


def rerank(context, url: str, out: Path) -> None:
    page = context.new_page()
    ready(page, url)
    page.click("#tab-rerank")
    page.fill("#rerank-query", "What is the capital of France?")
    page.fill("#rerank-documents", "\n".join([
        "Bananas are rich in potassium.",
        "Paris is the capital and largest city of France.",
        "The Eiffel Tower is in Paris.",
        "Berlin is the capital of Germany.",
        "def add(a, b): return a + b",
    ]))  # fmt: skip
    page.click("#rerank-send")
    page.wait_for_selector("#rerank-output:not([hidden])", timeout=300_000)
    shoot(page, out, "rerank")
    page.close()


def branches(context, url: str, out: Path) -> None:
    """Versions: the answer regenerated twice, the question edited and sent again."""
    page = context.new_page()
    ready(page, url)
    page.fill("#p-max_tokens", "16")
    page.fill("#p-temperature", "0.7")
    page.fill("#system", "You are a helpful assistant.")
    page.fill("#input", "What is the capital of France?")
    page.fill("#p-seed", "1")
    page.click("#send")
    done(page)
    page.fill("#input", "And of Italy?")
    page.click("#send")
    done(page)
    for seed in ("2", "3"):
        page.fill("#p-seed", seed)
        page.locator(".msg.assistant").nth(0).locator(".act-regenerate").click()
        done(page)
    page.locator(".msg.user").nth(0).locator(".act-edit").click()
    page.fill(".msg.user .editor textarea", "What is the capital of Spain?")
    page.click(".msg.user .act-send")
    done(page)
    page.click(".msg.user .act-prev-version")  # back to France: its three answers
    for _ in range(2):
        page.click(".msg.assistant .act-prev-version")  # the first, with its follow-up
    shoot(page, out, "branches")
    page.close()


THOUGHT = ("The user wants the capital of France. That is Paris, which has been the capital "
           "since the Middle Ages. A one-sentence answer will do.")  # fmt: skip
ANSWER = "The capital of France is Paris."


def thinking(context, out: Path) -> None:
    """A Thinking block: the tests' tiny random Qwen3 (Qwen3's chat template), its output fixed
    by a grammar, on a server of its own."""
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # tests/conftest.py: write_tiny_qwen3

    with tempfile.TemporaryDirectory() as tmp:
        model = conftest.write_tiny_qwen3(Path(tmp) / "qwen3")
        proc, url = serve(str(Path(tmp) / "data"), "--model", str(model), "--model-id",
                          "tiny-qwen3", "--kv-cache-gb", "0.02", "--max-model-len", "2048")  # fmt: skip
        try:
            page = context.new_page()
            ready(page, url)
            page.fill("#p-max_tokens", "400")
            page.fill("#p-temperature", "0")
            page.uncheck("#p-logprobs")
            page.select_option("#p-format", "grammar")
            page.fill("#p-schema", f'root ::= "<think>\\n{THOUGHT}\\n</think>\\n\\n{ANSWER}"')
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            done(page)
            page.fill("#input", "And of Italy?")
            page.select_option("#p-format", "text")
            page.click(".msg.assistant .thinking summary")  # unfolded
            shoot(page, out, "thinking")
            page.close()
        finally:
            proc.terminate()
            proc.wait(30)


def picture(path: Path, sky: str, sun: str) -> Path:
    """A small PNG to attach: a sun over a hill."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 120), sky)
    draw = ImageDraw.Draw(img)
    draw.ellipse((100, 14, 140, 54), fill=sun)
    draw.ellipse((-40, 80, 200, 220), fill="#3f7d3a")
    img.save(path)
    return path


def images(context, out: Path) -> None:
    """Images in chat: the tests' tiny random Gemma 3 vision checkpoint on a server of its own,
    one image sent (its answer fixed by a grammar: the random model's own is noise) and two
    more waiting in the composer."""
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # tests/conftest.py: write_tiny_gemma3_vision

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "vision"
        folder.mkdir()
        conftest.write_tiny_gemma3_vision(folder)
        proc, url = serve(str(Path(tmp) / "data"), "--model", str(folder), "--model-id",
                          "tiny-gemma3-vision", "--kv-cache-gb", "0.01")  # fmt: skip
        try:
            page = context.new_page()
            ready(page, url)
            page.fill("#p-max_tokens", "40")
            page.uncheck("#p-logprobs")
            page.select_option("#p-format", "grammar")
            page.fill("#p-schema", 'root ::= "A yellow sun above a green hill."')
            page.set_input_files(
                "#attach", str(picture(Path(tmp) / "day.png", "#8ec5ff", "#ffd43b"))
            )
            page.fill("#input", "What is in this picture?")
            page.click("#send")
            done(page)
            page.select_option("#p-format", "text")
            page.set_input_files("#attach", [
                str(picture(Path(tmp) / "dusk.png", "#f4a261", "#e76f51")),
                str(picture(Path(tmp) / "night.png", "#1d3557", "#f1faee")),
            ])  # fmt: skip
            page.wait_for_selector("#attachments .thumb:nth-child(2)")
            page.fill("#input", "And in these two?")
            shoot(page, out, "images")
            page.close()
        finally:
            proc.terminate()
            proc.wait(30)


def generate(browser, context, url: str, out: Path) -> None:
    """The Generate tab: key, chat, tokens, code, raw, mcp."""
    # keys on, no key yet: the page asks for one
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(url + "/")
    page.locator("#key-dialog").wait_for(state="visible")
    shoot(page, out, "key")
    page.close()

    page = context.new_page()
    ready(page, url)
    page.fill("#p-max_tokens", "24")
    page.fill("#p-temperature", "0")
    page.fill("#system", "You are a helpful assistant.")
    page.fill("#input", "What is the capital of France?")
    page.click("#send")
    done(page)
    page.fill("#input", "And of Italy?")
    page.click("#send")
    done(page)
    shoot(page, out, "chat")

    page.click(".msg.assistant >> nth=-1 >> .act-tokens")
    page.locator(".msg.assistant >> nth=-1 >> .tok").nth(2).click()
    shoot(page, out, "tokens")
    page.mouse.click(5, 5)

    page.fill("#input", "Write a haiku about the sea.")
    page.click("#view-code")
    page.click(".tabs button[data-lang=openai]")
    shoot(page, out, "code")
    page.click("#code-dialog button[value=close]")

    page.uncheck("#use-chat")
    page.fill("#p-max_tokens", "40")
    page.fill("#raw-prompt", "The three primary colours are")
    page.click("#raw-send")
    done(page, "#raw-output")
    shoot(page, out, "raw")
    page.close()

    # MCP tools: the tests' MCP server (tests/api/mcp_server.py), a call run through Responses
    sys.path.insert(0, str(ROOT / "tests" / "api"))
    from mcp_server import start_mcp_servers

    mcp = start_mcp_servers()
    try:
        page = context.new_page()
        ready(page, url)
        page.fill("#p-max_tokens", "40")
        page.fill("#p-temperature", "0")
        page.fill("#p-mcp", f"calc {mcp.http_url}")
        page.select_option("#p-mcp-choice", "required")
        page.fill("#input", "Add 2 and 40.")
        page.click("#send")
        done(page)
        page.click(".msg.assistant .tool >> nth=1")
        shoot(page, out, "mcp")
    finally:
        mcp.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground")
    parser.add_argument("--tabs", nargs="+", choices=TABS, default=list(TABS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = serve(data_dir)
        try:
            screenshots(url, args.out, set(args.tabs))
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
