"""The playground page driven in headless Chromium against the real server and default model:
streamed chat, stop, raw completions, the token view's continuation, the parameters panel, the
code snippets run as shown, export/import, and a server with keys asking for one on 401."""

from __future__ import annotations

import json
import subprocess
import sys
from urllib.parse import urlsplit

import httpx
import pytest
from api_helpers import API_KEY, MODEL

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def open_page(page, server, path: str = "/") -> None:
    page.goto(server.url + path)
    page.wait_for_function("document.querySelector('#model').options.length > 0")


def with_key(context) -> None:
    """The key as the page keeps it (localStorage), set before any of its scripts run."""
    context.add_init_script(f"localStorage.setItem('girandole.apiKey', {json.dumps(API_KEY)})")


def fill(page, **params) -> None:
    for name, value in params.items():
        page.fill(f"#p-{name}", str(value))


def posts(page) -> list[tuple[str, dict]]:
    """Every API POST the page makes from now on: (path, JSON body)."""
    seen: list[tuple[str, dict]] = []

    def on_request(request):
        if request.method == "POST":
            seen.append((urlsplit(request.url).path, request.post_data_json))

    page.on("request", on_request)
    return seen


def finished(page, pane: str = "#messages") -> None:
    page.wait_for_selector(f"{pane} .msg:last-child .stats", timeout=180_000)


