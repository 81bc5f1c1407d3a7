"""Messages and Responses where they parted from Anthropic's and OpenAI's documented behaviour:
`max_tokens: 0` pre-warms the prompt cache (anthropic's SDK documents it), a thinking budget
not under `max_tokens` is a 400, and a developer/system message after a stored conversation
(Responses) reads as user text rather than breaking the chat template."""

from __future__ import annotations

import re

import anthropic
import httpx
import openai
import pytest
from api_helpers import API_KEY, MODEL, WEATHER_PARAMETERS, named_events

pytestmark = pytest.mark.slow


@pytest.fixture
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url + "/inference", api_key=API_KEY, timeout=120)


@pytest.fixture
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/inference/v1", api_key=API_KEY, timeout=120)


def cached_prompt_tokens(server) -> float:
    """The server's cached prompt token counter (/metrics)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    found = re.findall(r"^girandole_cached_prompt_tokens_total\S* (\S+)$", text, re.M)
    return sum(float(v) for v in found)


def test_max_tokens_zero_prewarms_the_prompt_cache(server, claude):
    system = "You answer questions about the weather in Lisbon. " * 12  # several cache blocks
    messages = [{"role": "user", "content": "Is it sunny today?"}]
    before = cached_prompt_tokens(server)
    warm = claude.messages.create(model=MODEL, max_tokens=0, system=system, messages=messages)
    assert warm.content == [] and warm.stop_reason == "max_tokens"
    assert warm.usage.output_tokens == 0 and warm.usage.input_tokens > 100
    after_warm = cached_prompt_tokens(server)
    # the next request on that prompt reads it from the cache the first one filled
    answer = claude.messages.create(model=MODEL, max_tokens=2, system=system, messages=messages)
    assert answer.usage.input_tokens == warm.usage.input_tokens
    read = cached_prompt_tokens(server) - after_warm
    assert read >= warm.usage.input_tokens - 16, (before, after_warm, read)
    # warming a prompt the cache holds whole is answered the same
    again = claude.messages.create(model=MODEL, max_tokens=0, system=system, messages=messages)
    assert again.content == [] and again.usage == warm.usage


@pytest.mark.parametrize(
    "tools",
    [{"tool_choice": {"type": "tool", "name": "get_weather"}},
     {"tool_choice": {"type": "any"}},
     {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}],
    ids=["tool", "any", "format"],
)  # fmt: skip
def test_max_tokens_zero_generates_nothing_whatever_is_forced(server, tools):
    body = {"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "Hi"}],
            **tools}  # fmt: skip
    if "tool_choice" in tools:
        body["tools"] = [{"name": "get_weather", "input_schema": WEATHER_PARAMETERS}]
    r = httpx.post(server.url + "/v1/messages", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    message = r.json()
    assert message["content"] == [] and message["stop_reason"] == "max_tokens"
    assert message["usage"]["output_tokens"] == 0
    events = named_events(server, "/v1/messages", {**body, "stream": True})
    assert [name for name, _ in events] == ["message_start", "ping", "message_delta",
                                            "message_stop"]  # fmt: skip
    assert events[2][1]["delta"]["stop_reason"] == "max_tokens"


def test_max_tokens_zero_streams_an_empty_message(server):
    body = {"model": MODEL, "max_tokens": 0, "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    events = named_events(server, "/v1/messages", body)
    assert [name for name, _ in events] == ["message_start", "ping", "message_delta",
                                            "message_stop"]  # fmt: skip
    assert events[2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[2][1]["usage"]["output_tokens"] == 0


def test_negative_max_tokens_is_still_a_400(server):
    body = {"model": MODEL, "max_tokens": -1, "messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(server.url + "/v1/messages", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("budget", [1024, 2048])
def test_thinking_budget_not_under_max_tokens_is_a_400(server, budget):
    body = {"model": MODEL, "max_tokens": 1024, "thinking": {"type": "enabled",
            "budget_tokens": budget}, "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    r = httpx.post(server.url + "/v1/messages", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in error["error"]["message"]
    assert "thinking.budget_tokens" in error["error"]["message"]


def test_max_tokens_zero_with_thinking_budget_is_a_400(server):
    body = {"model": MODEL, "max_tokens": 0, "thinking": {"type": "enabled",
            "budget_tokens": 1024}, "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    r = httpx.post(server.url + "/v1/messages", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400, r.text
    assert "thinking.budget_tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("thinking", [{"type": "disabled"}, {"type": "adaptive"}])
def test_thinking_without_a_budget_leaves_max_tokens_alone(server, thinking):
    """Only an `enabled` budget is checked against max_tokens (the model here cannot think,
    so what it answers is its own: never the budget's 400)."""
    body = {"model": MODEL, "max_tokens": 1, "thinking": thinking,
            "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    r = httpx.post(server.url + "/v1/messages", json=body, headers=server.headers, timeout=60)
    assert "budget_tokens" not in r.text


@pytest.mark.parametrize("role", ["developer", "system"])
def test_instruction_message_after_a_previous_response_reads_as_user_text(oai, role):
    first = oai.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=4)
    second = oai.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[
            {"role": role, "content": "Answer in French."},
            {"role": "user", "content": "Another one?"},
        ],  # fmt: skip
        max_output_tokens=4,
    )
    assert second.status == "completed" or second.status == "incomplete"


def test_instruction_message_in_a_conversation_reads_as_user_text(oai):
    conversation = oai.conversations.create()
    oai.responses.create(model=MODEL, input="Name a colour.", conversation=conversation.id,
                         max_output_tokens=4)  # fmt: skip
    later = oai.responses.create(
        model=MODEL,
        conversation=conversation.id,
        input=[{"role": "developer", "content": "Be brief."}],
        max_output_tokens=4,
    )
    assert later.status in ("completed", "incomplete")


def test_instruction_messages_fold_as_messages_folds_them():
    """First, a developer message joins the instructions; later, it is user text joined with
    the user turn next to it, so that the roles still alternate."""
    from girandole.api.responses.convert import chat_messages

    def message(role: str, text: str) -> dict:
        kind = "output_text" if role == "assistant" else "input_text"
        return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}

    items = [message("developer", "Be brief."), message("user", "Hi"),
             message("assistant", "Hello"), message("developer", "Answer in French."),
             message("user", "Another one?"), message("system", "No emoji.")]  # fmt: skip
    assert chat_messages("Instructions.", items) == [
        {"role": "system", "content": "Instructions.\n\nBe brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Answer in French.\n\nAnother one?\n\nNo emoji."},
    ]
