"""Images for a vision model beyond chat: Anthropic's Messages (image blocks, count_tokens),
OpenAI's Responses (input_image parts, stored turns, input_tokens) and /tokenize, each through
its real SDK or httpx on the tiny vision server (tests/api/conftest.py); what each writes is
chat's prompt for the same conversation, token for token."""

from __future__ import annotations

import base64
import time

import anthropic
import httpx
import openai
import pytest
from api_helpers import API_KEY
from conftest import VISION_MODEL as MODEL
from test_images import QUESTION, _data_url, _png


@pytest.fixture(scope="module")
def claude(vision_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=vision_server.url + "/inference", api_key=API_KEY, max_retries=0
    )


@pytest.fixture(scope="module")
def client(vision_server) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=API_KEY, base_url=vision_server.url + "/inference/v1", max_retries=0
    )


def _chat(client, *urls: str, text: str = QUESTION):
    """The chat completion of one user turn of images then text (greedy, 4 tokens)."""
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content = [*parts, {"type": "text", "text": text}]
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4,
        temperature=0,
    )  # fmt: skip


def _b64_block(data: bytes, media_type: str = "image/png") -> dict:
    source = {"type": "base64", "media_type": media_type, "data": base64.b64encode(data).decode()}
    return {"type": "image", "source": source}


# ---- Anthropic Messages


def test_messages_image_blocks_are_chat_image_parts(claude, client, vision_server):
    a, b = _png(1), _png(2)
    url = vision_server.url + "/no-such-image.png"  # a URL source: fetched as chat fetches
    chat = _chat(client, _data_url(a), _data_url(b))
    blocks = [_b64_block(a), _b64_block(b), {"type": "text", "text": QUESTION}]
    kw = dict(model=MODEL, max_tokens=4, extra_body={"temperature": 0})
    msg = claude.messages.create(messages=[{"role": "user", "content": blocks}], **kw)
    assert msg.content[0].text == chat.choices[0].message.content
    assert msg.usage.input_tokens == chat.usage.prompt_tokens
    counted = claude.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": blocks}]
    )
    assert counted.input_tokens == msg.usage.input_tokens
    # a URL source is chat's image_url: its errors name the block's field
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "see"},
                {"type": "image", "source": {"type": "url", "url": url}},
            ]}], **kw,
        )  # fmt: skip
    assert "HTTP 404" in info.value.message
    assert info.value.body["error"]["message"].endswith("field: 'messages.0.content.1.source.url'")


def test_messages_image_errors_name_the_block(claude):
    kw = dict(model=MODEL, max_tokens=2, system="Be brief.")  # chat's messages.3: renamed
    cases = [
        # a PNG said to be a JPEG: Anthropic's 400
        (_b64_block(_png(1), "image/jpeg"), "does not match the provided media type",
         "messages.2.content.0.source.media_type"),
        # bytes of no image at all
        (_b64_block(b"plain text, not a picture"), "not a PNG, JPEG, WebP or GIF",
         "messages.2.content.0.source.data"),
    ]  # fmt: skip
    for block, message, field in cases:
        messages = [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [block, {"type": "text", "text": "and this?"}]},
        ]
        with pytest.raises(anthropic.BadRequestError) as info:
            claude.messages.create(messages=messages, **kw)
        error = info.value.body["error"]
        assert error["type"] == "invalid_request_error"
        assert message in error["message"] and f"field: '{field}'" in error["message"], error
    gif = _png(4, fmt="GIF")  # Anthropic's fourth media type: read as its first frame
    msg = claude.messages.create(
        messages=[{"role": "user", "content": [_b64_block(gif, "image/gif")]}], **kw
    )
    # answered, as many tokens in as the same picture as a PNG (the random model's two greedy
    # tokens may end its turn: make test once got end_turn where max_tokens was expected)
    assert msg.stop_reason in ("max_tokens", "end_turn")
    png = claude.messages.count_tokens(
        model=MODEL,
        system=kw["system"],
        messages=[{"role": "user", "content": [_b64_block(_png(4))]}],
    )
    assert msg.usage.input_tokens == png.input_tokens


# ---- OpenAI Responses


