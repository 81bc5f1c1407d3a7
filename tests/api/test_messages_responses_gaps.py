"""Messages and Responses where they parted from Anthropic's and OpenAI's documented behaviour:
`max_tokens: 0` pre-warms the prompt cache (anthropic's SDK documents it), a thinking budget
under 1024 or not under `max_tokens` is a 400, a prefill under a forced tool call or output
format is a 400, and so are what thinking refuses (a temperature other than 1, top_k, a top_p
under 0.95, a prefill under `enabled` thinking), the request fields of the anthropic SDK's `MessageCreateParams` are accepted,
and a developer/system message after a stored conversation (Responses) reads as user text
rather than breaking the chat template."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize(
    "thinking, words",
    [({"type": "enabled", "budget_tokens": 1023}, "greater than or equal to 1024"),
     ({"type": "enabled"}, "Field required"),
     ({"type": "disabled", "budget_tokens": 2048}, "budget_tokens")],
    ids=["under-1024", "no-budget", "budget-when-disabled"],
)  # fmt: skip
def test_thinking_budget_as_anthropic_checks_it(claude, thinking, words):
    """Anthropic's schema: an `enabled` budget is required and at least 1024 (checked before
    max_tokens: this one is over the budget), and only `enabled` takes one; count_tokens
    reads the same schema."""
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "thinking": thinking}
    for call in (lambda: claude.messages.create(max_tokens=4096, **ask),
                 lambda: claude.messages.count_tokens(**ask)):  # fmt: skip
        with pytest.raises(anthropic.BadRequestError) as info:
            call()
        message = info.value.body["error"]["message"]
        assert info.value.body["error"]["type"] == "invalid_request_error"
        assert "thinking.budget_tokens" in message and words in message, message


PREFILL = [{"role": "user", "content": "What is the weather in Paris?"},
           {"role": "assistant", "content": "Let me check"}]  # fmt: skip
WEATHER_TOOL = {"name": "get_weather", "input_schema": WEATHER_PARAMETERS}


@pytest.mark.parametrize(
    "forced, words",
    [({"tools": [WEATHER_TOOL], "tool_choice": {"type": "any"}}, "forces tool use"),
     ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "get_weather"}},
      "forces tool use"),
     ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
      "output format")],
    ids=["any", "tool", "format"],
)  # fmt: skip
def test_a_prefill_under_a_forced_output_is_a_400(claude, forced, words):
    """Anthropic forces a call (or a format) from the answer's first token, which a prefill's
    text would have to precede: its 400, naming the final assistant message (the forced call
    used to start afresh, the prefill dropped from the answer). An empty final assistant turn
    is no prefill, and a prefill under `auto` is continued."""
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model=MODEL, max_tokens=8, messages=PREFILL, **forced)
    message = info.value.body["error"]["message"]
    assert message.startswith("messages.1: ") and "pre-fill" in message and words in message
    with pytest.raises(anthropic.BadRequestError):  # the prompt it counts could not run
        claude.messages.count_tokens(model=MODEL, messages=PREFILL, **forced)
    empty = [PREFILL[0], {"role": "assistant", "content": ""}]
    r = claude.messages.create(model=MODEL, max_tokens=2, messages=empty, **forced)
    assert r.stop_reason in ("max_tokens", "tool_use", "end_turn")
    if forced.get("tool_choice") == {"type": "any"}:
        auto = claude.messages.create(model=MODEL, max_tokens=2, messages=PREFILL,
                                      tools=[WEATHER_TOOL], tool_choice={"type": "auto"})  # fmt: skip
        assert auto.stop_reason in ("max_tokens", "end_turn", "tool_use")


def test_thinking_with_a_forced_call_is_a_400(claude):
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(
            model=MODEL, max_tokens=2048, messages=PREFILL[:1], tools=[WEATHER_TOOL],
            tool_choice={"type": "any"}, thinking={"type": "enabled", "budget_tokens": 1024},
        )  # fmt: skip
    assert "Thinking may not be enabled when tool_choice forces tool use" in str(info.value)


ENABLED = {"type": "enabled", "budget_tokens": 1024}


@pytest.mark.parametrize("thinking", [ENABLED, {"type": "adaptive"}], ids=["enabled", "adaptive"])
@pytest.mark.parametrize(
    "sampling, words",
    [({"temperature": 0}, "`temperature` may only be set to 1 when thinking is enabled or in"
      " adaptive mode"),
     ({"temperature": 0.7}, "`temperature` may only be set to 1"),
     ({"top_k": 40}, "`top_k` must be unset when thinking is enabled or in adaptive mode"),
     ({"top_p": 0.9}, "`top_p` must be greater than or equal to 0.95 or unset when thinking is"
      " enabled or in adaptive mode")],
    ids=["temperature-0", "temperature-0.7", "top_k", "top_p"],
)  # fmt: skip
def test_thinking_refuses_the_sampling_fields_anthropic_refuses(claude, thinking, sampling, words):
    """Anthropic's 400s (its extended-thinking guide, "Feature compatibility"), in its words,
    for `enabled` and `adaptive` thinking alike; the field is named."""
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model=MODEL, max_tokens=2048, messages=PREFILL[:1],
                               thinking=thinking, extra_body=sampling)  # fmt: skip
    error = info.value.body["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"], error
    (field,) = sampling
    assert f"field: '{field}'" in error["message"]


def test_thinking_takes_the_sampling_values_anthropic_takes(claude, server):
    """temperature 1, top_p from 0.95 to 1, and unset fields go with thinking; without it
    (`disabled`, or none) any value in range does."""
    fine = [{"temperature": 1, "top_p": 0.95}, {"top_p": 1}, {"temperature": None, "top_k": None}]
    for sampling in fine:
        r = claude.messages.create(model=MODEL, max_tokens=1, messages=PREFILL[:1],
                                   thinking={"type": "adaptive"}, extra_body=sampling)  # fmt: skip
        assert r.stop_reason in ("max_tokens", "end_turn")
    # `enabled` on this model: the 400 is that it cannot reason, not the sampling
    body = {"model": MODEL, "max_tokens": 2048, "messages": PREFILL[:1], "thinking": ENABLED,
            "temperature": 1, "top_p": 0.95}  # fmt: skip
    r = httpx.post(server.url + "/v1/messages", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400 and "cannot reason" in r.json()["error"]["message"], r.text
    for thinking in ({"type": "disabled"}, None):
        r = claude.messages.create(model=MODEL, max_tokens=1, messages=PREFILL[:1],
                                   extra_body={"temperature": 0, "top_k": 40, "top_p": 0.5,
                                               "thinking": thinking})  # fmt: skip
        assert r.stop_reason in ("max_tokens", "end_turn")


def test_a_prefill_under_enabled_thinking_is_a_400(claude):
    """Anthropic's guide: "You cannot pre-fill responses when thinking is enabled". A final
    assistant turn of text is Anthropic's 400 naming its first block, in its words; one that
    starts with a thinking block still has text to continue, with no thinking before it. An
    empty final turn is no prefill; `adaptive` thinking, which may answer without thinking,
    continues one; count_tokens reads the same rules."""
    ask = {"model": MODEL, "thinking": ENABLED}
    for call in (lambda m: claude.messages.create(max_tokens=2048, messages=m, **ask),
                 lambda m: claude.messages.count_tokens(messages=m, **ask)):  # fmt: skip
        with pytest.raises(anthropic.BadRequestError) as info:
            call(PREFILL)
        message = info.value.body["error"]["message"]
        assert message.startswith(
            "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found"
            " `text`. When `thinking` is enabled, a final `assistant` message must start with a"
            " thinking block."
        ), message
        think = {"type": "thinking", "thinking": "Paris, then.", "signature": ""}
        thought = [PREFILL[0], {"role": "assistant", "content": [
            think, {"type": "text", "text": "Let me check"}]}]  # fmt: skip
        with pytest.raises(anthropic.BadRequestError) as info:
            call(thought)
        message = info.value.body["error"]["message"]
        assert message.startswith("messages.1: You cannot pre-fill responses when thinking is"
                                  " enabled"), message  # fmt: skip
    # no prefill: the 400 is that this model cannot reason
    for empty in ("", []):
        with pytest.raises(anthropic.BadRequestError) as info:
            claude.messages.create(max_tokens=2048, **ask, messages=[
                PREFILL[0], {"role": "assistant", "content": empty}])  # fmt: skip
        assert "cannot reason" in info.value.body["error"]["message"]
    r = claude.messages.create(model=MODEL, max_tokens=2, messages=PREFILL,
                               thinking={"type": "adaptive"})  # fmt: skip
    assert r.stop_reason in ("max_tokens", "end_turn")


def test_every_field_of_the_sdks_message_create_params_is_accepted(claude, server):
    """The fields of the anthropic SDK's MessageCreateParams (and nested ones) that have no
    meaning here are accepted and change nothing; `diagnostics` is answered (nothing here keeps
    earlier prompts: the cache-miss reason is `unavailable`); `input_examples` reach the
    prompt after the tool's description; `xhigh` effort is `high` (a hint on this model)."""
    tool = {**WEATHER_TOOL, "description": "The weather", "input_examples": [{"city": "Oslo"}],
            "allowed_callers": ["direct"], "defer_loading": False, "eager_input_streaming": True,
            "cache_control": {"type": "ephemeral", "ttl": "1h"}}  # fmt: skip
    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
         "name": "get_weather", "input": {"city": "Rome"}, "caller": {"type": "direct"},
         "toolset_name": "weather"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
         "content": "Sunny", "toolset_name": "weather"}]},
    ]  # fmt: skip
    fields = {"model": MODEL, "messages": history, "tools": [tool]}
    extra = {"inference_geo": "us", "speed": "fast", "user_profile_id": "up_1",
             "workspace_id": "wrkspc_1", "output_config": {"effort": "xhigh"},
             "thinking": {"type": "adaptive", "display": "omitted"}}  # fmt: skip
    r = claude.messages.create(max_tokens=2, diagnostics={"previous_message_id": "msg_1"},
                               extra_body={"raw_output": True}, **fields, **extra)  # fmt: skip
    assert r.diagnostics is not None and r.diagnostics.cache_miss_reason.type == "unavailable"
    prompt = "".join(p for p in r.model_extra["raw_output"]["prompt_fragments"]
                     if isinstance(p, str))  # fmt: skip
    # (the tool's description inside the tool list's JSON)
    assert json.dumps("The weather\n\nInput examples:\n" + json.dumps({"city": "Oslo"})) in prompt
    counted = claude.messages.count_tokens(**fields, speed="fast", user_profile_id="up_1",
                                           workspace_id="wrkspc_1")  # fmt: skip
    assert counted.input_tokens == r.usage.input_tokens
    # streamed: in message_start's message
    body = {"model": MODEL, "max_tokens": 1, "messages": PREFILL[:1], "stream": True,
            "diagnostics": {"previous_message_id": "msg_1"}}  # fmt: skip
    (start,) = [data for name, data in named_events(server, "/v1/messages", body)
                if name == "message_start"]  # fmt: skip
    assert start["message"]["diagnostics"] == {"cache_miss_reason": {"type": "unavailable"}}
    # the first turn's opt-in (no message to compare with): null; not asked for: absent
    for diagnostics, answer in (({"previous_message_id": None}, {"diagnostics": None}), (None, {})):
        whole = httpx.post(server.url + "/v1/messages", headers=server.headers, timeout=60,
                           json={**body, "stream": False, "diagnostics": diagnostics}).json()  # fmt: skip
        assert {k: v for k, v in whole.items() if k == "diagnostics"} == answer
    # a caller other than the model needs Anthropic's code execution tool: none here
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(max_tokens=1, model=MODEL, messages=PREFILL[:1], tools=[
            {**WEATHER_TOOL, "allowed_callers": ["code_execution_20250825"]}])  # fmt: skip
    assert "tools.0.allowed_callers" in info.value.body["error"]["message"]


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