def api(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json={"model": MODEL, **body}, headers=server.headers,
                   timeout=180)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_page_is_public_and_the_api_is_not(keyed_server):
    for path in ("/", "/playground"):
        r = httpx.get(keyed_server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert '<script src="/playground/app.js">' in r.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{keyed_server.url}/playground/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    r = httpx.get(keyed_server.url + "/playground/secrets.txt")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    assert httpx.get(keyed_server.url + "/v1/models").status_code == 401
    assert httpx.get(keyed_server.url + "/health").status_code == 200  # / shadows nothing
    assert "/" not in httpx.get(keyed_server.url + "/openapi.json").json()["paths"]


def test_chat_streams_the_answer(open_server, page):
    open_page(page, open_server)
    sent = posts(page)
    # every change of the answer's text, and whether the stream was still running then
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const text = document.querySelector('.msg.assistant .text');
            if (text) window.seen.push([text.textContent, !document.getElementById('stop').hidden]);
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    fill(page, max_tokens=8)
    page.check("#p-ignore_eos")
    page.fill("#input", "Tell me a story.")
    page.press("#input", "Enter")
    finished(page)
    seen = page.evaluate("window.seen")
    while_streaming = {text for text, running in seen if running and text}
    assert len(while_streaming) >= 2, seen  # the text grew while the stream ran
    final = page.text_content(".msg.assistant .text")
    assert all(final.startswith(text) for text in while_streaming)
    stats = page.text_content(".msg.assistant .stats")
    assert "TTFT" in stats and "tok/s" in stats and "completion 8 tokens" in stats, stats
    assert "finish: length" in stats and "prompt " in stats and "cached" in stats
    (path, body), = sent  # fmt: skip
    assert path == CHAT and body["stream"] is True and body["perf_metrics_in_response"] is True
    assert body["messages"] == [{"role": "user", "content": "Tell me a story."}]
    assert page.input_value("#input") == ""


def test_stop_ends_the_stream_and_the_engine_request(open_server, page):
    open_page(page, open_server)
    fill(page, max_tokens=4000)
    page.check("#p-ignore_eos")
    page.fill("#input", "Count to a thousand.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .text')?.textContent.length > 0",
                           timeout=120_000)  # fmt: skip
    assert page.is_visible("#stop") and page.is_disabled("#send")
    page.click("#stop")
    finished(page)
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    assert "finish: stopped" in page.text_content(".msg.assistant .stats")
    open_server.wait_idle(timeout=30)  # the server aborted the engine request
    text = page.text_content(".msg.assistant .text")
    page.wait_for_timeout(500)
    assert page.text_content(".msg.assistant .text") == text


def test_raw_completion_matches_the_api(open_server, page):
    prompt = "The capital of France is"
    expected = api(open_server, COMPLETIONS, {"prompt": prompt, "max_tokens": 8,
                                              "temperature": 0})["choices"][0]["text"]  # fmt: skip
    open_page(page, open_server)
    sent = posts(page)
    page.uncheck("#use-chat")
    assert page.is_hidden("#chat-pane") and page.is_visible("#raw-pane")
    fill(page, max_tokens=8, temperature=0)
    page.fill("#raw-prompt", prompt)
    page.click("#raw-send")
    finished(page, "#raw-output")
    assert page.text_content("#raw-output .text") == expected
    (path, body), = sent  # fmt: skip
    assert path == COMPLETIONS and body["prompt"] == prompt and "messages" not in body
    page.click("#raw-append")
    assert page.input_value("#raw-prompt") == prompt + expected


def test_token_view_continues_from_an_alternative(open_server, page):
    prompt = "My favourite colour is"
    first = api(open_server, COMPLETIONS, {
        "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": True,
        "top_logprobs": 5, "return_token_ids": True,
    })["choices"][0]  # fmt: skip
    entries = first["logprobs"]["content"]
    open_page(page, open_server)
    sent = posts(page)
    page.uncheck("#use-chat")
    fill(page, max_tokens=6, temperature=0)
    page.fill("#raw-prompt", prompt)
    page.click("#raw-send")
    finished(page, "#raw-output")
    page.click("#raw-output .act-tokens")
    tokens = page.locator("#raw-output .tok")
    assert tokens.count() == len(entries)
    assert [tokens.nth(i).text_content() for i in range(len(entries))] == [
        e["token"] for e in entries
    ]
    tokens.nth(1).click()
    popup = page.locator("#token-popup")
    assert popup.is_visible()
    assert f"logprob {entries[1]['logprob']:.4f}" in popup.text_content()
    alts = popup.locator("button.alt")
    assert alts.count() == 5
    alt = entries[1]["top_logprobs"][1]  # greedy chose [0]: take the runner-up
    assert alts.nth(1).get_attribute("data-token") == alt["token"]
    alts.nth(1).click()
    finished(page, "#raw-output")
    ids = first["prompt_token_ids"] + [entries[0]["token_id"], alt["token_id"]]
    assert sent[-1] == (COMPLETIONS, {**sent[-1][1], "prompt": ids})
    assert sent[-1][1]["n"] == 1
    rest = api(open_server, COMPLETIONS, {"prompt": ids, "max_tokens": 6, "temperature": 0})
    expected = entries[0]["token"] + alt["token"] + rest["choices"][0]["text"]
    assert page.text_content("#raw-output .text") == expected
    # the token view goes on: the kept token, the chosen one, then the new ones
    assert page.locator("#raw-output .tok").nth(1).text_content() == alt["token"]


def test_chat_continues_the_answer_from_an_alternative(open_server, page):
    open_page(page, open_server)
    sent = posts(page)
    fill(page, max_tokens=4, temperature=0)
    page.fill("#input", "Name a fruit.")
    page.click("#send")
    finished(page)
    page.click(".msg.assistant .act-tokens")
    page.locator(".msg.assistant .tok").first.click()
    alt = page.locator("#token-popup button.alt").nth(1)
    token = alt.get_attribute("data-token")
    alt.click()
    finished(page)
    path, body = sent[-1]
    assert path == CHAT
    assert body["messages"] == [{"role": "user", "content": "Name a fruit."},
                                {"role": "assistant", "content": token}]  # fmt: skip
    assert page.text_content(".msg.assistant .text").startswith(token)
    assert page.locator(".msg").count() == 2


def test_parameters_panel_sends_every_field_and_shows_defaults(open_server, page):
    open_page(page, open_server)
    assert page.get_attribute("#p-temperature", "placeholder") == "1"  # the API's fallback
    assert page.get_attribute("#p-max_tokens", "placeholder") == "2048"  # chat's default
    assert page.evaluate("state.applied") == {}
    sent = posts(page)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fill(page, max_tokens=16, top_p=0.9, top_k=40, min_p=0.05, typical_p=0.95,
         presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.1,
         mirostat_target=5, mirostat_lr=0.2, seed=7, n=1, top_logprobs=3)  # fmt: skip
    page.fill("#p-stop", "END\nSTOP")
    page.fill("#p-logit_bias", '{"42": -100}')
    page.select_option("#p-format", "json_schema")
    page.fill("#p-schema", json.dumps(schema))
    page.fill("#input", "Is the sky blue?")
    page.click("#send")
    finished(page)
    (_, body), = sent  # fmt: skip
    assert {k: body[k] for k in ("max_tokens", "top_p", "top_k", "min_p", "typical_p",
                                 "presence_penalty", "frequency_penalty", "repetition_penalty",
                                 "mirostat_target", "mirostat_lr", "seed", "n",
                                 "top_logprobs")} == {
        "max_tokens": 16, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "typical_p": 0.95,
        "presence_penalty": 0.1, "frequency_penalty": 0.2, "repetition_penalty": 1.1,
        "mirostat_target": 5, "mirostat_lr": 0.2, "seed": 7, "n": 1, "top_logprobs": 3,
    }  # fmt: skip
    assert body["stop"] == ["END", "STOP"]
    assert body["logit_bias"] == {"42": -100} and body["logprobs"] is True
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "schema", "schema": schema},
    }
    assert "temperature" not in body  # left empty: the server's default applies
    answer = json.loads(page.text_content(".msg.assistant .text"))
    assert isinstance(answer["ok"], bool)
    # the sampling-options header told the page what ran: for the omitted temperature, the
    # model's default (the default GGUF has no generation config: 1), now the placeholder
    assert page.evaluate("state.applied") == {"temperature": 1}
    assert page.get_attribute("#p-temperature", "placeholder") == "1"
    assert '"top_k":40' in page.text_content("#applied")


