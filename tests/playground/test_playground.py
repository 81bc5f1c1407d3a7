"""The playground page driven in headless Chromium against the real server and default model:
streamed chat, stop, raw completions, the token view's continuation, the parameters panel, the
code snippets run as shown, export/import, a server with keys asking for one on 401, the
Embeddings and Rerank tabs (what they show is what the API answers), and, at the end, a thinking
model's reasoning blocks and the conversation's versions (branches)."""

from __future__ import annotations

import ast
import base64
import json
import math
import subprocess
import sys
from urllib.parse import urlsplit

import httpx
import pytest
from api_helpers import API_KEY, MODEL, api_conftest

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


def hi_then_regenerated(page, server, **params) -> None:
    """Open the page, send "Hi" with `params`, then regenerate the answer: two versions (2/2)."""
    open_page(page, server)
    fill(page, **params)
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    finished(page)
    page.click(".msg.assistant .act-regenerate")
    page.wait_for_selector(".msg.assistant .version-label:text-is('2/2')")
    finished(page)


ANSWER_LONGER_THAN = "document.querySelector('.msg.assistant .text')?.textContent.length > {}"


def start_long_answer(page, server, prompt: str = "Count to a thousand.") -> None:
    """Send a chat turn that streams for long (4,000 tokens, EOS ignored) and wait for its
    first text."""
    open_page(page, server)
    fill(page, max_tokens=4000)
    page.check("#p-ignore_eos")
    page.fill("#input", prompt)
    page.click("#send")
    page.wait_for_function(ANSWER_LONGER_THAN.format(0), timeout=120_000)


def answer_grows(page) -> None:
    """Wait until the streaming answer has grown by more than ten characters."""
    now = len(page.text_content(".msg.assistant .text"))
    page.wait_for_function(ANSWER_LONGER_THAN.format(now + 10), timeout=60_000)


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
    # 32 tokens: the page draws once a frame, and 8 (under 0.1 s) could all come in one frame
    # while a busy machine kept the browser waiting: no growth seen
    fill(page, max_tokens=32)
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
    assert "TTFT" in stats and "tok/s" in stats and "completion 32 tokens" in stats, stats
    assert "finish: length" in stats and "prompt " in stats and "cached" in stats
    (path, body), = sent  # fmt: skip
    assert path == CHAT and body["stream"] is True and body["perf_metrics_in_response"] is True
    assert body["messages"] == [{"role": "user", "content": "Tell me a story."}]
    assert page.input_value("#input") == ""
    assert page.is_hidden("#attach-button")  # a text-only model: nothing to attach


def test_stop_ends_the_stream_and_the_engine_request(open_server, page):
    start_long_answer(page, open_server)
    assert page.is_visible("#stop") and page.is_disabled("#send")
    page.click("#stop")
    finished(page)
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    assert "finish: stopped" in page.text_content(".msg.assistant .stats")
    open_server.wait_idle(timeout=30)  # the server aborted the engine request
    text = page.text_content(".msg.assistant .text")
    page.wait_for_timeout(500)
    assert page.text_content(".msg.assistant .text") == text


def test_scrolling_up_while_an_answer_streams_stays_put(open_server, page):
    """Every new token scrolled the page back to the answer's end, so no one could scroll up to
    read while it streamed; now the page follows only a reader who is at the end."""
    page.set_viewport_size({"width": 1280, "height": 500})
    start_long_answer(page, open_server, "line\n" * 30)
    assert page.evaluate("window.scrollY") > 0  # followed the answer down
    page.evaluate("window.scrollTo(0, 0)")
    answer_grows(page)  # more came, drawn
    assert page.evaluate("window.scrollY") == 0 and page.is_visible("#stop")
    page.click("#stop")
    finished(page)


def test_a_selection_survives_while_an_answer_streams(open_server, page):
    """Each new token redrew the whole conversation, so text selected to copy (the question, an
    earlier answer) vanished at once; now only the answer being streamed is redrawn."""
    start_long_answer(page, open_server)
    assert page.is_disabled(".msg.user .act-delete")  # the others' buttons: off while it runs
    page.evaluate("getSelection().selectAllChildren(document.querySelector('.msg.user .text'))")
    answer_grows(page)  # more came, drawn
    assert page.evaluate("getSelection().toString()") == "Count to a thousand."
    assert page.is_visible("#stop")
    page.click("#stop")
    finished(page)
    assert page.is_enabled(".msg.user .act-delete")


def test_clear_while_an_answer_streams_stops_it(open_server, page):
    """Clear emptied the page but left the answer streaming unseen: Stop still shown, Send
    disabled, the engine generating on; now it stops the request too."""
    start_long_answer(page, open_server)
    page.click("#clear")
    page.wait_for_selector("#stop", state="hidden", timeout=10_000)
    assert page.locator(".msg").count() == 0 and page.is_enabled("#send")
    open_server.wait_idle(timeout=30)


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


def test_a_newline_token_can_be_seen_and_clicked(open_server, page):
    """A newline token was drawn as a 2-pixel sliver: no one could see or click it to read its
    logprob and alternatives. It now shows a mark; its text stays the token's."""
    open_page(page, open_server)
    page.uncheck("#use-chat")
    page.fill("#raw-prompt", "One line")
    fill(page, max_tokens=2, logit_bias='{"107": 100}')  # 107: "\n"
    page.click("#raw-send")
    finished(page, "#raw-output")
    page.click("#raw-output .act-tokens")
    newline = page.locator("#raw-output .tok").first
    assert newline.text_content() == "\n"
    assert newline.bounding_box()["width"] >= 6, newline.bounding_box()
    newline.click()
    assert '"\\n" id 107' in page.text_content("#token-popup")


def test_the_token_view_works_from_the_keyboard(open_server, page):
    """Tokens were spans only a mouse could open; now Tab reaches the first, the arrows move
    along, Enter opens its popup (focus on the first alternative), Escape closes it."""
    open_page(page, open_server)
    page.uncheck("#use-chat")
    page.fill("#raw-prompt", "Once upon a time")
    fill(page, max_tokens=3, temperature=0)
    page.check("#p-ignore_eos")
    page.click("#raw-send")
    finished(page, "#raw-output")
    page.click("#raw-output .act-tokens")
    page.focus("#raw-output .act-text")
    page.keyboard.press("Tab")
    tokens = page.locator("#raw-output .tok")
    assert tokens.first.evaluate("t => t === document.activeElement")
    page.keyboard.press("ArrowRight")
    assert tokens.nth(1).evaluate("t => t === document.activeElement")
    page.keyboard.press("Enter")
    assert page.is_visible("#token-popup")
    assert page.evaluate("document.activeElement.classList.contains('alt')")
    page.keyboard.press("Escape")
    assert page.is_hidden("#token-popup")
    assert tokens.nth(1).evaluate("t => t === document.activeElement")


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
    # the continuation is a new version of the answer: the first is kept
    assert page.text_content(".msg.assistant .versions .version-label") == "2/2"


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


