"""/chat/completions on the real server and default model (Gemma 3 270M, built-in Gemma template),
driven by the openai and fireworks-ai clients and raw HTTP. The prompt the server feeds is checked
token for token against transformers' apply_chat_template."""

from __future__ import annotations

import fireworks
import openai
import pytest
from api_helpers import API_KEY, MODEL, post, sse_events

from girandole.tokenizer.chat_template import GEMMA_TEMPLATE

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
U1 = {"role": "user", "content": "What is the capital of France? 🌁"}
A1 = {"role": "assistant", "content": "Paris."}
U2 = {"role": "user", "content": "And of Italy?\nOne word."}


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=API_KEY, base_url=server.url + "/inference/v1", max_retries=0)


@pytest.fixture(scope="module")
def fw(server) -> fireworks.Fireworks:
    return fireworks.Fireworks(api_key=API_KEY, base_url=server.url, max_retries=0)


@pytest.fixture(scope="module")
def ref(tokenizer):
    """transformers' tokenizer class over the same tokenizer.json, to run apply_chat_template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(tokenizer.hf.to_str()),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
    )


def ref_ids(ref, messages, **kw) -> list[int]:
    kw.setdefault("add_generation_prompt", not kw.get("continue_final_message"))
    out = ref.apply_chat_template(messages, chat_template=GEMMA_TEMPLATE, tokenize=True, **kw)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def chat(server, body: dict, **kw):
    r = post(server, {"max_tokens": 1, "temperature": 0, **body}, path=CHAT, **kw)
    return r


def test_openai_basic_and_prompt_matches_transformers(oai, ref):
    messages = [SYSTEM, U1]
    r = oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, extra_body={"raw_output": True}
    )
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    expected = ref_ids(ref, messages)
    assert expected[0] == ref.bos_token_id and expected.count(ref.bos_token_id) == 1
    raw = choice.model_extra["raw_output"]
    assert raw["prompt_token_ids"] == expected
    assert r.usage.prompt_tokens == len(expected)  # BOS and template tokens counted
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the fragments: BOS, <start_of_turn>, text, <end_of_turn>... as the model saw them
    start, end = ref.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert raw["prompt_fragments"][:3] == [ref.bos_token_id, start, "user\n" + SYSTEM["content"]
                                           + "\n\n" + U1["content"]]  # fmt: skip
    assert raw["prompt_fragments"][-4:] == [end, "\n", start, "model\n"]
    assert raw["completion_token_ids"] and raw["completion"].startswith(choice.message.content)


@pytest.mark.parametrize(
    "messages",
    [[U1], [SYSTEM, U1, A1, U2], [U1, A1, U2]],
    ids=["single", "system-multi", "multi"],
)
def test_multi_turn_prompt_tokens(server, ref, messages):
    r = chat(server, {"messages": messages, "raw_output": True, "max_tokens": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["raw_output"]["prompt_token_ids"] == ref_ids(ref, messages)
    assert body["usage"]["prompt_tokens"] == len(ref_ids(ref, messages))


def test_continue_final_message(server, ref):
    partial = {"role": "assistant", "content": "The capital of France is"}
    messages = [SYSTEM, U1, partial]
    r = chat(server, {"messages": messages, "raw_output": True, "max_tokens": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = choice["raw_output"]["prompt_token_ids"]
    assert ids == ref_ids(ref, messages, continue_final_message=True)
    assert choice["raw_output"]["prompt_fragments"][-1] == "model\nThe capital of France is"
    # the answer continues the message: it is not a new turn
    assert "<start_of_turn>" not in choice["raw_output"]["completion"]
    assert "Paris" in choice["message"]["content"]


def test_empty_system_and_content_parts(server):
    base = chat(server, {"messages": [U1], "raw_output": True}).json()["choices"][0]
    ids = base["raw_output"]["prompt_token_ids"]
    for messages in (
        [{"role": "system", "content": ""}, U1],
        [{"role": "system", "content": []}, U1],
        [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                      {"type": "text", "text": " of France? 🌁"}]}],
    ):  # fmt: skip
        r = chat(server, {"messages": messages, "raw_output": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["raw_output"]["prompt_token_ids"] == ids
    # a non-empty system prompt does change the prompt
    r = chat(server, {"messages": [SYSTEM, U1], "raw_output": True})
    assert len(r.json()["choices"][0]["raw_output"]["prompt_token_ids"]) > len(ids)


def test_stream_matches_non_stream(oai):
    kw = dict(model=MODEL, messages=[SYSTEM, U1], max_tokens=8, temperature=0)
    full = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_stream_wire_format_n2(server):
    body = {"messages": [U1], "n": 2, "max_tokens": 5, "temperature": 0, "raw_output": True}
    events = sse_events(server, body, path=CHAT)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    # role chunks first, one per choice
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant"}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks[2:-1]:
        (choice,) = c["choices"]
        assert c["usage"] is None and c["object"] == "chat.completion.chunk"
        if choice["finish_reason"] is None:
            texts[choice["index"]] += choice["delta"]["content"]
        else:
            assert choice["delta"] == {} and choice["index"] not in finishes
            finishes[choice["index"]] = choice["finish_reason"]
            raw = choice["raw_output"]  # the finish chunk carries raw_output
            assert raw["prompt_token_ids"][0] == 2 and len(raw["completion_token_ids"]) == 5
    assert finishes == {0: "length", 1: "length"} and texts[0] == texts[1] and texts[0]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    # interleaved: choice 1's content starts before choice 0 is done
    order = [c["choices"][0]["index"] for c in chunks[2:-1]]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)


def test_stream_usage_opt_out(server):
    body = {"messages": [U1], "max_tokens": 2, "stream_options": {"include_usage": False}}
    events = sse_events(server, body, path=CHAT)
    assert all(e["usage"] is None and e["choices"] for e in events[:-1])


def test_stream_echo_chunks_carry_their_own_logprobs_and_ids(server, tokenizer):
    """echo in a chat stream: each chunk's logprobs and token ids are those of its own text.
    Before, the echoed prompt went in a chunk of its own that also carried the first generated
    token's logprob entry and id, and that token's text came in the next chunk with neither."""
    body = {"messages": [U1], "max_tokens": 4, "temperature": 0, "echo": True,
            "logprobs": True, "return_token_ids": True}  # fmt: skip
    whole = post(server, body, path=CHAT).json()["choices"][0]
    events = sse_events(server, body, path=CHAT)
    content = [c["choices"][0] for c in events[:-1] if c["choices"]]
    content = [c for c in content if c["delta"].get("content")]
    assert "".join(c["delta"]["content"] for c in content) == whole["message"]["content"]
    generated = []
    for c in content:
        entries = c["logprobs"]["content"]
        text = bytes(b for e in entries if not tokenizer.is_special(e["token_id"])
                     for b in e["bytes"]).decode()  # fmt: skip
        assert text == c["delta"]["content"]
        assert c["token_ids"] == [e["token_id"] for e in entries][-len(c["token_ids"]) :]
        generated += c["token_ids"]
    assert generated == whole["token_ids"]


def test_fireworks_sdk(fw, oai):
    kw = dict(model=MODEL, messages=[U1], max_tokens=6, temperature=0)
    r = fw.chat.completions.create(**kw)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert (
        r.choices[0].message.content == oai.chat.completions.create(**kw).choices[0].message.content
    )
    text = "".join(
        c.choices[0].delta.content or "" for c in fw.chat.completions.create(stream=True, **kw)
        if c.choices
    )  # fmt: skip
    assert text == r.choices[0].message.content
    # n=2, logprobs and stop through the Fireworks SDK too
    r2 = fw.chat.completions.create(n=2, logprobs=True, top_logprobs=1, stop=["\n\n\n"], **kw)
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.choices[0].message.content == r2.choices[1].message.content == text
    content = r2.choices[0].logprobs.content
    assert len(content) == r2.usage.completion_tokens // 2 and len(content[0].top_logprobs) == 1


def test_n2_seeded(oai):
    kw = dict(model=MODEL, messages=[U1], max_tokens=6, temperature=1.0, seed=7, n=2)
    r = oai.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert 2 <= r.usage.completion_tokens <= 12
    again = oai.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_stop_is_trimmed(oai):
    kw = dict(model=MODEL, messages=[SYSTEM, U1], max_tokens=12, temperature=0)
    text = oai.chat.completions.create(**kw).choices[0].message.content
    word = next(w for w in text.split() if len(w) >= 3 and text.index(w) > 0)
    r = oai.chat.completions.create(stop=[word, "zzzz"], **kw)
    assert r.choices[0].message.content == text[: text.index(word)]
    assert r.choices[0].finish_reason == "stop"
    streamed = oai.chat.completions.create(stop=word, stream=True, **kw)
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == (text[: text.index(word)])
    )


def test_logprobs_content_format(oai, tokenizer):
    kw = dict(model=MODEL, messages=[U1], max_tokens=6, temperature=0, logprobs=True,
              top_logprobs=3)  # fmt: skip
    r = oai.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    text = r.choices[0].message.content
    offset = 0
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0
        assert bytes(entry.bytes) == tokenizer.token_bytes(entry.model_extra["token_id"])
        assert entry.model_extra["text_offset"] == offset
        offset += len(entry.token) if not tokenizer.is_special(entry.model_extra["token_id"]) else 0
        assert "sampling_logprob" in entry.model_extra
    if r.choices[0].finish_reason == "length":
        assert "".join(e.token for e in content) == text
    # streamed: the same entries, spread over the content chunks
    chunks = list(oai.chat.completions.create(stream=True, **kw))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]  # fmt: skip
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_logprobs_legacy_format_and_none(server):
    body = chat(server, {"messages": [U1], "logprobs": 2, "max_tokens": 3}).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 3
    for token, top in zip(lp["tokens"], lp["top_logprobs"]):
        assert token in top and 2 <= len(top) <= 3
    assert chat(server, {"messages": [U1]}).json()["choices"][0]["logprobs"] is None


def test_prompt_truncate_len_drops_oldest_turns(server, ref):
    old = [{"role": "user", "content": "First question, long ago: " + "blah " * 40},
           {"role": "assistant", "content": "An old answer. " * 10}]  # fmt: skip
    messages = [SYSTEM, *old, U1, A1, U2]
    full = ref_ids(ref, messages)
    kept = ref_ids(ref, [SYSTEM, U1, A1, U2])
    r = chat(server, {"messages": messages, "raw_output": True, "prompt_truncate_len": len(kept)})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["raw_output"]["prompt_token_ids"] == kept
    # a limit that only the last turn fits: all earlier turns go, the system prompt stays
    last = ref_ids(ref, [SYSTEM, U2])
    r = chat(server, {"messages": messages, "raw_output": True, "prompt_truncate_len": len(last)})
    assert r.json()["choices"][0]["raw_output"]["prompt_token_ids"] == last
    # enough room: nothing changes
    r = chat(server, {"messages": messages, "raw_output": True, "prompt_truncate_len": len(full)})
    assert r.json()["choices"][0]["raw_output"]["prompt_token_ids"] == full
    # then the system prompt goes; then a 400
    alone = ref_ids(ref, [U2])
    r = chat(server, {"messages": messages, "raw_output": True, "prompt_truncate_len": len(alone)})
    assert r.json()["choices"][0]["raw_output"]["prompt_token_ids"] == alone
    r = chat(server, {"messages": messages, "prompt_truncate_len": len(alone) - 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_truncate_len"


def test_models_supports_chat(server):
    import httpx

    r = httpx.get(server.url + "/v1/models", headers=server.headers)
    assert r.json()["data"][0]["supports_chat"] is True
    assert r.json()["data"][0]["supports_image_input"] is False  # a text-only model


BAD = [
    ({"messages": [{"role": "user", "content": "Hi", "name": "bob"}]}, "messages.0.name"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "messages.0.role"),
    ({"messages": [{"content": "Hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "data:,"}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "system", "content": ""}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": ""}]}, "messages"),
    ({"messages": [U1, U1]}, "messages"),  # Gemma: roles must alternate
    ({"messages": [U1], "prompt": "x"}, "prompt"),
    ({"messages": [U1], "tools": [{"type": "function", "function": {"name": "f g"}}]},
     "tools.0.function.name"),
    ({"messages": [U1], "response_format": {"type": "json_object", "schema": {"not": {}}}},
     "response_format.schema"),
    ({"messages": [U1], "echo_last": -1}, "echo_last"),
    ({"messages": [U1], "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": [U1], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [U1], "logprobs": 6}, "logprobs"),
    ({"messages": [U1], "max_tokens": 2, "max_completion_tokens": 2}, "max_completion_tokens"),
    ({"messages": [U1], "n": 0}, "n"),
    ({"messages": [U1], "prompt_truncate_len": 0}, "prompt_truncate_len"),
    ({"messages": [U1], "max_tokens": 100000, "context_length_exceeded_behavior": "error"},
     "max_tokens"),
]  # fmt: skip


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_bad_requests_are_400(server, body, param):
    r = post(server, body, path=CHAT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    if param == "messages.0.name":
        assert error["message"] == "Extra inputs are not permitted, field: 'messages.0.name'," \
                                   " value: 'bob'"  # fmt: skip
    if body.get("messages") == [{"role": "assistant", "content": ""}]:  # no system message
        assert error["message"].endswith("only assistant messages with empty content")


def test_unknown_model_and_no_op_fields(server):
    r = post(server, {"model": "accounts/fireworks/models/nope", "messages": [U1]}, path=CHAT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    # fields whose value asks for nothing are accepted
    r = chat(server, {"messages": [U1], "tools": [], "tool_choice": "auto", "echo": False,
                      "response_format": {"type": "text"}, "frequency_penalty": 0, "user": "u"})  # fmt: skip
    assert r.status_code == 200, r.text


def test_tool_role_messages_reach_the_template(server):
    # Gemma's template has no tool role: calls are written into the assistant turn and results
    # become a user turn (girandole.api.chat.tools), so roles still alternate
    messages = [U1, {"role": "assistant", "content": None,
                     "tool_calls": [{"id": "c1", "type": "function",
                                     "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}]  # fmt: skip
    r = chat(server, {"messages": messages, "max_tokens": 2, "raw_output": True})
    assert r.status_code == 200, r.text
    fragments = r.json()["choices"][0]["raw_output"]["prompt_fragments"]
    assert 'model\n{"name": "f", "arguments": {}}' in fragments
    assert "user\nResult of f (call c1): 42" in fragments