def test_bad_input_is_reported_on_the_page(open_server, page):
    open_page(page, open_server)
    sent = posts(page)
    fill(page, max_tokens=4)
    page.fill("#p-logit_bias", "{nope")
    page.fill("#input", "Hi")
    page.click("#send")
    assert "logit_bias is not valid JSON" in page.text_content("#error")
    assert sent == []  # nothing was sent
    page.fill("#p-logit_bias", "")
    fill(page, top_k=500)
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('400')")
    assert "top_k" in page.text_content("#error")


def test_edit_regenerate_delete_export_import(open_server, page, tmp_path):
    open_page(page, open_server)
    sent = posts(page)
    fill(page, max_tokens=3)
    page.fill("#system", "Answer briefly.")
    page.fill("#input", "Hi there")
    page.click("#send")
    finished(page)
    page.click(".msg.user .act-edit")
    page.fill(".msg.user .editor textarea", "Hello again")
    page.click(".msg.user .act-save")
    assert page.text_content(".msg.user .text") == "Hello again"
    page.click(".msg.assistant .act-regenerate")
    finished(page)
    assert sent[-1][1]["messages"] == [{"role": "system", "content": "Answer briefly."},
                                       {"role": "user", "content": "Hello again"}]  # fmt: skip
    assert page.locator(".msg").count() == 2
    page.click(".msg.assistant .act-delete")
    assert page.locator(".msg").count() == 1
    with page.expect_download() as download:
        page.click("#export")
    path = tmp_path / "conversation.json"
    download.value.save_as(path)
    data = json.loads(path.read_text())
    assert data["format"] == "girandole-playground/1" and data["system"] == "Answer briefly."
    assert [m["choices"][0]["content"] for m in data["messages"]] == ["Hello again"]
    page.click("#clear")
    page.fill("#system", "")
    assert page.locator(".msg").count() == 0
    page.set_input_files("#import", str(path))
    page.wait_for_selector(".msg.user")
    assert page.text_content(".msg.user .text") == "Hello again"
    assert page.input_value("#system") == "Answer briefly."
    assert page.input_value("#p-max_tokens") == "3"