def test_a_failed_request_leaves_no_empty_answer_behind(open_server, page):
    """A 400 shows its error and no answer, and the message goes back to the composer; sent
    again, the conversation is that user's turn alone (before: an empty assistant message stayed,
    and went back as an empty assistant turn)."""
    open_page(page, open_server)
    sent = posts(page)
    fill(page, max_tokens=3, top_k=500)
    page.fill("#input", "Hi")
    page.click("#send")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('400')")
    page.wait_for_function("!document.body.classList.contains('busy')")
    assert page.locator(".msg").count() == 0 and page.input_value("#input") == "Hi"
    fill(page, top_k="")
    page.click("#send")
    finished(page)
    assert sent[-1][1]["messages"] == [{"role": "user", "content": "Hi"}]
    assert page.locator(".msg").count() == 2 and page.locator(".versions").count() == 0
    fill(page, top_k=500)  # a failed regeneration keeps the answer there, and no new version
    page.click(".msg.assistant .act-regenerate")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('400')")
    page.wait_for_function("!document.body.classList.contains('busy')")
    assert page.locator(".msg").count() == 2 and page.locator(".versions").count() == 0
    assert page.text_content(".msg.assistant .stats")  # the first answer, shown again
    page.uncheck("#use-chat")  # raw mode: no empty completion under the error
    page.fill("#raw-prompt", "Once upon a time")
    page.click("#raw-send")
    page.wait_for_function("!document.body.classList.contains('busy')")
    assert "top_k" in page.text_content("#error")
    assert page.locator("#raw-output .msg").count() == 0


def test_an_error_under_a_long_conversation_is_scrolled_into_view(open_server, page, tmp_path):
    """The error stands under the panes: with a conversation longer than the window and the
    message box at its bottom, a refused Send (temperature 9) put the error below the window's
    edge, and the page seemed to do nothing. The error is now scrolled into view."""
    turns = [{"role": ("user", "assistant")[k % 2], "choices": [{"content": f"{k} " + "blah " * 80}],
              "sel": 0} for k in range(12)]  # fmt: skip
    saved = tmp_path / "long.json"
    saved.write_text(json.dumps({"format": "girandole-playground/1", "messages": turns}))
    page.set_viewport_size({"width": 1280, "height": 800})
    open_page(page, open_server)
    page.set_input_files("#import", str(saved))
    page.wait_for_selector(".msg.user")
    fill(page, temperature=9)
    page.fill("#input", "Hi")
    page.evaluate("document.getElementById('input').scrollIntoView({block: 'end'})")
    page.press("#input", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "temperature" in page.text_content("#error")
    top, bottom, height = page.evaluate("""(() => {
        const r = document.getElementById('error').getBoundingClientRect();
        return [r.top, r.bottom, innerHeight]; })()""")
    assert 0 <= top and bottom <= height, (top, bottom, height)


def test_a_number_box_holding_no_number_is_an_error_not_left_out(open_server, page):
    """Typed "1e", seed reads as "" in the DOM: before, the request went unseeded and nothing
    said so; now the page names the field and sends nothing."""
    open_page(page, open_server)
    sent = posts(page)
    fill(page, max_tokens=3)
    page.click("#p-seed")
    page.keyboard.type("1e")
    page.fill("#input", "Hi")
    page.click("#send")
    assert page.text_content("#error") == "seed is not a number"
    page.click("#view-code")  # View code says the same
    assert not page.is_visible("#code-dialog")
    page.click("#tab-embeddings")
    page.fill("#embed-input", "a")
    page.click("#embed-dimensions")
    page.keyboard.type("-")
    page.click("#embed-send")
    assert page.text_content("#error") == "dimensions is not a number"
    assert sent == []


def focused(page) -> str:
    """The element with the keyboard focus: its id, else its title, else its tag."""
    return page.evaluate("(e => e.id || e.title || e.tagName)(document.activeElement)")


def test_the_keyboard_focus_stays_where_the_reader_works(open_server, page):
    """Each action pressed from the keyboard (Send, Stop, Regenerate, a version's ‹ ›, Edit, raw
    mode's Generate and Append, Embed) redrew or disabled the button pressed, and the focus fell
    to the page's body: a keyboard user went back to the page's top after each, and Edit's text
    could not be typed into without a click. Now the focus goes to the message box (Send, Stop), back to the
    redrawn button (Regenerate once the answer is in, ‹ ›: the other arrow at the last
    version), into the editor (Edit) and back to Edit when it closes; raw mode's Append gives it
    to the prompt; Embed and Rerank get it back once their answer is in."""
    open_page(page, open_server)
    fill(page, max_tokens=3, seed=1)
    page.fill("#input", "Hi")
    page.focus("#send")
    page.keyboard.press("Enter")
    finished(page)
    assert focused(page) == "input"
    page.focus(".msg.assistant .act-regenerate")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant .version-label:text-is('2/2')")
    finished(page)
    assert focused(page) == "Generate this answer again"
    page.focus(".msg.assistant .act-prev-version")
    page.keyboard.press("Enter")  # 1/2: ‹ is disabled there, › takes the focus
    assert page.text_content(".msg.assistant .version-label") == "1/2"
    assert focused(page) == "Next version"
    page.keyboard.press("Enter")
    assert page.text_content(".msg.assistant .version-label") == "2/2"
    assert focused(page) == "Previous version"
    page.focus(".msg.user .act-edit")
    page.keyboard.press("Enter")
    page.keyboard.type(" there")  # typed at the end of the text
    assert page.input_value(".msg.user .editor textarea") == "Hi there"
    page.focus(".msg.user .editor .act-cancel")
    page.keyboard.press("Enter")
    assert page.is_hidden(".msg.user .editor") and focused(page) == "Edit this message"
    # Stop, pressed from the keyboard
    fill(page, max_tokens=4000)
    page.check("#p-ignore_eos")
    page.fill("#input", "Count to a thousand.")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant:last-child .text:not(:empty)", timeout=120_000)
    page.focus("#stop")
    page.keyboard.press("Enter")
    finished(page)
    assert focused(page) == "input"
    # raw mode: Generate gives the focus to Stop while it runs, Stop back to Generate
    page.uncheck("#p-ignore_eos")
    fill(page, max_tokens=3)
    page.uncheck("#use-chat")
    page.fill("#raw-prompt", "Once upon a time")
    page.focus("#raw-send")
    page.keyboard.press("Enter")
    finished(page, "#raw-output")
    assert focused(page) == "raw-send"
    page.focus("#raw-append")
    page.keyboard.press("Enter")  # disabled then: the prompt takes the focus, at its end
    assert focused(page) == "raw-prompt"
    end = page.evaluate("(e => [e.selectionStart, e.value.length])(document.activeElement)")
    assert end[0] == end[1]
    # Embed, Rerank: disabled while their request runs, then the focus back on them
    page.click("#tab-embeddings")
    page.fill("#embed-input", "a")
    page.focus("#embed-send")
    page.keyboard.press("Enter")
    page.wait_for_selector("#embed-output:not([hidden])")
    page.wait_for_selector("#embed-send:not([disabled])")
    assert focused(page) == "embed-send"


def test_deleting_from_the_keyboard_keeps_the_focus_in_the_conversation(open_server, page):
    """Delete pressed on the last message took its buttons away with it and the focus fell to
    the page's body. Now the message left at the end takes it (Delete again goes on deleting),
    and the message box once the conversation is empty; a version deleted leaves it on Delete."""
    hi_then_regenerated(page, open_server, max_tokens=3, seed=1)
    delete = "Delete this version of the message and what follows it"
    page.focus(".msg.assistant .act-delete")
    page.keyboard.press("Enter")  # version 2 gone, version 1 shown: the focus on its Delete
    assert page.locator(".msg.assistant .version-label").count() == 0
    assert focused(page) == delete
    page.keyboard.press("Enter")  # the answer gone: the question's Delete
    assert page.locator(".msg.assistant").count() == 0
    assert focused(page) == delete
    assert page.evaluate("document.activeElement.closest('.msg.user') !== null")
    page.keyboard.press("Enter")  # nothing left: the message box
    assert page.locator(".msg").count() == 0
    assert focused(page) == "input"


def test_import_is_reached_and_opened_from_the_keyboard(open_server, page):
    """Import is a label for a hidden file input: Tab went from Export straight to Clear, and no
    key opened the file chooser. It is now in the Tab order, and Enter or Space clicks the file
    input (which opens the chooser; recorded here, and stopped, rather than waited for: whether
    headless Chromium shows a chooser is not this page's business)."""
    open_page(page, open_server)
    page.evaluate("""() => { window.clicks = 0; document.getElementById('import')
        .addEventListener('click', (e) => { window.clicks++; e.preventDefault(); }); }""")
    page.focus("#export")
    page.keyboard.press("Tab")
    assert focused(page) == "import-button"
    page.keyboard.press("Enter")
    page.keyboard.press(" ")
    assert page.evaluate("window.clicks") == 2


def test_a_right_to_left_line_reads_right_to_left(open_server, page):
    """An Arabic message was laid out left to right: its final "!" stood at the right end, after
    the words as an Arabic reader sees them; each line now takes its direction from its text."""
    open_page(page, open_server)
    fill(page, max_tokens=1)
    page.fill("#input", "Hello!\nمرحبا بالعالم!")
    page.click("#send")
    finished(page)
    # the x of the "!" and of the first letter of each line, as drawn
    xs = page.evaluate("""() => {
        const node = document.querySelector('.msg.user .text').firstChild;
        const x = (i) => { const r = document.createRange(); r.setStart(node, i);
                           r.setEnd(node, i + 1); return r.getBoundingClientRect().left; };
        const text = node.textContent, second = text.indexOf('\\n') + 1;
        return [x(0), x(second - 2), x(second), x(text.length - 1)];
    }""")
    assert xs[1] > xs[0]  # English: the "!" right of the "H"
    assert xs[3] < xs[2], xs  # Arabic: the "!" left of the first letter


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
    assert page.text_content(".msg.assistant .version-label") == "2/2"  # regenerated: kept
    page.click(".msg.assistant .act-delete")  # this version: the first is shown
    assert page.locator(".msg").count() == 2 and page.locator(".versions").count() == 0
    page.click(".msg.assistant .act-delete")
    assert page.locator(".msg").count() == 1
    with page.expect_download() as download:
        page.click("#export")
    path = tmp_path / "conversation.json"
    download.value.save_as(path)
    data = json.loads(path.read_text())
    assert data["format"] == "girandole-playground/2" and data["system"] == "Answer briefly."
    (user,) = data["tree"]["children"]
    assert user["choices"][0]["content"] == "Hello again" and user["children"] == []
    page.click("#clear")
    page.fill("#system", "")
    assert page.locator(".msg").count() == 0
    page.set_input_files("#import", str(path))
    page.wait_for_selector(".msg.user")
    assert page.text_content(".msg.user .text") == "Hello again"
    assert page.input_value("#system") == "Answer briefly."
    assert page.input_value("#p-max_tokens") == "3"


def test_import_sets_the_panel_fields_only(open_server, page, tmp_path):
    """A file whose parameters named another element of the page ("import", "system") had the
    page set it: the file input threw, the import stopped half done (the conversation not
    drawn); now only the panel's fields are read."""
    open_page(page, open_server)
    tree = {"children": [{"role": "user", "choices": [{"content": "<b>hi</b>"}], "children": []}]}
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps({"format": "girandole-playground/2", "system": "Be brief.",
                                "tree": tree, "parameters": {"import": "x", "system": "no",
                                                             "p-max_tokens": "5"}}))  # fmt: skip
    page.set_input_files("#import", str(path))
    page.wait_for_selector(".msg.user")
    assert page.text_content(".msg.user .text") == "<b>hi</b>"  # drawn as text
    assert page.input_value("#system") == "Be brief." and page.input_value("#p-max_tokens") == "5"


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


