"""SSE on the wire: framing, finish and usage chunks, n>1, stop strings split across tokens,
multi-byte characters."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from api_helpers import MODEL, post, sse_events

pytestmark = pytest.mark.slow


def texts_of(events) -> list[str]:
    return [
        e["choices"][0]["text"] for e in events[:-1] if e["choices"] and e["choices"][0]["text"]
    ]


def test_stream_framing(server):
    events = sse_events(server, {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    *content, finish, usage = chunks
    for c in content:
        (choice,) = c["choices"]
        assert choice["text"] and choice["finish_reason"] is None and choice["logprobs"] is None
        assert c["usage"] is None
    assert finish["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    ]
    assert finish["usage"] is None
    # Fireworks' 2026 placement: usage alone on a last chunk with empty choices
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 5
    assert "cached_tokens" in usage["usage"]["prompt_tokens_details"]


def test_stream_without_usage(server):
    events = sse_events(
        server, {"prompt": "Hi", "max_tokens": 2, "stream_options": {"include_usage": False}}
    )
    assert events[-1] == "[DONE]"
    assert all(e["usage"] is None and e["choices"] for e in events[:-1])


def test_stream_n_and_prompts(server):
    events = sse_events(
        server, {"prompt": ["One", "Two"], "n": 2, "max_tokens": 3, "temperature": 0}
    )
    chunks = events[:-1]
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(c["choices"][0]["index"] for c in finishes) == [0, 1, 2, 3]
    assert all(len(c["choices"]) == 1 for c in chunks[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    by_index: dict[int, str] = {}
    for c in chunks[:-1]:
        choice = c["choices"][0]
        by_index[choice["index"]] = by_index.get(choice["index"], "") + choice["text"]
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]


@pytest.fixture(scope="module")
def greedy_pieces(server) -> tuple[dict, list[str]]:
    body = {"prompt": "The history of the Roman Empire", "max_tokens": 16, "temperature": 0}
    return body, texts_of(sse_events(server, body))


def split_stop(pieces: list[str]) -> tuple[str, int]:
    """A stop string made of the end of one streamed piece and the start of the next, whose
    first occurrence in the text is there; and where that occurrence starts."""
    text = "".join(pieces)
    offset = 0
    for a, b in zip(pieces, pieces[1:], strict=False):
        offset += len(a)
        if len(a) >= 2 and len(b) >= 2:
            stop = a[-2:] + b[:2]
            if text.find(stop) == offset - 2:
                return stop, offset - 2
    raise AssertionError(f"no usable piece boundary in {pieces!r}")


def test_stop_string_split_across_tokens(server, greedy_pieces):
    body, pieces = greedy_pieces
    full = "".join(pieces)
    stop, at = split_stop(pieces)
    r = post(server, {**body, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == full[:at]
    assert r["choices"][0]["finish_reason"] == "stop"
    events = sse_events(server, {**body, "stop": stop})
    assert "".join(texts_of(events)) == full[:at]
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert stop not in "".join(texts_of(events))


def test_stop_string_at_the_start(server, greedy_pieces):
    body, pieces = greedy_pieces
    r = post(server, {**body, "stop": pieces[0][:3]}).json()
    assert r["choices"][0]["text"] == ""
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] >= 1


def test_multibyte_characters_are_never_split(server):
    body = {"prompt": "日本の首都は東京です。中国の首都は", "max_tokens": 12, "temperature": 0}
    pieces = texts_of(sse_events(server, body))
    assert all("\ufffd" not in p for p in pieces)
    whole = post(server, body).json()["choices"][0]["text"]
    assert "".join(pieces) == whole
    assert any(ord(ch) > 0x2E80 for ch in whole)


def test_emoji_written_in_byte_tokens_after_a_byte_token_prompt(server):
    """A prompt ending in emoji spelt in byte-fallback tokens, continued with more of them: the
    text is the UTF-8 of the generated tokens' bytes (logprobs' `bytes`), streamed or not.
    `tokenizers`' ByteFallback decoder turned a whole run of byte tokens with one invalid byte in
    it (here the detokenizer's window, which started in the middle of the prompt's last emoji)
    into U+FFFDs: '🎴🎴' came out as eight of them."""
    body = {"prompt": "🌁🎴🏑" * 3, "max_tokens": 10, "temperature": 0, "logprobs": True}
    choice = post(server, body).json()["choices"][0]
    raw = bytes(b for entry in choice["logprobs"]["content"] for b in entry["bytes"])
    assert len(raw) >= 8 and raw[0] >= 0x80  # byte-fallback tokens were generated
    assert choice["text"] == raw.decode("utf-8", errors="replace")
    assert "\ufffd" not in choice["text"][:-1]  # only a character cut by max_tokens is broken
    streamed = texts_of(sse_events(server, body))
    assert "".join(streamed) == choice["text"]
    assert all("\ufffd" not in p for p in streamed[:-1])


def test_prompt_ids_that_end_inside_a_character(server):
    """Prompt ids cut inside an emoji, continued by the model with that emoji's last bytes:
    the echoed text is the prompt and completion decoded together (raw_output's completion),
    not the prompt's U+FFFD followed by a completion that dropped the finished character; the
    completion alone starts with it."""
    ids = post(server, {"prompt": "🌁🎴🏑" * 3}, path="/tokenize").json()["tokens"]
    cut = ids[:-2]
    body = {"prompt": cut, "max_tokens": 6, "temperature": 0}
    echoed = post(server, {**body, "echo": True, "raw_output": True}).json()["choices"][0]
    assert echoed["text"] == echoed["raw_output"]["completion"].removeprefix("<bos>")
    plain = post(server, body).json()["choices"][0]["text"]
    head = post(server, {"tokens": cut[1:-2]}, path="/detokenize").json()["prompt"]
    assert echoed["text"] == head + plain
    assert "".join(texts_of(sse_events(server, {**body, "echo": True}))) == echoed["text"]
    assert "".join(texts_of(sse_events(server, body))) == plain


def test_errors_before_streaming_are_plain_json(server):
    r = post(server, {"prompt": "x", "stream": True, "temperature": 9})
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stop_string_that_is_a_special_token(server, path):
    """A stop string spelt as a special token ("<start_of_turn>", "<|im_start|>") stops at that
    token: the text never shows special tokens, so matching text alone ran on to max_tokens."""
    start_of_turn = 105  # Gemma's <start_of_turn>, pushed up so greedy decoding writes it
    body = {"max_tokens": 8, "temperature": 0, "logit_bias": {str(start_of_turn): 100}}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "Hi"
    free = post(server, {**body, "return_token_ids": True}, path=path).json()["choices"][0]
    assert free["token_ids"][0] == start_of_turn and free["finish_reason"] == "length"

    stopped = {**body, "stop": ["<start_of_turn>"]}
    r = post(server, stopped, path=path).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert (choice["message"]["content"] if "message" in choice else choice["text"]) == ""
    assert r["usage"]["completion_tokens"] == 1  # the stop token is counted, as EOS is
    events = sse_events(server, stopped, path=path)
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert finishes[-1] == "stop"
    assert events[-2]["usage"]["completion_tokens"] == 1


def test_line_separator_characters_do_not_cut_data_lines(server):
    """U+2028, U+2029 and U+0085 are left raw in JSON strings, but httpx's `iter_lines()` (as
    str.splitlines) breaks lines at them: a streamed text holding one (here echoed) cut its
    `data:` line in two, and the client read broken JSON. They are sent escaped."""
    body = {"model": MODEL, "prompt": "one\u2028two\u2029three\u0085four", "max_tokens": 2,
            "temperature": 0, "echo": True}  # fmt: skip
    whole = post(server, body).json()["choices"][0]["text"]
    assert whole.startswith("one\u2028two\u2029three\u0085four")
    text = ""
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "stream": True},
        headers=server.headers, timeout=120,
    ) as r:  # fmt: skip
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: "), line
        chunk = json.loads(line[len("data: ") :])
        text += "".join(c["text"] for c in chunk["choices"])
    assert text == whole


def test_a_stream_the_client_does_not_read_is_paused_and_goes_on_when_read(server):
    """Backpressure (engine/async_engine.py): before, the engine generated a stream whole into
    the server's memory while its client read nothing (one never-read n 16 stream with sampling
    masks grew the server 330 MB in 50 s). Each output here carries a list of the whole
    vocabulary (~2 MB of JSON), so the sockets' buffers hold only a few of them."""
    body = {
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 30, "ignore_eos": True,
        "temperature": 1.0, "top_k": 0, "top_p": 1.0, "logprobs": True,
        "sampling_mask": "non_zero_list", "stream": True,
    }  # fmt: skip
    pauses = server.wait_idle()["engine"]["num_backpressure_pauses"]
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=server.headers, timeout=120
    ) as r:
        assert r.status_code == 200
        deadline = time.monotonic() + 90
        while server.health()["engine"]["num_paused"] == 0:  # nothing read yet
            assert time.monotonic() < deadline, "the unread stream was never paused"
            time.sleep(0.1)
        time.sleep(1.0)
        engine = server.health()["engine"]
        assert engine["num_paused"] == 1 and engine["num_backpressure_pauses"] == pauses + 1
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    entries = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]  # fmt: skip
    assert len(entries) == 30  # every token, none lost or repeated across the pause
    assert all(e["token_id"] in e["sampling_mask"] for e in entries)
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == [
        "length"
    ]
    assert server.wait_idle()["engine"]["num_paused"] == 0