def _input(*urls: str, text: str = QUESTION, detail: str = "auto") -> list[dict]:
    parts = [{"type": "input_image", "image_url": u, "detail": detail} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "input_text", "text": text}]}]


def test_responses_input_images_are_chat_image_parts_and_chain(client):
    a, b = _data_url(_png(1)), _data_url(_png(2))
    chat = _chat(client, a, b)
    kw = dict(model=MODEL, max_output_tokens=4, temperature=0)
    first = client.responses.create(input=_input(a, b, detail="low"), **kw)  # detail: no effect
    assert first.output_text == chat.choices[0].message.content
    assert first.usage.input_tokens == chat.usage.prompt_tokens
    counted = client.responses.input_tokens.count(model=MODEL, input=_input(a, b))
    assert counted.input_tokens == first.usage.input_tokens
    stored = client.responses.input_items.list(first.id).data[0].content
    assert [p.type for p in stored] == ["input_image", "input_image", "input_text"]
    # a later turn chained to it: the earlier images are sent again, as chat would send them
    second = client.responses.create(previous_response_id=first.id, input="And now?", **kw)
    whole = client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": a}},
                {"type": "image_url", "image_url": {"url": b}},
                {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And now?"},
        ],
    )  # fmt: skip
    assert second.usage.input_tokens == whole.usage.prompt_tokens
    assert second.output_text == whole.choices[0].message.content


def test_responses_image_errors_name_the_part(client):
    a = _data_url(_png(1))
    cases = [
        ([{"role": "user", "content": [{"type": "input_image", "file_id": "file-1",
                                        "detail": "auto"}]}],
         "file_id is not supported", "input.0.content.0.file_id"),
        ([{"role": "user", "content": "hi"},
          {"role": "assistant", "content": [{"type": "input_image", "image_url": a,
                                             "detail": "auto"}]}],
         "user messages only", "input.1.content.0"),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
          *_input(_data_url(b"not a picture"))],
         "not a PNG, JPEG, WebP or GIF", "input.2.content.0.image_url"),
    ]  # fmt: skip
    for items, message, field in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=MODEL, input=items, max_output_tokens=2)
        assert message in info.value.message, info.value.message
        assert info.value.body["param"] == field, info.value.body


# ---- /tokenize


def test_tokenize_expands_images_as_chat_does(vision_server, client):
    a = _data_url(_png(1))
    content = [{"type": "image_url", "image_url": {"url": a}}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": content}]
    r = httpx.post(
        vision_server.url + "/v1/tokenize",
        json={"model": MODEL, "messages": messages, "return_token_strs": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1, extra_body={"return_token_ids": True}
    )
    assert body["tokens"] == chat.choices[0].model_extra["prompt_token_ids"]
    assert body["token_strs"].count("<image_soft_token>") == 4  # the checkpoint's per image


# ---- a deployment of the vision model


def test_a_deployment_of_the_vision_model_reads_images(vision_server, client):
    """An embedded deployment (its own engine) of the server's model: chat with an image on
    `model#deployment` answers as the server's own engine does."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    base = vision_server.url + "/v1/accounts/testing/deployments"
    r = httpx.post(base, params={"deploymentId": "vis"}, json={"baseModel": MODEL}, headers=headers)
    assert r.status_code == 200, r.text
    try:
        deadline = time.monotonic() + 120
        while (d := httpx.get(base + "/vis", headers=headers).json())["state"] != "READY":
            assert d["state"] != "FAILED" and time.monotonic() < deadline, d
            time.sleep(0.2)
        a = _data_url(_png(1))
        own = _chat(client, a)
        parts = [{"type": "image_url", "image_url": {"url": a}}, {"type": "text", "text": QUESTION}]
        on_deployment = client.chat.completions.create(
            model=f"{MODEL}#accounts/testing/deployments/vis", max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": parts}],
        )  # fmt: skip
        assert on_deployment.choices[0].message.content == own.choices[0].message.content
        assert on_deployment.usage.prompt_tokens == own.usage.prompt_tokens
    finally:
        httpx.delete(base + "/vis", params={"hard": "true"}, headers=headers)