def test_a_key_given_after_the_dialog_was_cancelled_lists_the_models(keyed_server, page):
    """A wrong key given, then the dialog cancelled, the model list stayed empty: the key given
    when Send asked again was right, yet the message went with model "" and the page said "404:
    Model not found" until a reload. Send now lists the models first (the 401 asks for the key),
    then sends."""
    page.goto(keyed_server.url + "/")
    page.locator("#key-dialog").wait_for(state="visible")
    page.fill("#key-input", "wrong-key")
    page.click("#key-save")
    page.wait_for_function("document.getElementById('key-reason').textContent.includes('invalid')")
    # the server's message ends with a full stop: the dialog's sentence had two
    reason = "The server answered 401: The API key you provided is invalid. Enter an API key."
    assert page.text_content("#key-reason") == reason
    page.click("#key-dialog button[value=cancel]")
    page.wait_for_function("document.getElementById('error').textContent.includes('401')")
    assert page.evaluate("document.querySelector('#model').options.length") == 0
    sent = posts(page)
    fill(page, max_tokens=3)
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    page.locator("#key-dialog").wait_for(state="visible")
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    # the answer, or (before) the 404 of a request without a model
    page.wait_for_function("document.querySelector('#messages .stats') || "
                           "document.getElementById('error').textContent.startsWith('404')",
                           timeout=180_000)  # fmt: skip
    assert page.is_hidden("#error"), page.text_content("#error")
    assert page.input_value("#model") == MODEL
    assert page.text_content(".msg.user .text") == "Hi"
    assert [(path, body["model"]) for path, body in sent] == [(CHAT, MODEL)]


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


def test_raw_mode_openai_snippet_runs_as_shown(open_server, page):
    """Raw mode with the token view's top_logprobs and JSON mode: the openai snippet called
    completions.create(top_logprobs=..., response_format=...), which that method does not take
    (a TypeError); they now go in extra_body, and it prints the API's greedy answer."""
    open_page(page, open_server)
    page.uncheck("#use-chat")
    page.fill("#raw-prompt", "A JSON object:")
    fill(page, max_tokens=6, temperature=0)  # logprobs on: top_logprobs 5 is sent
    page.select_option("#p-format", "json_object")
    page.click("#view-code")
    code = snippet(page, "openai")
    assert "client.completions.create(" in code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert out.returncode == 0, (code, out.stderr)
    body = {"prompt": "A JSON object:", "max_tokens": 6, "temperature": 0,
            "response_format": {"type": "json_object"}}  # fmt: skip
    assert out.stdout == api(open_server, COMPLETIONS, body)["choices"][0]["text"] + "\n"


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


