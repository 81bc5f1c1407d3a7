"""The Messages and Responses APIs read by the real SDKs' typed models, strictly: every body and
stream event the server sends validates against the `openai` and `anthropic` packages' pydantic
models (the SDKs themselves build their objects without validation, so a required field left
out reads None there instead of failing; strict validation is what their typed users get); and
a message cut by the context window, as Anthropic's SDK names that stop."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from api_helpers import API_KEY, MODEL, WEATHER_PARAMETERS, named_events
from conftest import start_server, stop_server
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

pytestmark = pytest.mark.slow

RESPONSE = TypeAdapter(Response)
RESPONSE_EVENT = TypeAdapter(ResponseStreamEvent)
MESSAGE = TypeAdapter(Message)
MESSAGE_EVENT = TypeAdapter(RawMessageStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}


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
    events = named_events(server, "/v1/responses", body | {"stream": True})
    for name, data in events:
        assert name == data["type"]
        RESPONSE_EVENT.validate_python(data)
    assert events[-1][0] == "response.completed"


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 24,
         "tools": [{"name": "get_weather", "input_schema": WEATHER_PARAMETERS}],
         "tool_choice": {"type": "any"}},
    ],
    ids=["text", "tool_use"],
)  # fmt: skip
def test_messages_validate_against_the_anthropic_sdks_models(server, body):
    body = {"model": MODEL, **body}
    r = httpx.post(server.url + "/v1/messages", json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    MESSAGE.validate_python(r.json())
    events = named_events(server, "/v1/messages", body | {"stream": True})
    for name, data in events:
        assert name == data["type"]
        if name != "ping":  # the SDK skips pings before reading them
            MESSAGE_EVENT.validate_python(data)
    assert [name for name, _ in events][-2:] == ["message_delta", "message_stop"]


@pytest.fixture(scope="module")
def small_context_server(tmp_path_factory):
    """The default model with a 64-token context: an answer runs into the context's end."""
    srv = start_server(tmp_path_factory.mktemp("small-context"), "--max-model-len", "64",
                       "--kv-cache-gb", "0.05", api_key=None)  # fmt: skip
    yield srv
    stop_server(srv)


def test_a_message_cut_by_the_context_window_says_so(small_context_server):
    """max_tokens past what the context leaves is lowered to fit (as chat does); an answer cut
    there stopped at the context window, not at the client's max_tokens: Anthropic's
    `model_context_window_exceeded`, whole and streamed (the SDK's stream helper reads it)."""
    client = anthropic.Anthropic(base_url=small_context_server.url + "/inference",
                                 api_key="unused", max_retries=0)  # fmt: skip
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Count to a thousand."}],
           "extra_body": {"temperature": 0}}  # fmt: skip
    whole = client.messages.create(max_tokens=1000, **ask)
    assert whole.usage.input_tokens + whole.usage.output_tokens == 64
    assert (whole.stop_reason, whole.stop_sequence) == ("model_context_window_exceeded", None)
    with client.messages.stream(max_tokens=1000, **ask) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "model_context_window_exceeded"
    assert final.content[0].text == whole.content[0].text
    # cut by the client's own max_tokens, inside the context: max_tokens as before
    short = client.messages.create(max_tokens=3, **ask)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_responses_echo_the_cache_retention_and_verbosity_they_ran_with(server):
    """OpenAI's response object echoes `prompt_cache_retention` and `text.verbosity`: a
    request's accepted value reads back, not None."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2,
                                prompt_cache_retention="in_memory", text={"verbosity": "medium"})  # fmt: skip
    assert (r.prompt_cache_retention, r.text.verbosity) == ("in_memory", "medium")
    stored = client.responses.retrieve(r.id)
    assert (stored.prompt_cache_retention, stored.text.verbosity) == ("in_memory", "medium")
    plain = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    assert (plain.prompt_cache_retention, plain.text.verbosity) == (None, "medium")