def test_keys_on_server_asks_for_a_key_on_401(keyed_server, page):
    page.goto(keyed_server.url + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    assert "401" in page.text_content("#key-reason")
    page.fill("#key-input", "wrong-key")
    page.click("#key-save")
    page.wait_for_function("document.getElementById('key-dialog').open")  # asked again
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert not dialog.is_visible()
    assert page.evaluate("localStorage.getItem('girandole.apiKey')") == API_KEY
    fill(page, max_tokens=3)
    page.fill("#input", "Hi")
    page.click("#send")
    finished(page)
    page.reload()  # the key is remembered
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert not dialog.is_visible()


def snippet(page, lang: str) -> str:
    page.click(f".tabs button[data-lang={lang}]")
    return page.text_content("#code")


def test_code_snippets_run_as_shown(keyed_server, context, page, tmp_path):
    with_key(context)
    open_page(page, keyed_server)
    fill(page, max_tokens=5, temperature=0)
    page.check("#p-ignore_eos")  # in no SDK's signature: the openai snippet's extra_body
    page.fill("#input", "Write a haiku.")
    page.click("#view-code")
    page.click("#copy-code")
    curl = page.evaluate("navigator.clipboard.readText()")
    assert curl == page.text_content("#code") and curl.startswith("curl ")
    assert f"Bearer {API_KEY}" in curl
    run = subprocess.run(["bash", "-c", curl + " -s -w '\\n%{http_code}'"], capture_output=True,
                         text=True, timeout=180)  # fmt: skip
    body, _, status = run.stdout.rpartition("\n")
    assert status == "200", run
    text = json.loads(body)["choices"][0]["message"]["content"]
    assert text and json.loads(body)["usage"]["completion_tokens"] == 5
    for lang in ("openai", "fireworks"):
        code = snippet(page, lang)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=180)  # fmt: skip
        assert out.returncode == 0, (code, out.stderr)
        assert out.stdout == text + "\n", code  # greedy: the same answer as curl's
    assert "extra_body" in snippet(page, "openai")
    script = tmp_path / "request.mjs"
    script.write_text(snippet(page, "js"))
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout == text + "\n", out


def test_n_choices_stream_side_by_side(open_server, page):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "n": 2, "seed": 3, "ignore_eos": True}
    expected = [c["text"] for c in api(open_server, COMPLETIONS, body)["choices"]]
    assert expected[0] != expected[1]  # seeded: different choices that repeat
    open_page(page, open_server)
    page.uncheck("#use-chat")
    fill(page, max_tokens=6, n=2, seed=3)
    page.check("#p-ignore_eos")
    page.fill("#raw-prompt", body["prompt"])
    page.click("#raw-send")
    finished(page, "#raw-output")
    assert page.text_content("#raw-output .choices span") == "choice 1/2"
    assert page.text_content("#raw-output .text") == expected[0]
    page.click("#raw-output .choices button >> nth=1")
    assert page.text_content("#raw-output .choices span") == "choice 2/2"
    assert page.text_content("#raw-output .text") == expected[1]
    assert "completion 12 tokens" in page.text_content("#raw-output .stats")


def test_mcp_tools_through_responses(open_server, page):
    """MCP servers named in the panel: chat goes to /v1/responses with them as tools; the
    answer shows the server's tool list and the call the server ran, with its result; the
    code view shows the Responses request, and its openai snippet runs."""
    from mcp_server import start_mcp_servers

    mcp = start_mcp_servers()
    try:
        open_page(page, open_server)
        page.fill("#p-mcp", "not-a-url")
        page.fill("#input", "Add 2 and 40.")
        page.press("#input", "Enter")
        page.wait_for_selector("#error:not([hidden])")
        assert "MCP servers" in page.text_content("#error")
        sent = posts(page)
        fill(page, max_tokens=40, temperature=0)
        page.fill("#p-mcp", f"calc {mcp.http_url}")
        page.select_option("#p-mcp-choice", "required")
        page.click("#send")
        finished(page)
        ((path, body),) = sent
        assert path == "/v1/responses" and body["stream"] is True and "messages" not in body
        assert body["input"] == [{"role": "user", "content": "Add 2 and 40."}]
        assert body["tools"] == [
            {"type": "mcp", "server_url": mcp.http_url, "server_label": "calc"}
        ]
        assert (body["tool_choice"], body["max_output_tokens"], body["temperature"]) == (
            "required", 40, 0)  # fmt: skip
        listed, call = page.locator(".msg.assistant .tool summary").all_text_contents()
        assert listed == "calc: 3 tools"
        assert call.startswith("calc.add(") and call.endswith(" · completed"), call
        arguments = json.loads(call.removeprefix("calc.add(").rsplit(") · ", 1)[0])
        page.click(".msg.assistant .tool >> nth=1")
        result = page.text_content(".msg.assistant .tool >> nth=1 >> pre")
        assert result == str(arguments["a"] + arguments["b"])
        assert "completion" in page.text_content(".msg.assistant .stats")
        page.click("#view-code")
        for lang in ("openai", "fireworks"):
            code = snippet(page, lang)
            assert "client.responses.create(" in code and '"type": "mcp"' in code
        out = subprocess.run([sys.executable, "-c", snippet(page, "openai")], capture_output=True,
                             text=True, timeout=180)  # fmt: skip
        assert out.returncode == 0, out.stderr
    finally:
        mcp.stop()