EMBEDDINGS = "/v1/embeddings"
RERANK = "/v1/rerank"
TEXTS = ["The cat sat on the mat.", "A kitten slept on the rug.", "Paris is the capital of France."]
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are rich in potassium.",
    "Paris is the capital and largest city of France.",
    "The Eiffel Tower is in Paris.",
    "def add(a, b): return a + b",
]


def shown(text: str) -> float:
    return float(text.replace("…", "").strip())


def near(text: str, value: float, decimals: int) -> bool:
    """A number the page shows with `decimals` decimals is `value` rounded (a hair's slack for
    the engine's float noise between two requests)."""
    return abs(shown(text) - value) <= 0.5 * 10**-decimals + 1e-5


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def cells(page, selector: str) -> list[list[str]]:
    return page.eval_on_selector_all(
        selector, "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )


def embed(page) -> None:
    page.click("#embed-send")
    page.wait_for_function("!document.getElementById('embed-send').disabled")


def check_embeddings(page, body: dict, expected: dict) -> None:
    """The page's tables show the server's answer for `body`."""
    vectors = [d["embedding"] for d in sorted(expected["data"], key=lambda d: d["index"])]
    rows = cells(page, "#embed-vectors tbody tr")
    assert len(rows) == len(body["input"]) == len(vectors)
    for i, (row, text, vector) in enumerate(zip(rows, body["input"], vectors)):
        index, shown_text, dims, norm, values = row
        assert (index, shown_text, dims) == (str(i), text, str(len(vector)))
        assert near(norm, math.sqrt(sum(x * x for x in vector)), 4), (norm, i)
        first = values.replace("…", "").split()
        assert len(first) == 8 and values.endswith("…")
        assert all(near(v, x, 4) for v, x in zip(first, vector[:8])), (first, vector[:8])
    matrix = cells(page, "#embed-matrix tbody tr")
    assert [row[0] for row in matrix] == [f"#{i}" for i in range(len(vectors))]
    for i, row in enumerate(matrix):
        assert len(row) == len(vectors) + 1
        assert row[1 + i] == "1.000"  # a vector's cosine with itself
        for j, value in enumerate(row[1:]):
            assert near(value, cosine(vectors[i], vectors[j]), 3), (i, j, value)
    usage = page.text_content("#embed-usage")
    assert f"prompt_tokens {expected['usage']['prompt_tokens']}" in usage, usage


def test_embeddings_tab_matches_the_api(open_server, page):
    open_page(page, open_server)
    sent = posts(page)
    page.click("#tab-embeddings")
    assert page.is_visible("#embed-pane") and page.is_hidden("#chat-pane")
    assert page.is_hidden("#params") and page.is_hidden("#use-chat") and page.is_hidden("#export")
    page.fill("#embed-input", f"{TEXTS[0]}\n\n{TEXTS[1]}\n   \n{TEXTS[2]}\n")  # blanks left out
    embed(page)
    (path, body), = sent  # fmt: skip
    assert path == EMBEDDINGS
    assert body == {"model": page.input_value("#model"), "input": TEXTS}
    assert page.is_hidden("#error") and page.is_visible("#embed-output")
    check_embeddings(page, body, api(open_server, EMBEDDINGS, body))
    # normalize and dimensions: the first 32 values, at unit norm
    page.check("#embed-normalize")
    page.fill("#embed-dimensions", "32")
    embed(page)
    path, body = sent[-1]
    assert body == {"model": page.input_value("#model"), "input": TEXTS, "normalize": True,
                    "dimensions": 32}  # fmt: skip
    check_embeddings(page, body, api(open_server, EMBEDDINGS, body))
    assert [row[2:4] for row in cells(page, "#embed-vectors tbody tr")] == [["32", "1.0000"]] * 3


def test_rerank_tab_matches_the_api(open_server, page):
    open_page(page, open_server)
    sent = posts(page)
    page.click("#tab-rerank")
    assert page.is_visible("#rerank-pane") and page.is_hidden("#embed-pane")
    page.fill("#rerank-query", QUERY)
    page.fill("#rerank-documents", "\n".join(DOCUMENTS[:2] + [""] + DOCUMENTS[2:]))
    for top_n in (None, 2):
        if top_n:
            page.fill("#rerank-top_n", str(top_n))
        page.click("#rerank-send")
        page.wait_for_function("!document.getElementById('rerank-send').disabled")
        path, body = sent[-1]
        assert path == RERANK
        assert body == {"model": page.input_value("#model"), "query": QUERY,
                        "documents": DOCUMENTS, **({"top_n": top_n} if top_n else {}),
                        "return_documents": True}  # fmt: skip
        expected = api(open_server, RERANK, body)
        data = expected["data"]
        assert len(data) == (top_n or len(DOCUMENTS))
        rows = page.locator("#rerank-list .ranked")
        assert rows.count() == len(data)
        for rank, d in enumerate(data):
            row = rows.nth(rank)
            assert row.locator(".rank").text_content() == str(rank + 1)
            assert row.locator(".doc-index").text_content() == f"#{d['index']}"
            assert row.locator(".doc").text_content() == d["document"] == DOCUMENTS[d["index"]]
            assert near(row.locator(".score").text_content(), d["relevance_score"], 4)
            # the bar as drawn: its fill's share of the bar's width is the score
            width, height = row.locator(".score-bar span").evaluate(
                "e => [e.offsetWidth / e.parentElement.clientWidth, e.offsetHeight]"
            )
            assert abs(width - d["relevance_score"]) < 0.01 and height > 0, (width, height)
        usage = page.text_content("#rerank-usage")
        assert f"prompt_tokens {expected['usage']['prompt_tokens']}" in usage, usage


def test_embeddings_and_rerank_errors_show_on_the_page(open_server, page):
    open_page(page, open_server)
    sent = posts(page)
    page.click("#tab-embeddings")
    page.fill("#embed-input", TEXTS[0])
    page.fill("#embed-dimensions", "1.5")
    page.click("#embed-send")
    assert page.text_content("#error") == "dimensions must be an integer"
    assert sent == []  # nothing was sent

    def server_error(button: str, *words: str) -> None:
        page.evaluate("document.getElementById('error').textContent = ''")  # not the last one
        page.click(button)
        page.wait_for_function("document.getElementById('error').textContent.startsWith('400')")
        text = page.text_content("#error")
        assert page.is_visible("#error") and all(w in text for w in words), text

    page.fill("#embed-dimensions", "100000")  # above the model's hidden size
    server_error("#embed-send", "dimensions")
    assert sent[-1][1]["dimensions"] == 100000 and page.is_hidden("#embed-output")
    page.fill("#embed-dimensions", "")
    embed(page)
    assert page.is_hidden("#error") and page.is_visible("#embed-output")
    page.fill("#embed-input", "\n \n")  # no inputs: the server refuses the empty list
    server_error("#embed-send", "'input'")
    assert sent[-1][1]["input"] == [] and page.is_hidden("#embed-output")
    page.click("#tab-rerank")
    assert page.is_hidden("#error")  # a tab's error goes with it
    page.fill("#rerank-query", QUERY)
    page.fill("#rerank-documents", "\n".join(DOCUMENTS))
    page.fill("#rerank-top_n", "0")
    server_error("#rerank-send", "top_n")
    assert page.is_hidden("#rerank-output")


def test_back_to_generate_still_chats(open_server, page):
    open_page(page, open_server)
    sent = posts(page)
    page.uncheck("#use-chat")  # raw mode is kept across tabs
    for tab in ("embeddings", "rerank"):
        page.click(f"#tab-{tab}")
        assert page.is_hidden("#chat-pane") and page.is_hidden("#raw-pane")
        assert page.get_attribute(f"#tab-{tab}", "aria-selected") == "true"
    page.click("#tab-generate")
    assert page.is_visible("#raw-pane") and page.is_visible("#params")
    assert page.is_hidden("#embed-pane") and page.is_hidden("#rerank-pane")
    page.check("#use-chat")
    assert page.is_visible("#chat-pane") and page.is_visible("#export")
    fill(page, max_tokens=4)
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    finished(page)
    (path, body), = sent  # fmt: skip
    assert path == CHAT and body["messages"] == [{"role": "user", "content": "Hi"}]
    assert "completion" in page.text_content(".msg.assistant .stats")


def test_a_phone_wide_window_scrolls_no_page_sideways(open_server, page):
    """At 360 pixels the model picker (320 at least) and the embeddings tables made the whole
    page scroll sideways, header and all; now the picker shrinks and the tables scroll alone."""
    page.set_viewport_size({"width": 360, "height": 800})
    open_page(page, open_server)
    width = "[document.documentElement.scrollWidth, window.innerWidth]"
    assert page.evaluate(width) == [360, 360]
    page.click("#tab-embeddings")
    page.fill("#embed-input", "\n".join("abcdefgh"))
    page.click("#embed-send")
    page.wait_for_selector("#embed-output:not([hidden])")
    assert page.evaluate(width) == [360, 360]
    matrix = page.locator("#embed-matrix")
    assert matrix.evaluate("t => t.scrollWidth > t.clientWidth")  # it scrolls, on its own


def test_a_phone_wide_message_keeps_its_buttons_inside_it(open_server, page):
    """At 390 pixels an answer with choices (n = 2) and versions ran its buttons out of its box:
    Regenerate cut in half, Delete out of sight and out of reach (the page does not scroll
    sideways). They now wrap onto a second line, each inside the message."""
    page.set_viewport_size({"width": 390, "height": 844})
    hi_then_regenerated(page, open_server, max_tokens=1, n=2)
    outside = page.evaluate("""() => Array.from(document.querySelectorAll('.msg button'))
        .filter((b) => {
            const box = b.closest('.msg').getBoundingClientRect(), r = b.getBoundingClientRect();
            return r.left < box.left || r.right > box.right;
        }).map((b) => b.textContent)""")
    assert outside == []
    page.click(".msg.assistant .act-delete")  # within reach: the first version is left
    assert page.locator(".msg.assistant .versions").count() == 0


def test_view_code_for_embeddings_and_rerank(open_server, page, tmp_path):
    """The snippets run as shown and print what the API answers: the openai SDK's
    embeddings.create, and httpx for rerank (no SDK has it)."""
    open_page(page, open_server)
    page.click("#tab-embeddings")
    page.fill("#embed-input", "\n".join(TEXTS))
    page.check("#embed-normalize")
    page.click("#view-code")
    code = snippet(page, "openai")
    assert "client.embeddings.create(" in code and "extra_body" in code  # normalize: not an arg
    assert "client.embeddings.create(" in snippet(page, "fireworks")
    curl = snippet(page, "curl")
    assert "/inference/v1/embeddings" in curl and '"normalize": true' in curl
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert out.returncode == 0, (code, out.stderr)
    expected = api(open_server, EMBEDDINGS, {"input": TEXTS, "normalize": True})["data"]
    lines = out.stdout.splitlines()
    assert len(lines) == len(expected)
    for line, d in zip(lines, expected):
        index, dims, values = line.split(" ", 2)
        assert (int(index), int(dims)) == (d["index"], len(d["embedding"]))
        assert all(abs(a - b) < 1e-4 for a, b in zip(ast.literal_eval(values), d["embedding"]))
    page.click("#code-dialog button[value=close]")

    page.click("#tab-rerank")
    page.fill("#rerank-query", QUERY)
    page.fill("#rerank-documents", "\n".join(DOCUMENTS))
    page.click("#view-code")
    assert page.text_content(".tabs button[data-lang=openai]") == "Python (httpx)"
    code = snippet(page, "openai")
    assert "httpx.post(" in code and "/inference/v1/rerank" in code
    assert "httpx.post(" in snippet(page, "fireworks")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert out.returncode == 0, (code, out.stderr)
    body = {"query": QUERY, "documents": DOCUMENTS, "return_documents": True}
    expected = api(open_server, RERANK, body)["data"]
    printed = [line.split(" ", 2) for line in out.stdout.splitlines()]
    assert [(int(i), t) for i, _, t in printed] == [(d["index"], d["document"]) for d in expected]
    assert all(
        abs(float(s) - d["relevance_score"]) < 1e-5 for (_, s, _), d in zip(printed, expected)
    )
    script = tmp_path / "rerank.mjs"
    script.write_text(snippet(page, "js"))
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and DOCUMENTS[1] in out.stdout, out
    page.click("#code-dialog button[value=close]")
    page.click("#tab-generate")  # the chat tabs come back
    page.click("#view-code")
    assert page.text_content(".tabs button[data-lang=openai]") == "Python (openai)"


# -- reasoning blocks and conversation versions -------------------------------------------
# The playground's reasoning blocks and conversation versions, in headless Chromium against real
# servers: a thinking model's reasoning streamed into a "Thinking" block (open while it thinks,
# folded once the answer starts) and sent back as reasoning_content; `reasoning_effort`; versions
# of a turn (regenerate, edit and send, continue from a token) with `‹ k/n ›`, each with its own
# continuation; delete; export/import of the tree (and of /1 files). What the page shows is
# checked against what the API answers for the same request.

# long enough that the page draws the block several times while the model thinks
THOUGHT = "Let me think about this step by step, one word at a time, slowly and surely."
ANSWER = "Yes."
THINK_THEN_ANSWER = f'root ::= "<think>\\n{THOUGHT}\\n</think>\\n\\n{ANSWER}"'
NO_THINKING = 'root ::= "Fine."'
# what the page's requests carry that the API's check requests need not
PAGE_ONLY = ("stream", "perf_metrics_in_response")


def qwen_chat(server, body: dict) -> dict:
    """The API's answer to `body` (a page's request: its model, tiny-qwen3's id)."""
    r = httpx.post(server.url + CHAT, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def grammar(page, rule: str) -> None:
    page.select_option("#p-format", "grammar")
    page.fill("#p-schema", rule)


def without_page_fields(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in PAGE_ONLY}


def curl_body(page) -> dict:
    """The JSON body of View code's curl snippet."""
    page.click("#view-code")
    page.click(".tabs button[data-lang=curl]")
    code = page.text_content("#code")
    page.click("#code-dialog button[value=close]")
    quoted = code.split("-d '", 1)[1].rsplit("'", 1)[0]
    return json.loads(quoted.replace("'\\''", "'"))  # the shell's quoting of an apostrophe


def version(page, nth: int) -> str | None:
    """The `k/n` of the branch's message `nth`, None without versions."""
    label = page.locator(".msg").nth(nth).locator(".versions .version-label")
    return label.text_content() if label.count() else None


def texts(page) -> list[str]:
    return page.locator(".msg > .text").all_text_contents()


def test_thinking_streams_into_a_block_that_folds_when_the_answer_starts(qwen_server, page):
    open_page(page, qwen_server)
    sent = posts(page)
    # the block as drawn on each change: [summary, open, reasoning, answer]
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const block = document.querySelector('.msg.assistant .thinking');
            const answer = document.querySelector('.msg.assistant > .text');
            if (block) window.seen.push([block.querySelector('summary').textContent, block.open,
                block.querySelector('.reasoning').textContent, answer ? answer.textContent : '']);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true});
    }""")
    fill(page, max_tokens=200, temperature=0)
    page.uncheck("#p-logprobs")  # see test_thinking_with_logprobs_on
    grammar(page, THINK_THEN_ANSWER)
    page.fill("#input", "Is it?")
    page.press("#input", "Enter")
    finished(page)
    ((path, body),) = sent
    assert path == CHAT and "reasoning_effort" not in body  # empty: not sent
    expected = qwen_chat(qwen_server, without_page_fields(body))
    message = expected["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (THOUGHT, ANSWER)
    seen = page.evaluate("window.seen")
    thinking = [s for s in seen if s[0] == "Thinking…"]
    assert thinking and all(open_ and answer == "" for _, open_, _, answer in thinking), seen
    assert any(0 < len(reasoning) < len(THOUGHT) for _, _, reasoning, _ in thinking), seen
    assert seen[-1] == ["Thinking", False, THOUGHT, ANSWER]  # folded once the answer came
    assert page.text_content(".msg.assistant > .text") == ANSWER
    reasoning_tokens = expected["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert f"({reasoning_tokens} reasoning)" in page.text_content(".msg.assistant .stats")
    block = page.locator(".msg.assistant .thinking")
    assert not page.is_visible(".msg.assistant .thinking .reasoning")
    block.locator("summary").click()  # unfolds, and stays so when the page redraws
    assert page.is_visible(".msg.assistant .thinking .reasoning")
    assert page.text_content(".msg.assistant .thinking .reasoning") == THOUGHT
    page.click(".msg.assistant .act-edit")
    page.click(".msg.assistant .act-cancel")
    assert block.evaluate("e => e.open")
    block.locator("summary").click()
    assert not block.evaluate("e => e.open")


def test_reasoning_goes_back_as_reasoning_content_and_effort_none_stops_it(qwen_server, page):
    open_page(page, qwen_server)
    sent = posts(page)
    fill(page, max_tokens=200, temperature=0)
    page.uncheck("#p-logprobs")
    grammar(page, THINK_THEN_ANSWER)
    page.fill("#input", "Is it?")
    page.click("#send")
    finished(page)
    page.select_option("#p-reasoning_effort", "none")
    grammar(page, NO_THINKING)
    page.fill("#input", "And now?")
    history = [
        {"role": "user", "content": "Is it?"},
        {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT},
        {"role": "user", "content": "And now?"},
    ]
    shown = curl_body(page)  # View code: the request as it will go
    assert shown["messages"] == history and shown["reasoning_effort"] == "none"
    page.click("#send")
    page.wait_for_selector(".msg:nth-child(4) .stats", timeout=120_000)
    path, body = sent[-1]
    assert body["messages"] == history and body["reasoning_effort"] == "none"
    assert without_page_fields(body) == shown
    expected = qwen_chat(qwen_server, without_page_fields(body))["choices"][0]["message"]
    assert expected["reasoning_content"] is None
    last = page.locator(".msg.assistant").nth(1)
    assert last.locator(".thinking").count() == 0  # no reasoning, no block
    assert last.locator("> .text").text_content() == expected["content"] == "Fine."
    assert page.locator(".msg.assistant").nth(0).locator(".thinking").count() == 1


def test_reasoning_effort_in_mcp_mode_is_responses_reasoning_effort(qwen_server, page):
    """With MCP servers named, the turn goes to /v1/responses: reasoning_effort as
    reasoning.effort, earlier turns without their reasoning_content (Responses' input messages
    have none); the server takes the request and the page shows its answer."""
    from mcp_server import start_mcp_servers

    mcp = start_mcp_servers()
    try:
        open_page(page, qwen_server)
        sent = posts(page)
        fill(page, max_tokens=200, temperature=0)
        page.uncheck("#p-logprobs")
        grammar(page, THINK_THEN_ANSWER)
        page.fill("#input", "Is it?")
        page.click("#send")
        finished(page)
        fill(page, max_tokens=8)
        page.fill("#p-mcp", f"calc {mcp.http_url}")
        page.select_option("#p-reasoning_effort", "high")
        page.fill("#input", "Add 2 and 40.")
        page.click("#send")
        page.wait_for_selector(".msg:nth-child(4) .stats", timeout=120_000)
        path, body = sent[-1]
        assert path == "/v1/responses" and body["reasoning"] == {"effort": "high"}
        assert body["input"] == [
            {"role": "user", "content": "Is it?"},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": "Add 2 and 40."},
        ]
        assert page.is_hidden("#error")
        assert "completion" in page.text_content(".msg:nth-child(4) .stats")
    finally:
        mcp.stop()


def test_a_server_gone_mid_stream_and_down_is_said_on_the_page(tmp_path, tiny_qwen3_dir, page):
    """Killed mid-answer: the page says the connection was lost (before: the browser's bare
    "network error"), keeps what came with "finish: error"; then down: it says it cannot reach
    the server (before: "Failed to fetch")."""
    helpers = api_conftest()
    server = helpers.start_server(tmp_path, "--model", str(tiny_qwen3_dir), "--kv-cache-gb",
                                  "0.02", "--max-model-len", "2048", api_key=None)  # fmt: skip
    try:
        open_page(page, server)
        fill(page, max_tokens=1800)
        page.check("#p-ignore_eos")
        page.uncheck("#p-logprobs")
        page.fill("#input", "Go on.")
        page.click("#send")
        page.wait_for_function("document.querySelector('.msg.assistant .text')?.textContent")
        server.process.kill()
        finished(page)
    finally:
        helpers.stop_server(server)
    error = page.text_content("#error")
    assert "connection to the server was lost" in error, error
    assert page.text_content(".msg.assistant .text")  # what came is kept
    assert "finish: error" in page.text_content(".msg.assistant .stats")
    page.fill("#input", "Still there?")
    page.click("#send")
    page.wait_for_function("document.getElementById('error').textContent.includes('reach')")
    assert f"Could not reach the server at {server.url}" in page.text_content("#error")


def test_continuing_inside_the_thinking_block_is_a_version_that_thinks_on(qwen_server, page):
    """The token view holds the thinking block's tokens too: continuing from one of them sends
    the text up to it as the assistant turn (an open <think> block); the new version's Thinking
    block is that text's reasoning and what the server reasons on from there."""
    open_page(page, qwen_server)
    sent = posts(page)
    fill(page, max_tokens=200, temperature=0)
    grammar(page, THINK_THEN_ANSWER)  # logprobs on: the token view
    page.fill("#input", "Is it?")
    page.click("#send")
    finished(page)
    page.click(".msg.assistant .act-tokens")
    tokens = page.locator(".msg.assistant .tok")
    assert tokens.nth(0).text_content() == "<think>"
    generated = tokens.count()
    fill(page, max_tokens=6)
    page.select_option("#p-format", "text")  # the grammar would start the answer over
    tokens.nth(4).click()
    page.locator("#token-popup button.alt").nth(1).click()
    finished(page)
    path, body = sent[-1]
    kept = body["messages"][-1]
    assert kept["role"] == "assistant" and kept["content"].startswith("<think>\n")
    assert "</think>" not in kept["content"]
    expected = qwen_chat(qwen_server, without_page_fields(body))["choices"][0]["message"]
    assert version(page, 1) == "2/2"
    reasoning = kept["content"].removeprefix("<think>\n") + expected["reasoning_content"]
    assert page.text_content(".msg.assistant .thinking .reasoning") == reasoning
    assert page.text_content(".msg.assistant > .text") == (expected["content"] or "")
    page.click(".msg.assistant .act-prev-version")  # the first version is kept, as it was left
    assert page.locator(".msg.assistant .tok").count() == generated
    page.click(".msg.assistant .act-text")
    assert page.text_content(".msg.assistant .thinking .reasoning") == THOUGHT


