"""Images in batch jobs on the tiny vision server (tests/api/conftest.py): a chat line's
image_url (OpenAI's Batch API, openai SDK) and a Messages line's image block (Anthropic's
Message Batches, anthropic SDK) run with their images, answering as the live request does; a
bad image fails its own line with the live route's 400, the other lines are fine."""

from __future__ import annotations

import base64
import json

import anthropic
import openai
import pytest
from api_helpers import API_KEY
from conftest import VISION_MODEL as MODEL
from test_images import QUESTION, _data_url, _png
from test_message_batches import wait_ended
from test_openai_batch import jsonl, wait_for

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
NOT_AN_IMAGE = _data_url(b"not an image at all")


def _chat_body(url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, "temperature": 0}  # fmt: skip


def test_openai_batch_chat_lines_carry_their_images(vision_server):
    client = openai.OpenAI(base_url=vision_server.url + "/v1", api_key=API_KEY, max_retries=0)
    live = openai.OpenAI(
        base_url=vision_server.url + "/inference/v1", api_key=API_KEY, max_retries=0
    )
    urls = {"a": _data_url(_png(1)), "b": _data_url(_png(2)), "bad": NOT_AN_IMAGE}
    lines = [{"custom_id": k, "method": "POST", "url": CHAT, "body": _chat_body(u)}
             for k, u in urls.items()]  # fmt: skip
    uploaded = client.files.create(file=("images.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    done = wait_for(client, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    results = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["a", "b"]
    for result in results:
        sync = live.chat.completions.create(**_chat_body(urls[result["custom_id"]]))
        body = result["response"]["body"]
        assert body["choices"][0]["message"]["content"] == sync.choices[0].message.content
        # the image's tokens are in the prompt: far more than the question's few
        assert body["usage"]["prompt_tokens"] == sync.usage.prompt_tokens > 50
    (error,) = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400
    with pytest.raises(openai.BadRequestError) as live_error:
        live.chat.completions.create(**_chat_body(NOT_AN_IMAGE))
    assert error["error"]["message"] == live_error.value.body["message"]


def test_message_batch_image_blocks(vision_server):
    claude = anthropic.Anthropic(
        base_url=vision_server.url + "/inference", api_key=API_KEY, max_retries=0
    )

    def params(data: bytes) -> dict:
        source = {"type": "base64", "media_type": "image/png",
                  "data": base64.b64encode(data).decode()}  # fmt: skip
        blocks = [{"type": "image", "source": source}, {"type": "text", "text": QUESTION}]
        return {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": blocks}]}

    requests = [{"custom_id": "img", "params": {**params(_png(3)), "temperature": 0}},
                {"custom_id": "bad", "params": {**params(b"not a png"), "temperature": 0}},
                {"custom_id": "text", "params": {"model": MODEL, "max_tokens": 4,
                 "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}}]  # fmt: skip
    batch = claude.messages.batches.create(requests=requests)
    done = wait_ended(claude, batch.id)
    assert (done.request_counts.succeeded, done.request_counts.errored) == (2, 1)
    img, bad, text = list(claude.messages.batches.results(batch.id))
    sync = claude.messages.create(**params(_png(3)), extra_body={"temperature": 0})
    assert img.result.type == "succeeded" and img.result.message.content == sync.content
    assert img.result.message.usage.input_tokens == sync.usage.input_tokens > 50
    assert bad.result.type == "errored"
    assert bad.result.error.error.type == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as live_error:
        claude.messages.create(**params(b"not a png"), extra_body={"temperature": 0})
    assert bad.result.error.error.message == live_error.value.body["error"]["message"]
    assert text.result.type == "succeeded"
