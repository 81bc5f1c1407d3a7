"""The Messages and Responses APIs read by the real SDKs' typed models, strictly: every body and
stream event the server sends validates against the `openai` and `anthropic` packages' pydantic
models (the SDKs themselves build their objects without validation, so a required field left
out reads None there instead of failing; strict validation is what their typed users get)."""

from __future__ import annotations

import json

import httpx
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from api_helpers import MODEL, WEATHER_PARAMETERS
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

pytestmark = pytest.mark.slow

RESPONSE = TypeAdapter(Response)
RESPONSE_EVENT = TypeAdapter(ResponseStreamEvent)
MESSAGE = TypeAdapter(Message)
MESSAGE_EVENT = TypeAdapter(RawMessageStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}


def sse(server, path: str, body: dict) -> list[tuple[str, dict]]:
    """A stream's events as (event name, data)."""
    events, name = [], None
    with httpx.stream("POST", server.url + path, json=body, headers=server.headers,
                      timeout=120) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.removeprefix("data:"))))
    return events


@pytest.mark.parametrize(
    "body",
    [
        {"input": "Hi", "max_output_tokens": 4},
        {"input": "Hi", "max_output_tokens": 4, "include": ["message.output_text.logprobs"]},
        {"input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": "required",
         "max_output_tokens": 24},
    ],
    ids=["text", "logprobs", "function_call"],
)  # fmt: skip
def test_responses_validate_against_the_openai_sdks_models(server, body):
    body = {"model": MODEL, **body}
    r = httpx.post(server.url + "/v1/responses", json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    whole = RESPONSE.validate_python(r.json())
    # the usage's required details (cache_write_tokens: nothing here is a billed cache write)
    assert whole.usage is not None and whole.usage.input_tokens_details.cache_write_tokens == 0
    events = sse(server, "/v1/responses", body | {"stream": True})
    for name, data in events:
        assert name == data["type"]
        RESPONSE_EVENT.validate_python(data)
    assert events[-1][0] == "response.completed"