def test_thinking_with_logprobs_on(qwen_server, page):
    """With logprobs on (the panel's default) the chunks that carry the <think> markers carry
    no content (the server once sent those markers as delta.content)."""
    open_page(page, qwen_server)
    fill(page, max_tokens=200, temperature=0)
    grammar(page, THINK_THEN_ANSWER)  # logprobs stay on: the panel's default
    page.fill("#input", "Is it?")
    page.click("#send")
    finished(page)
    assert page.text_content(".msg.assistant .thinking .reasoning") == THOUGHT
    assert page.text_content(".msg.assistant > .text") == ANSWER


def test_versions_of_a_turn_each_keep_their_continuation(open_server, page, tmp_path):
    def expected(messages: list[dict], seed: int, **more) -> list[str]:
        body = {"messages": messages, "max_tokens": 4, "seed": seed, **more}
        return [c["message"]["content"] for c in api(open_server, CHAT, body)["choices"]]

    open_page(page, open_server)
    sent = posts(page)
    fill(page, max_tokens=4, seed=1)
    page.uncheck("#p-logprobs")
    page.fill("#input", "Hi")
    page.click("#send")
    finished(page)
    (a1,) = expected([{"role": "user", "content": "Hi"}], 1)
    assert texts(page) == ["Hi", a1] and version(page, 1) is None
    page.fill("#input", "More")
    page.click("#send")
    page.wait_for_selector(".msg:nth-child(4) .stats", timeout=120_000)
    a2 = texts(page)[3]
    first = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": a1},
             {"role": "user", "content": "More"}, {"role": "assistant", "content": a2}]  # fmt: skip

    # regenerating the first answer adds a second version of it, with n = 2 choices
    fill(page, seed=2, n=2)
    page.locator(".msg.assistant").nth(0).locator(".act-regenerate").click()
    finished(page)
    assert sent[-1][1]["messages"] == first[:1]
    b = expected(first[:1], 2, n=2)
    assert texts(page) == ["Hi", b[0]] and version(page, 1) == "2/2"
    choices = page.locator(".msg.assistant .choices span")
    assert choices.text_content() == "choice 1/2"  # the choices switcher, apart from versions
    page.click(".msg.assistant .choices button >> nth=1")
    assert texts(page) == ["Hi", b[1]] and version(page, 1) == "2/2"
    assert curl_body(page)["messages"] == [first[0], {"role": "assistant", "content": b[1]}]

    # back to version 1: its own continuation comes back
    page.click(".msg.assistant .act-prev-version")
    assert texts(page) == ["Hi", a1, "More", a2] and version(page, 1) == "1/2"
    assert page.is_disabled(".msg.assistant .act-prev-version")
    assert curl_body(page)["messages"] == first  # View code: the branch shown

    # editing the user message and sending it: a second version of it, answered
    fill(page, seed=3, n=1)
    page.locator(".msg.user").nth(0).locator(".act-edit").click()
    page.fill(".msg.user .editor textarea", "Hello")
    page.click(".msg.user .act-send")
    finished(page)
    assert sent[-1][1]["messages"] == [{"role": "user", "content": "Hello"}]
    (c,) = expected([{"role": "user", "content": "Hello"}], 3)
    assert texts(page) == ["Hello", c] and version(page, 0) == "2/2" and version(page, 1) is None
    page.click(".msg.user .act-prev-version")
    assert texts(page) == ["Hi", a1, "More", a2] and version(page, 0) == "1/2"

    # deleting version 1 of the answer (and what follows it) shows version 2
    page.locator(".msg.assistant").nth(0).locator(".act-delete").click()
    assert texts(page) == ["Hi", b[1]] and version(page, 1) is None

    with page.expect_download() as download:
        page.click("#export")
    path = tmp_path / "tree.json"
    download.value.save_as(path)
    data = json.loads(path.read_text())
    assert data["format"] == "girandole-playground/2" and "messages" not in data
    root = data["tree"]
    assert root["active"] == 0
    assert [v["choices"][0]["content"] for v in root["children"]] == ["Hi", "Hello"]
    (answer,) = root["children"][0]["children"]
    assert [c["content"] for c in answer["choices"]] == b and answer["sel"] == 1
    assert [v["choices"][0]["content"] for v in root["children"][1]["children"]] == [c]

    page.click("#clear")
    assert page.locator(".msg").count() == 0
    page.set_input_files("#import", str(path))
    page.wait_for_selector(".msg.user")
    assert texts(page) == ["Hi", b[1]] and version(page, 0) == "1/2"
    page.click(".msg.user .act-next-version")
    assert texts(page) == ["Hello", c]

    # a /1 export (a list of messages) still imports, as one branch
    old = {"format": "girandole-playground/1", "model": MODEL, "system": "",
           "messages": [{"role": "user", "choices": [{"content": "Hi"}], "sel": 0},
                        {"role": "assistant", "choices": [{"content": "Hello!"}], "sel": 0}]}  # fmt: skip
    (tmp_path / "v1.json").write_text(json.dumps(old))
    page.set_input_files("#import", str(tmp_path / "v1.json"))
    # the import's answer drawn (the branch shown before had two messages too: counting them
    # passed before the import was read)
    page.wait_for_selector(".msg.assistant:has-text('Hello!')")
    assert texts(page) == ["Hi", "Hello!"] and version(page, 0) is None
    assert page.is_hidden("#error")


# ---------------------------------------------------------------- images (a vision model)


def png(path, seed: int) -> bytes:
    """A small PNG written with Pillow (random pixels), saved at `path`; its bytes."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    Image.frombytes("RGB", (24, 16), rng.randbytes(24 * 16 * 3)).save(path, format="PNG")
    return path.read_bytes()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_an_image_attached_is_sent_shown_and_kept(vision_server, page, tmp_path):
    open_page(page, vision_server)
    sent = posts(page)
    assert page.is_visible("#attach-button") and page.is_hidden("#attachments")
    a, _ = png(tmp_path / "a.png", 1), png(tmp_path / "b.png", 2)
    page.set_input_files("#attach", str(tmp_path / "a.png"))
    page.wait_for_selector("#attachments .thumb")
    with page.expect_file_chooser() as chooser:  # the control from the keyboard
        page.focus("#attach-button")
        page.keyboard.press("Enter")
    chooser.value.set_files(str(tmp_path / "b.png"))
    page.wait_for_selector("#attachments .thumb:nth-child(2)")
    page.click("#attachments .thumb:nth-child(2) .remove-image")  # b.png taken away again
    assert page.locator("#attachments .thumb").count() == 1
    assert page.get_attribute("#attachments .thumb img", "src") == data_url(a)
    fill(page, max_tokens=3, temperature=0)
    page.fill("#input", "What is this?")
    # View code: the data: URL cut short on the page, whole in what Copy copies
    page.click("#view-code")
    assert data_url(a) not in page.text_content("#code")
    assert data_url(a)[:48] + "…(" in page.text_content("#code")
    page.click("#copy-code")
    assert data_url(a) in page.evaluate("navigator.clipboard.readText()")
    # the fallback where the clipboard API is refused (the selection copied) copies them whole
    page.evaluate("""async () => {
        await navigator.clipboard.writeText('');
        navigator.clipboard.writeText = () => Promise.reject(new Error('refused'));
    }""")
    page.click("#copy-code")
    assert data_url(a) in page.evaluate("navigator.clipboard.readText()")
    page.click("#code-dialog button[value=close]")
    page.press("#input", "Enter")
    finished(page)
    user = {"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": data_url(a)}},
    ]}  # fmt: skip
    (path, body), = sent  # fmt: skip
    assert path == CHAT and body["messages"] == [user]
    assert page.is_hidden("#attachments")  # gone with the message, shown in it
    assert page.get_attribute(".msg.user .thumb img", "src") == data_url(a)

    # the server saw the image: the prompt the page counts is the image's request's
    def prompt_tokens(message: dict) -> int:
        answer = httpx.post(vision_server.url + CHAT, timeout=60, json={
            "model": page.input_value("#model"), "messages": [message], "max_tokens": 1})  # fmt: skip
        return answer.json()["usage"]["prompt_tokens"]

    stats = page.text_content(".msg.assistant .stats")
    assert f"prompt {prompt_tokens(user)} tokens" in stats, stats
    assert prompt_tokens({"role": "user", "content": "What is this?"}) < prompt_tokens(user)
    page.click(".msg.assistant .act-regenerate")  # the image goes again
    page.wait_for_selector(".msg.assistant .version-label:text-is('2/2')")
    finished(page)
    assert sent[-1][1]["messages"] == [user]

    with page.expect_download() as download:
        page.click("#export")
    saved = tmp_path / "images.json"
    download.value.save_as(saved)
    (exported,) = json.loads(saved.read_text())["tree"]["children"]
    assert exported["images"] == [{"url": data_url(a), "name": "a.png"}]
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    page.set_input_files("#import", str(saved))
    page.wait_for_selector(".msg.user .thumb img")
    assert page.get_attribute(".msg.user .thumb img", "src") == data_url(a)
    # an edit sent again is a new version with the same image
    page.click(".msg.user .act-edit")
    page.fill(".msg.user .editor textarea", "And this?")
    page.click(".msg.user .act-send")
    finished(page)
    assert sent[-1][1]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "And this?"}, user["content"][1]]}]  # fmt: skip
    assert page.get_attribute(".msg.user .thumb img", "src") == data_url(a)
    assert page.is_hidden("#error")
    # a file written by hand: images that are not a list of {url, name} are left out
    tree = {"active": 1, "children": [
        {"role": "user", "choices": [{"content": "Hi"}], "images": "x"},
        {"role": "user", "choices": [{"content": "Yo"}], "images": [7, {}]},
    ]}  # fmt: skip
    saved.write_text(json.dumps({"format": "girandole-playground/2", "tree": tree}))
    page.set_input_files("#import", str(saved))
    page.wait_for_selector(".msg.user .text:text-is('Yo')")
    assert page.locator(".thumb").count() == 0


# Paste or drop files on the message box as a browser does: a DataTransfer of Files (bytes in
# base64; null: 21 MB of zeros).
GIVE_FILES = """([kind, files]) => {
    const transfer = new DataTransfer();
    for (const [name, type, bytes] of files) {
        const data = bytes === null ? new Uint8Array(21 * 1024 * 1024)
            : Uint8Array.from(atob(bytes), (c) => c.charCodeAt(0));
        transfer.items.add(new File([data], name, {type}));
    }
    const event = kind === 'paste' ? new ClipboardEvent('paste', {clipboardData: transfer})
        : new DragEvent('drop', {dataTransfer: transfer, cancelable: true});
    document.getElementById('input').dispatchEvent(event);
}"""


def test_images_pasted_dropped_too_big_or_refused_by_the_server(vision_server, page, tmp_path):
    open_page(page, vision_server)
    a = base64.b64encode(png(tmp_path / "a.png", 1)).decode()
    page.evaluate(GIVE_FILES, ["paste", [["image.png", "image/png", a]]])
    page.wait_for_selector("#attachments .thumb")
    # over the server's 20 MB: refused on the page, saying why; a text file is no image
    page.evaluate(GIVE_FILES, ["drop", [["big.png", "image/png", None],
                                        ["notes.txt", "text/plain", "aGk="]]])  # fmt: skip
    page.wait_for_selector("#error:not([hidden])")
    error = page.text_content("#error")
    assert "big.png is 21.0 MB: an image may be at most 20 MB" in error, error
    assert "notes.txt is not an image" in error
    assert page.locator("#attachments .thumb").count() == 1
    # a file that says it is a PNG but is not: the server's 400 is shown, the message kept
    page.evaluate(GIVE_FILES, ["drop", [["fake.png", "image/png", "bm90IGFuIGltYWdl"]]])
    page.wait_for_selector("#attachments .thumb:nth-child(2)")
    page.fill("#input", "Look")
    page.click("#send")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('400')")
    error = page.text_content("#error")
    assert "not a PNG, JPEG, WebP or GIF image" in error and "image_url.url" in error, error
    assert page.locator(".msg").count() == 0
    assert page.input_value("#input") == "Look"
    assert page.locator("#attachments .thumb").count() == 2
    # MCP mode: Responses' input_image parts (here an MCP server this server may not reach:
    # its 400 names it, and the message stays in the composer)
    page.click("#attachments .thumb:nth-child(2) .remove-image")
    page.fill("#p-mcp", "http://127.0.0.1:9/mcp")
    sent = posts(page)
    page.click("#send")
    page.wait_for_function("document.getElementById('error').textContent.includes('MCP server')")
    assert sent[-1][1]["input"] == [{"role": "user", "content": [
        {"type": "input_text", "text": "Look"}, {"type": "input_image", "image_url": data_url(
            base64.b64decode(a))}]}]  # fmt: skip
    assert page.text_content("#error").startswith("4"), page.text_content("#error")
    assert page.locator("#attachments .thumb").count() == 1
