"""Messages and Responses pieces without a server: requests translated into chat messages and
tools, chat's output deltas as blocks, and the stored responses table."""

from __future__ import annotations

import json

import pytest

from girandole.api.chat.reasoning import ReasoningPlan, plan_reasoning
from girandole.api.chat.schema import FunctionDef, Tool
from girandole.api.chat.tools import ToolPlan, call_grammar
from girandole.api.http.errors import APIError
from girandole.api.http.validation import validate_model
from girandole.api.messages.blocks import OutputBlocks
from girandole.api.messages.convert import chat_messages as anthropic_messages
from girandole.api.messages.convert import to_chat_request
from girandole.api.messages.schema import MessagesRequest
from girandole.api.models.anthropic import model_page
from girandole.api.responses.convert import chat_messages, chat_tools, input_items
from girandole.api.responses.pairing import check_call_outputs
from girandole.api.responses.schema import ResponsesRequest
from girandole.registry.keystore import Database
from girandole.registry.responses import ResponseStore

ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"]}  # fmt: skip


def anthropic(**body) -> MessagesRequest:
    return validate_model(MessagesRequest, {"model": "m", "max_tokens": 8, **body})


def responses(**body) -> ResponsesRequest:
    return validate_model(ResponsesRequest, {"model": "m", **body})


def test_anthropic_conversation_as_chat_messages():
    req = anthropic(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.",
                                                         "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "user", "content": [{"type": "text", "text": "Quickly."}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "easy", "signature": "s"},
                {"type": "text", "text": "Calling add."},
                {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 2, "b": 3}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "5"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "boom"}]},
                {"type": "text", "text": "Thanks."},
            ]},
            {"role": "assistant", "content": "The answer is"},
        ],
    )  # fmt: skip
    assert anthropic_messages(req) == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Add 2 and 3.\n\nQuickly."},  # consecutive turns merged
        {"role": "assistant", "content": "Calling add.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}],
         "reasoning_content": "easy"},  # its thinking block, for the template to show or not
        {"role": "tool", "tool_call_id": "toolu_1", "content": "5"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "The answer is"},  # continued (a prefill)
    ]  # fmt: skip


def test_anthropic_system_messages_inside_the_conversation():
    """Claude Code's shape: system messages among the turns (Anthropic's beta), read as user
    text, since most templates take a system message only first."""
    use = {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 1, "b": 2}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "3"}
    req = anthropic(system="Rules.", messages=[
        {"role": "system", "content": "Before any turn."},
        {"role": "user", "content": "Add."},
        {"role": "system", "content": [{"type": "text", "text": "After a user turn."}]},
        {"role": "assistant", "content": [use]},
        {"role": "system", "content": "After a call."},
        {"role": "user", "content": [result, {"type": "text", "text": "Go on."}]},
        {"role": "assistant", "content": "Done."},
        {"role": "system", "content": "At the end."},
    ])  # fmt: skip
    assert anthropic_messages(req) == [
        {"role": "system", "content": "Rules.\n\nBefore any turn."},
        {"role": "user", "content": "Add.\n\nAfter a user turn."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "3"},  # the call still paired
        {"role": "user", "content": "After a call.\n\nGo on."},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "At the end."},
    ]  # fmt: skip
    with pytest.raises(APIError) as info:
        to_chat_request(anthropic(messages=[{"role": "user", "content": "hi"},
                                            {"role": "system", "content": [use]}]))  # fmt: skip
    assert info.value.param == "messages.1.content.0" and "role 'system'" in info.value.message


def test_anthropic_clear_thinking_edit():
    def turn(n: int) -> list[dict]:
        return [{"role": "user", "content": f"q{n}"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": f"t{n}"},
                                                  {"type": "text", "text": f"a{n}"}]}]  # fmt: skip

    messages = [*turn(1), *turn(2), *turn(3), {"role": "user", "content": "q4"}]

    def kept(edit: dict | None) -> list[str]:
        body = {"context_management": {"edits": [edit]}} if edit else {}
        chat = anthropic_messages(anthropic(messages=messages, **body))
        return [m["reasoning_content"] for m in chat if "reasoning_content" in m]

    assert kept(None) == ["t1", "t2", "t3"]  # no edit: every turn's, the template decides
    assert kept({"type": "clear_thinking_20251015"}) == ["t3"]  # Anthropic's default: the last
    assert kept({"type": "clear_thinking_20251015", "keep": "all"}) == ["t1", "t2", "t3"]
    keep_two = {"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 2}}
    assert kept(keep_two) == ["t2", "t3"]
    both = [{"type": "clear_tool_uses_20250919"}, {"type": "clear_thinking_20251015"}]
    with pytest.raises(APIError) as info:  # thinking is cleared first: listed first
        to_chat_request(anthropic(messages=messages, context_management={"edits": both}))
    assert info.value.param == "context_management.edits.1.type"
    with pytest.raises(APIError) as info:
        to_chat_request(anthropic(messages=messages, context_management={"edits": both[:1] * 2}))
    assert info.value.param == "context_management.edits.1.type" and "more than once" in str(
        info.value.message
    )
    with pytest.raises(APIError):  # an unknown edit: the schema's 400
        to_chat_request(anthropic(messages=messages,
                                  context_management={"edits": [{"type": "compact"}]}))  # fmt: skip


def tool_conversation(n: int, name: str = "get") -> list[dict]:
    """n rounds of a call to `name` (ids t0, t1, ...) and its result, then a question."""
    out: list[dict] = []
    for k in range(n):
        out += [{"role": "user", "content": f"q{k}"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": f"t{k}", "name": name, "input": {"k": k}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": f"t{k}", "content": f"r{k}"}]}]  # fmt: skip
    return [*out, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "end"}]


def test_anthropic_clear_tool_uses_plan():
    from girandole.api.messages.context_edits import PLACEHOLDER, tool_uses_to_clear

    def plan(edit: dict, prompt_tokens: int = 10, messages=None):
        req = anthropic(messages=messages or tool_conversation(5),
                        context_management={"edits": [edit]})  # fmt: skip
        return req, tool_uses_to_clear(req, prompt_tokens)

    edit = {"type": "clear_tool_uses_20250919"}
    assert plan(edit, 100_000)[1] is None  # the default trigger: more than 100,000 tokens
    req, cleared = plan(edit, 100_001)
    assert cleared.results == {"t0", "t1"} and not cleared.inputs  # keep: the last 3
    chat = anthropic_messages(req, cleared)
    assert [m["content"] for m in chat if m["role"] == "tool"] == [PLACEHOLDER] * 2 + [
        "r2", "r3", "r4"]  # fmt: skip
    calls = [m["tool_calls"][0]["function"]["arguments"] for m in chat if m.get("tool_calls")]
    assert calls == [json.dumps({"k": k}) for k in range(5)]  # inputs kept

    by_uses = {**edit, "trigger": {"type": "tool_uses", "value": 4},
               "keep": {"type": "tool_uses", "value": 1}, "clear_tool_inputs": True}  # fmt: skip
    assert plan({**by_uses, "trigger": {"type": "tool_uses", "value": 5}})[1] is None
    req, cleared = plan(by_uses)
    assert cleared.results == cleared.inputs == {"t0", "t1", "t2", "t3"}
    calls = [m["tool_calls"][0]["function"]["arguments"]
             for m in anthropic_messages(req, cleared) if m.get("tool_calls")]  # fmt: skip
    assert calls == ["{}"] * 4 + [json.dumps({"k": 4})]

    # excluded tools are neither cleared nor counted in `keep`; inputs of the named tools only
    mixed = tool_conversation(2, "keepme") + tool_conversation(3)
    for k, m in enumerate(m for m in mixed if m["role"] == "assistant" and
                          isinstance(m["content"], list)):  # fmt: skip
        m["content"][0]["id"] = f"u{k}"
    for k, m in enumerate(m for m in mixed if m["role"] == "user" and isinstance(m["content"], list)
                          and m["content"][0]["type"] == "tool_result"):  # fmt: skip
        m["content"][0]["tool_use_id"] = f"u{k}"
    _, cleared = plan({**by_uses, "exclude_tools": ["keepme"], "clear_tool_inputs": ["get"],
                       "keep": {"type": "tool_uses", "value": 2}}, messages=mixed)  # fmt: skip
    assert cleared.results == cleared.inputs == {"u2"}
    assert plan({**by_uses, "keep": {"type": "tool_uses", "value": 5}})[1] is None  # none to clear
    with pytest.raises(APIError):  # the shapes are Anthropic's
        anthropic(messages=tool_conversation(1), context_management={"edits": [
            {**edit, "trigger": {"type": "turns", "value": 1}}]})  # fmt: skip


def test_anthropic_fields_as_chat_fields():
    tools = [{"name": "add", "description": "Adds", "input_schema": ADD}]
    chat = to_chat_request(anthropic(
        messages=[{"role": "user", "content": "hi"}], tools=tools, stop_sequences=["\n\n"],
        tool_choice={"type": "tool", "name": "add", "disable_parallel_tool_use": True},
        temperature=0.5, top_k=4, metadata={"user_id": "u1"},
        output_config={"format": {"type": "json_schema", "schema": ADD}},
    ))  # fmt: skip
    assert chat.tools[0].function.parameters == ADD and chat.tools[0].function.name == "add"
    assert chat.tool_choice.function_name() == "add" and chat.parallel_tool_calls is False
    assert (chat.temperature, chat.top_k, chat.user, chat.stop) == (0.5, 4, "u1", ["\n\n"])
    assert chat.response_format.json_schema.schema_ == ADD
    for choice, expected in (({"type": "any"}, "required"), ({"type": "auto"}, "auto"),
                             ({"type": "none"}, "none")):  # fmt: skip
        chat = to_chat_request(anthropic(messages=[{"role": "user", "content": "hi"}],
                                         tools=tools, tool_choice=choice))  # fmt: skip
        assert chat.tool_choice == expected


def test_anthropic_reasoning_fields_as_chat_fields():
    hi = [{"role": "user", "content": "hi"}]
    chat = to_chat_request(anthropic(messages=hi, thinking={"type": "enabled",
                                                           "budget_tokens": 2048}))  # fmt: skip
    assert (chat.thinking.type, chat.thinking.budget_tokens) == ("enabled", 2048)
    # `display` is how the answer shows the thinking (MessagesShape), no part of chat's field
    for thinking in ({"type": "enabled", "budget_tokens": 2048, "display": "omitted"},
                     {"type": "adaptive", "display": "summarized"}):  # fmt: skip
        chat = to_chat_request(anthropic(messages=hi, thinking=thinking))
        assert chat.thinking.type == thinking["type"]
    assert (
        to_chat_request(anthropic(messages=hi, thinking={"type": "disabled"})).thinking.type
        == "disabled"
    )
    # Fireworks' reading of effort; Anthropic's `xhigh` is read as `max` is
    for effort, read in (("low", "low"), ("high", "high"), ("xhigh", "high"), ("max", "high")):
        chat = to_chat_request(anthropic(messages=hi, output_config={"effort": effort}))
        assert chat.reasoning_effort == read and chat.effort_is_hint is True
    # a template that cannot think: Anthropic's effort is a hint (nothing to change), thinking
    # asked for is still a 400
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    chat = to_chat_request(anthropic(messages=hi, output_config={"effort": "high"},
                                     thinking={"type": "adaptive"}))  # fmt: skip
    assert plan_reasoning(chat, plain) is None
    chat.effort_is_hint = False  # chat's own reasoning_effort: a 400 there
    with pytest.raises(APIError, match="cannot reason"):
        plan_reasoning(chat, plain)
    chat = to_chat_request(anthropic(messages=hi, output_config={"effort": "high"},
                                     thinking={"type": "enabled", "budget_tokens": 2048}))  # fmt: skip
    with pytest.raises(APIError, match="cannot reason") as info:
        plan_reasoning(chat, plain)
    assert info.value.param == "thinking"
    with pytest.raises(APIError) as info:  # chat's floor, Anthropic's too
        to_chat_request(anthropic(messages=hi, thinking={"type": "enabled", "budget_tokens": 10}))
    assert info.value.status_code == 400 and "budget_tokens" in info.value.message


def test_a_prefill_under_enabled_thinking_is_what_chat_would_continue():
    """The prefill Anthropic refuses under `enabled` thinking is the final assistant turn chat
    continues: trailing assistant turns merged (named by the first one's first block), not
    one a later system message follows (a user turn then), nor one of thinking blocks only
    (left out here: no text to continue); `adaptive` thinking continues a prefill."""
    enabled = {"type": "enabled", "budget_tokens": 1024}
    hi = {"role": "user", "content": "hi"}
    with pytest.raises(APIError) as info:
        to_chat_request(anthropic(thinking=enabled, messages=[
            hi, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]))  # fmt: skip
    assert info.value.param == "messages.1.content.0.type"
    assert "found `text`" in info.value.message
    think = {"type": "thinking", "thinking": "t", "signature": ""}
    fine = [[hi, {"role": "assistant", "content": "a"}, {"role": "system", "content": "r"}],
            [hi, {"role": "assistant", "content": [think]}],
            [hi, {"role": "assistant", "content": []}]]  # fmt: skip
    for messages in fine:
        assert to_chat_request(anthropic(thinking=enabled, messages=messages)).messages
    prefill = [hi, {"role": "assistant", "content": "a"}]
    chat = to_chat_request(anthropic(thinking={"type": "adaptive"}, messages=prefill))
    assert chat.messages[-1].role == "assistant"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
         "messages.0.content.0"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
         "messages.0.content.0.source"),
        # an image in an assistant turn, or a file source (no Files API here)
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://a/b.png"}}]}]},
         "messages.1.content.0"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]},
         "messages.0.content.0.source"),
        ({"messages": [{"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "x"}]}]}, "messages.0.content.0"),
        # empty content (Anthropic's 400s): it vanished, or left chat an empty conversation
        ({"messages": [{"role": "user", "content": ""}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": []},
                       {"role": "user", "content": "y"}]}, "messages.1.content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                    {"type": "text", "text": ""}]}]},
         "messages.0.content.1"),
        # thinking in a user turn: it was dropped, and a turn of it alone vanished (the
        # assistant turn before it then continued as a prefill)
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                       {"role": "user", "content": [{"type": "thinking", "thinking": "t"}]}]},
         "messages.2.content.0"),
        ({"messages": [{"role": "user", "content": [
            {"type": "redacted_thinking", "data": "d"}, {"type": "text", "text": "x"}]}]},
         "messages.0.content.0"),
        # a prefill ending in whitespace (Anthropic's 400): it was continued after the space
        ({"messages": [{"role": "user", "content": "x"},
                       {"role": "assistant", "content": "It is "}]}, "messages.1.content.0"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b\n"}]}]},
         "messages.1.content.1"),
    ],
)  # fmt: skip
def test_anthropic_what_chat_cannot_say(body, field):
    with pytest.raises(APIError) as info:
        to_chat_request(anthropic(**body))
    assert info.value.status_code == 400 and info.value.param == field


TURN_USE = {"role": "assistant", "content": [
    {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 2, "b": 3}}]}  # fmt: skip


def _result(tool_use_id: str) -> dict:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id,
                                         "content": "5"}]}  # fmt: skip


@pytest.mark.parametrize(
    "messages, field, words",
    [
        # a result that answers nothing (it reached the model as a call nobody made)
        ([_result("toolu_9")], "messages.0.content.0", "unexpected `tool_use_id`"),
        ([{"role": "user", "content": "Add."}, TURN_USE, _result("toolu_2")],
         "messages.2.content.0", "toolu_2"),
        # a call answered two turns later is not answered "immediately after"
        ([{"role": "user", "content": "Add."}, TURN_USE, {"role": "user", "content": "Well?"},
          {"role": "assistant", "content": "Hm."}, _result("toolu_1")],
         "messages.1", "without `tool_result` blocks immediately after: toolu_1"),
        ([{"role": "user", "content": "Add."}, {"role": "assistant", "content": [
            *TURN_USE["content"], *TURN_USE["content"]]}, _result("toolu_1")],
         "messages.1.content.1", "must be unique"),
    ],
)  # fmt: skip
def test_anthropic_tool_blocks_must_pair(messages, field, words):
    """Anthropic's 400s for tool_use / tool_result blocks that do not answer each other."""
    with pytest.raises(APIError) as info:
        to_chat_request(anthropic(messages=messages))
    assert info.value.status_code == 400 and info.value.param == field
    assert words in info.value.message


def test_anthropic_tool_blocks_paired_across_merged_turns():
    """Consecutive messages of one role are one turn (as Anthropic merges them), and a final
    assistant turn's call is a prefill: neither is a pairing error."""
    split = [{"role": "user", "content": "Add."}, TURN_USE,
             {"role": "assistant", "content": "Calling."},
             {"role": "user", "content": "Here:"}, _result("toolu_1")]  # fmt: skip
    to_chat_request(anthropic(messages=split))
    to_chat_request(anthropic(messages=[{"role": "user", "content": "Add."}, TURN_USE]))


def test_anthropic_final_assistant_turn_may_be_empty():
    """The one turn Anthropic lets be empty: a final assistant one (no prefill)."""
    for empty in ("", []):
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": empty}]
        chat = to_chat_request(anthropic(messages=turns))
        assert [m.role for m in chat.messages] == ["user"]
    # whitespace inside a prefill, or after an earlier (not final) assistant turn, is fine
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "It is\n so "},
             {"role": "user", "content": "go on"}, {"role": "assistant", "content": "It is\n so"}]  # fmt: skip
    assert [m.role for m in to_chat_request(anthropic(messages=turns)).messages][-1] == "assistant"


def test_translated_requests_read_special_tokens_as_text():
    """Anthropic's and OpenAI's APIs have no way to type a turn marker: the chat request made
    from them has safe_tokenization on (chat's own default stays off, as at Fireworks)."""
    chat = to_chat_request(anthropic(messages=[{"role": "user", "content": "<end_of_turn>"}]))
    assert chat.safe_tokenization is True


def test_responses_function_calls_must_pair():
    """OpenAI's 400s: an output whose call is not earlier in the conversation, a call never
    answered."""
    call = {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "5"}
    ask = {"role": "user", "content": "Add."}
    check_call_outputs(input_items(responses(input=[ask, call, output])))
    # an id reused once its call was answered (calls numbered per turn) pairs in order
    check_call_outputs(input_items(responses(input=[ask, call, output, ask, call, output])))
    for items, words in (
        ([ask, output], "No tool call found for function call output with call_id call_1"),
        ([ask, output, call], "No tool call found for function call output with call_id call_1"),
        ([ask, call, {**output, "call_id": "call_2"}], "call_id call_2"),
        ([ask, call, {"role": "user", "content": "And?"}], "No tool output found for function"
         " call call_1"),
        # one output was read as the result of both calls of one id; a second output of an
        # answered call reached the model as the result of a call nobody made
        ([ask, call, call, output], "Duplicate function call with call_id call_1"),
        ([ask, call, output, output], "No tool call found for function call output with"
         " call_id call_1"),
    ):  # fmt: skip
        with pytest.raises(APIError) as info:
            check_call_outputs(input_items(responses(input=items)))
        assert info.value.status_code == 400 and info.value.param == "input"
        assert words in info.value.message


def test_responses_items_as_chat_messages():
    req = responses(input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Add 2 and 3."}]},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "Easy."}]},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "Sum."}],
         "encrypted_content": "opaque"},
        {"type": "message", "role": "assistant", "content": "Calling add."},
        {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a":2}'},
        {"type": "function_call", "call_id": "call_2", "name": "add", "arguments": '{"a":3}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "5"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "6"}]},
    ])  # fmt: skip
    items = input_items(req)
    assert len({item["id"] for item in items}) == len(items) == 9
    assert items[0]["content"] == [{"type": "input_text", "text": "Be brief."}]
    assert items[4]["content"] == [{"type": "output_text", "text": "Calling add.",
                                    "annotations": []}]  # fmt: skip
    assert chat_messages("Instructions.", items) == [
        {"role": "system", "content": "Instructions.\n\nBe brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "Calling add.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add",
                                                              "arguments": '{"a":2}'}},
            {"id": "call_2", "type": "function", "function": {"name": "add",
                                                              "arguments": '{"a":3}'}}],
         "reasoning_content": "Easy.\n\nSum."},  # the reasoning items' text (else summary)
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "tool", "tool_call_id": "call_2", "content": "6"},
    ]  # fmt: skip


def test_responses_tools_and_choice():
    tool = {"type": "function", "name": "add", "parameters": ADD, "strict": True}
    tools, choice, paths = chat_tools(responses(input="x", tools=[tool], tool_choice="required"))
    assert tools == [{"type": "function", "function": {"name": "add", "parameters": ADD,
                                                       "strict": True}}]  # fmt: skip
    assert choice == "required" and paths == ["tools.0"]
    # where each chat tool came from: a namespace's functions are flattened in order
    space = {
        "type": "namespace",
        "name": "n",
        "tools": [{**tool, "name": "a"}, {**tool, "name": "b"}],
    }
    *_, paths = chat_tools(responses(input="x", tools=[space, tool]))
    assert paths == ["tools.0.tools.0", "tools.0.tools.1", "tools.1"]
    _, choice, _ = chat_tools(responses(input="x", tools=[tool],
                                     tool_choice={"type": "function", "name": "add"}))  # fmt: skip
    assert choice == {"type": "function", "function": {"name": "add"}}
    allowed = {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function",
                                                                   "name": "add"}]}  # fmt: skip
    _, choice, _ = chat_tools(responses(input="x", tools=[tool], tool_choice=allowed))
    assert choice["allowed_tools"] == {"mode": "auto", "tools": [{"type": "function",
                                                                  "name": "add"}]}  # fmt: skip


def _plan(mode: str) -> ToolPlan:
    tools = [Tool(type="function", function=FunctionDef(name="add", parameters=ADD))]
    grammar = call_grammar(tools, False) if mode == "required" else None
    return ToolPlan(tools, mode, ["add"], parallel=False, native=False, grammar=grammar)


def test_blocks_of_text():
    blocks = OutputBlocks(None)
    events = blocks.feed("Hello", False) + blocks.feed(" world", True, "length")
    assert [(what, b.index, text) for what, b, text in events] == [
        ("start", 0, ""), ("delta", 0, "Hello"), ("delta", 0, " world"), ("stop", 0, "")
    ]  # fmt: skip
    assert blocks.finish_reason == "length" and blocks.blocks[0].text == "Hello world"


def test_blocks_of_a_forced_call_stream_its_arguments():
    blocks = OutputBlocks(_plan("required"))
    text = '{"name": "add", "arguments": {"a": 2, "b": 3}}'
    events = []
    for k in range(0, len(text), 7):
        events += blocks.feed(text[k : k + 7], k + 7 >= len(text), "stop")
    (call,) = blocks.blocks
    assert call.type == "call" and call.name == "add" and call.call_id.startswith("call_")
    assert call.arguments() == {"a": 2, "b": 3} and blocks.finish_reason == "tool_calls"
    assert events[0][0] == "start" and events[-1][0] == "stop"
    deltas = [text for what, _, text in events if what == "delta"]
    assert len(deltas) > 1 and "".join(deltas) == call.text


def test_blocks_under_auto_a_call_or_text():
    blocks = OutputBlocks(_plan("auto"))
    events = blocks.feed('{"name": "add", "arguments": {"a": 1, "b": 1}}', True, "stop")
    assert [b.type for b in blocks.blocks] == ["call"] and blocks.finish_reason == "tool_calls"
    assert [what for what, _, _ in events] == ["start", "delta", "stop"]
    blocks = OutputBlocks(_plan("auto"))
    blocks.feed("No call", True, "stop")
    assert [b.type for b in blocks.blocks] == ["text"] and blocks.finish_reason == "stop"


def test_a_forced_call_is_that_function_from_its_first_token():
    """A call forced to one function starts (named by the request) before the model has
    written the name: cut there by max_tokens, it is that call with no arguments yet, streamed
    or whole, not an empty output. Among two functions the name is the model's: no call."""
    blocks = OutputBlocks(_plan("required"))
    events = blocks.feed('{"na', False)
    assert [(what, b.type, b.name) for what, b, _ in events] == [("start", "call", "add")]
    events = blocks.feed('me": "add", "arguments": {"a', True, "length")
    (call,) = blocks.blocks
    assert [what for what, _, _ in events] == ["delta", "stop"]  # chat's header adds no block
    assert call.text == '{"a' and blocks.finish_reason == "length"
    whole = OutputBlocks(_plan("required"))
    whole.feed('{"na', True, "length")
    assert [(b.type, b.name, b.text) for b in whole.blocks] == [("call", "add", "")]
    assert whole.finish_reason == "length"
    two = _plan("required")
    two.allowed = ["add", "sub"]
    either = OutputBlocks(two)
    assert either.feed('{"na', True, "length") == [] and either.blocks == []


def _kinds(events) -> list[tuple[str, str, int, str]]:
    return [(what, b.type, b.index, text) for what, b, text in events]


def test_blocks_of_reasoning_then_text():
    # chat's split: the text up to </think> is reasoning, newlines around the tags are neither
    text = "<think>\nI think so\n</think>\n\nYes."
    blocks, events = OutputBlocks(None, ReasoningPlan()), []
    for k in range(0, len(text), 3):
        events += blocks.feed(text[k : k + 3], k + 3 >= len(text), "stop")
    assert [(b.type, b.index, b.text) for b in blocks.blocks] == [
        ("thinking", 0, "I think so"), ("text", 1, "Yes.")
    ]  # fmt: skip
    kinds = [(what, kind, index) for what, kind, index, _ in _kinds(events)]
    assert [k for k in kinds if k[0] != "delta"] == [
        ("start", "thinking", 0), ("stop", "thinking", 0), ("start", "text", 1), ("stop", "text", 1)
    ]  # fmt: skip
    whole = OutputBlocks(None, ReasoningPlan())
    whole.feed(text, True, "stop")
    assert [(b.type, b.text) for b in whole.blocks] == [(b.type, b.text) for b in blocks.blocks]


def test_blocks_with_thinking_off_or_open_in_the_prompt():
    off = OutputBlocks(None, ReasoningPlan(enabled=False))  # all of it is the answer
    off.feed("<think>x</think>y", True, "stop")
    assert [(b.type, b.text) for b in off.blocks] == [("text", "<think>x</think>y")]
    opened = ReasoningPlan(opens_in_prompt=True)  # the prompt ended inside <think>
    blocks = OutputBlocks(None, opened)
    blocks.feed("still thinking", True, "length")  # cut by max_tokens while thinking
    assert [(b.type, b.text) for b in blocks.blocks] == [("thinking", "still thinking")]
    assert blocks.finish_reason == "length"
    plain = OutputBlocks(None)  # a template that cannot reason: nothing is split
    plain.feed("<think>x</think>y", True, "stop")
    assert [b.type for b in plain.blocks] == ["text"]


def test_blocks_of_reasoning_then_calls_and_max_calls():
    plan = _plan("auto")
    plan.parallel = True
    calls = '[{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {"a": 2}}]'
    text = "<think>\nTwo sums.\n</think>\n\n" + calls
    everything = OutputBlocks(plan, ReasoningPlan())
    everything.feed(text, True, "stop")
    assert [(b.type, b.text) for b in everything.blocks] == [
        ("thinking", "Two sums."), ("call", '{"a": 1}'), ("call", '{"a": 2}')
    ]  # fmt: skip
    capped, events = OutputBlocks(plan, ReasoningPlan(), max_calls=1), []
    for k in range(0, len(text), 5):
        events += capped.feed(text[k : k + 5], k + 5 >= len(text), "stop")
    assert [(b.type, b.text) for b in capped.blocks] == [("thinking", "Two sums."),
                                                         ("call", '{"a": 1}')]  # fmt: skip
    assert {b.index for _, b, _ in events} == {0, 1} and capped.finish_reason == "tool_calls"


def test_cut_call_arguments_are_not_an_object():
    blocks = OutputBlocks(_plan("required"))
    blocks.feed('{"name": "add", "arguments": {"a": 2', True, "length")
    assert blocks.blocks[0].arguments() is None and blocks.finish_reason == "length"


def test_response_store_per_account_and_pages():
    store = ResponseStore(Database(None))
    for i in range(5):
        body = {"id": f"resp_{i}", "created_at": 0, "output": [], "n": i}
        store.put("a" if i != 2 else "b", body, [{"id": f"msg_{i}"}])
    found = store.get("a", "resp_1")
    assert found.body["n"] == 1 and found.input_items == [{"id": "msg_1"}]
    assert store.get("b", "resp_1") is None and store.get("a", "resp_2") is None
    first = store.list("a", 2)
    assert [r["id"] for r in first.items] == ["resp_4", "resp_3"] and first.has_more
    second = store.list("a", 2, after="resp_3")
    assert [r["id"] for r in second.items] == ["resp_1", "resp_0"] and not second.has_more
    assert [r["id"] for r in store.list("a", 1, before="resp_1").items] == ["resp_3"]
    assert not store.delete("b", "resp_1") and store.delete("a", "resp_1")
    assert store.get("a", "resp_1") is None
    assert json.dumps([r["id"] for r in store.list("b", 10).items]) == '["resp_2"]'


def test_a_background_response_refused_while_the_server_stops_says_it_stopped(monkeypatch):
    """A queued background response refused for capacity while the server drains (its queue
    wait over: 503) failed with the refusal's words ("saturated ... retry later"); it fails as
    the stop fails the running ones."""
    import asyncio
    from types import SimpleNamespace

    from girandole.api.responses import background

    async def refused(*args):
        raise APIError(503, "The server is saturated: no slot freed within 3 s; retry later")

    monkeypatch.setattr(background, "start_job", refused)
    ops = SimpleNamespace(draining=True, drain_started=asyncio.Event())
    ops.drain_started.set()
    rounds = SimpleNamespace(got=SimpleNamespace(state=SimpleNamespace(ops=ops), engine=None,
                                                 target=None))  # fmt: skip
    with pytest.raises(APIError) as info:
        asyncio.run(background.BackgroundResponses._admitted(None, rounds, None))  # type: ignore[arg-type]
    assert background.error_json(info.value) == {"code": "server_error",
                                                 "message": background.STOPPED}  # fmt: skip

    # asleep between tries (here 60 s) when the stop begins: woken, it fails at once
    monkeypatch.setattr(background, "RETRY_MIN_S", 60.0)
    ops.draining, ops.drain_started = False, asyncio.Event()

    async def stop_soon() -> None:
        def stop() -> None:
            ops.draining = True
            ops.drain_started.set()

        asyncio.get_running_loop().call_later(0.1, stop)
        admitted = background.BackgroundResponses._admitted(None, rounds, None)  # type: ignore[arg-type]
        await asyncio.wait_for(admitted, 10)

    with pytest.raises(APIError) as info:
        asyncio.run(stop_soon())
    assert info.value.message == background.STOPPED


def test_an_ended_background_responses_events_go_after_keep_seconds_on_an_idle_server(
    monkeypatch,
):
    """A background response's events were dropped only when another background response
    started: an idle server kept up to KEEP_ENDED logs, and served one past KEEP_SECONDS.
    Now a timer drops it, and `get` never returns one older."""
    import asyncio

    from girandole.api.responses import background

    monkeypatch.setattr(background, "KEEP_SECONDS", 0.05)
    runs = background.BackgroundResponses()

    async def main() -> None:
        for name in ("a", "b"):
            runs.runs[name] = background.BackgroundRun(name, "acct")
        runs._end(runs.runs["a"])
        assert runs.get("a", "acct") is not None and runs.runs["a"].log.closed
        await asyncio.sleep(0.3)  # nothing asked: the timer dropped it
        assert list(runs.runs) == ["b"]  # the running one stays
        runs._end(runs.runs["b"])
        runs.runs["b"].ended -= 1  # as if it ended a second ago, its timer not yet due
        assert runs.get("b", "acct") is None

    asyncio.run(main())


def test_a_stop_sequence_that_is_a_special_token_is_the_stop_reason(tokenizer):
    """A stop sequence spelt as a special token stops on the token (its id is the engine's stop
    reason, not the text): Messages said end_turn with stop_sequence null."""
    from types import SimpleNamespace

    from girandole.api.messages.shape import MessagesShape

    turn = tokenizer.token_to_id("<start_of_turn>")
    shape = SimpleNamespace(stop_sequences=["<start_of_turn>"], max_tokens=16)

    def reason(stop_reason: int | str | None) -> tuple[str, str | None]:
        last = SimpleNamespace(stop_reason=stop_reason)
        choice = SimpleNamespace(finish_reason="stop", last=last, tokenizer=tokenizer)
        return MessagesShape.stop_reason(shape, choice)  # type: ignore[arg-type]

    assert reason(turn) == ("stop_sequence", "<start_of_turn>")
    assert reason("<start_of_turn>") == ("stop_sequence", "<start_of_turn>")
    assert reason(tokenizer.token_to_id("<end_of_turn>")) == ("end_turn", None)  # EOS
    assert reason(None) == ("end_turn", None)


MODEL_ENTRIES = [{"id": f"m{i}", "created": 1_700_000_000 + i} for i in range(5)]


@pytest.mark.parametrize(
    "query, ids, has_more",
    [
        ({}, ["m0", "m1", "m2", "m3", "m4"], False),
        ({"limit": "2"}, ["m0", "m1"], True),
        ({"limit": "2", "after_id": "m1"}, ["m2", "m3"], True),
        ({"limit": "2", "after_id": "m2"}, ["m3", "m4"], False),
        ({"after_id": "m4"}, [], False),
        ({"limit": "2", "before_id": "m3"}, ["m1", "m2"], True),
        ({"limit": "2", "before_id": "m2"}, ["m0", "m1"], False),
        ({"before_id": "m0"}, [], False),
    ],
)
def test_anthropic_model_pages(query, ids, has_more):
    """Anthropic's paging of GET /v1/models: after_id/before_id/limit, first_id and last_id."""
    page = model_page(MODEL_ENTRIES, query)
    assert [m["id"] for m in page["data"]] == ids
    assert page["has_more"] is has_more
    assert page["first_id"] == (ids[0] if ids else None)
    assert page["last_id"] == (ids[-1] if ids else None)
    for model in page["data"]:
        assert model["type"] == "model" and model["display_name"] == model["id"]
        assert model["created_at"].startswith("2023-11-14T22:1")  # 1.7e9 s, RFC 3339 in UTC


@pytest.mark.parametrize(
    "query, param",
    [({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "two"}, "limit"),
     ({"after_id": "x"}, "after_id"), ({"before_id": "x"}, "before_id"),
     ({"after_id": "m1", "before_id": "m3"}, "after_id")],
)  # fmt: skip
def test_anthropic_model_page_bad_query(query, param):
    with pytest.raises(APIError) as err:
        model_page(MODEL_ENTRIES, query)
    assert err.value.status_code == 400 and err.value.param == param


def test_responses_consecutive_messages_of_a_role_merge_whatever_their_number():
    # the merged text is joined once (it was copied whole at each message: quadratic); empty
    # texts add no separator, as before
    def message(role, text):
        return {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]}

    many = [message("user", f"m{i}") for i in range(30_000)]
    out = chat_messages(None, many)
    assert out == [{"role": "user", "content": "\n\n".join(f"m{i}" for i in range(30_000))}]
    items = [message("user", ""), message("user", "a"), message("user", ""), message("user", "b"),
             message("assistant", "x"), message("assistant", "y")]  # fmt: skip
    assert chat_messages("Sys.", items) == [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "a\n\n\n\nb"},
        {"role": "assistant", "content": "xy"},
    ]


def test_anthropic_consecutive_turns_of_a_role_merge_whatever_their_number():
    # joined once at the end (each text was added to the whole text so far: quadratic), with
    # the separators and empty texts as before; a system message joins the user turn before it
    many = [{"role": "user", "content": f"m{i}"} for i in range(30_000)]
    out = anthropic_messages(anthropic(messages=many))
    assert out == [{"role": "user", "content": "\n\n".join(f"m{i}" for i in range(30_000))}]
    messages = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": ""}]},
        {"role": "system", "content": "s"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "x"},
        {"role": "assistant", "content": "y"},
    ]
    assert anthropic_messages(anthropic(messages=messages)) == [
        {"role": "user", "content": "a\n\ns\n\nb"},
        {"role": "assistant", "content": "xy"},
    ]


def test_reasoning_of_merged_turns_joins_once_whatever_their_number():
    # each thought was added to the reasoning so far (quadratic): 30,000 reasoning items of 100
    # characters took ~30 s of the event loop; now joined once, with the same separators
    thought = "x" * 100
    summary = [{"type": "summary_text", "text": thought}]
    items = [{"type": "reasoning", "summary": summary} for _ in range(30_000)]
    answer = {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "a"}]}  # fmt: skip
    out = chat_messages(None, [*items, {"type": "reasoning", "summary": []}, answer])
    assert out == [{"role": "assistant", "content": "a",
                    "reasoning_content": "\n\n".join([thought] * 30_000)}]  # fmt: skip
    pairs = [item for _ in range(30_000) for item in ({"type": "reasoning", "summary": summary},
                                                      answer)]  # fmt: skip
    out = chat_messages(None, pairs)
    assert out == [{"role": "assistant", "content": "a" * 30_000,
                    "reasoning_content": "\n\n".join([thought] * 30_000)}]  # fmt: skip
    turn = {"role": "assistant", "content": [{"type": "thinking", "thinking": thought},
                                             {"type": "text", "text": "a"}]}  # fmt: skip
    many = [{"role": "user", "content": "q"}, *[turn] * 30_000]
    out = anthropic_messages(anthropic(messages=many))
    assert out == [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a" * 30_000,
                    "reasoning_content": "\n\n".join([thought] * 30_000)}]  # fmt: skip


def test_ended_background_responses_events_are_bounded_in_bytes(monkeypatch):
    """An ended background response's events were kept by count (KEEP_ENDED, 256) and time
    only, whatever their size: 2.3 KB a token with top_logprobs 5, so 256 long answers held
    many GB for 10 minutes. The ended logs now stay within KEEP_BYTES, oldest dropped first;
    a running one is never dropped."""
    import asyncio

    from girandole.api.responses import background

    monkeypatch.setattr(background, "KEEP_BYTES", 1_000_000)
    runs = background.BackgroundResponses()

    async def main() -> None:
        runs.runs["running"] = background.BackgroundRun("running", "acct")
        for i in range(20):
            run = runs.runs[f"r{i}"] = background.BackgroundRun(f"r{i}", "acct")
            for _ in range(3):  # ~300 KB of events: ~3 such logs fit in the bound
                run.log.add("response.output_text.delta", {"delta": "x" * 100_000})
            runs._end(run)
        ended = [r for r in runs.runs.values() if r.ended is not None]
        assert sum(r.log.num_bytes for r in ended) <= 1_000_000
        assert [r.id for r in ended] == ["r17", "r18", "r19"]  # the newest
        assert "running" in runs.runs and runs.get("r19", "acct") is not None

    asyncio.run(main())


@pytest.mark.parametrize("forced", [False, True])
def test_blocks_cost_each_token_the_same(forced):
    """A block's text (the text, or a call's arguments) grows in place: `+=` on the attribute
    copied the whole block at every token (100,000 tokens of 8 characters: 1.5 s, the last
    ones 20-40 us each, the first ones 1-2 us). The test pins the text on 100,000 tokens
    (timings: benchmarks, not tests)."""

    plan = ToolPlan([], "required", ["f"], True, False) if forced else None
    blocks = OutputBlocks(plan)
    head = '{"name": "f", "arguments": {"x": "' if forced else ""
    for piece in [head, *["abcdefgh"] * 100_000]:
        blocks.feed(piece, False)
    (block,) = blocks.blocks
    assert block.text == ('{"x": "' if forced else "") + "abcdefgh" * 100_000


@pytest.mark.parametrize(("mode", "n"), [("required", 3_000), ("auto", 8_000)])
def test_many_calls_cost_each_token_the_same(mode, n):
    """Streamed calls: the calls already whole and sent are not walked again at every token,
    nor the call blocks counted again at every call (2,000 forced calls took 6.6 s of the
    event loop, 8,000 119 s, now 0.07 s and 0.3 s; 8,000 auto calls 4.6 s at the finish, now
    0.24 s). Each call is one block with its arguments, as the
    whole text reads."""

    calls = [f'{{"name": "add", "arguments": {{"a": {k}}}}}' for k in range(n)]
    text = "[" + ", ".join(calls) + "]"
    blocks = OutputBlocks(ToolPlan([], mode, ["add"], True, False), None, n - 500)
    for k in range(0, len(text), 4):
        blocks.feed(text[k : k + 4], False)
    blocks.feed("", True, "stop")
    assert [b.text for b in blocks.blocks] == [f'{{"a": {k}}}' for k in range(n - 500)]
    assert blocks.finish_reason == "tool_calls"


PNG_B64 = "iVBORw0KGgoAAAANSUhEUg=="  # a PNG's first bytes: all the media_type check reads


def test_image_blocks_and_parts_stand_where_they_were_in_merged_turns():
    """Anthropic image blocks and Responses input_image parts become chat's image_url parts in
    their order, consecutive user turns merged into one list of parts (texts as chat joins them)."""
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG_B64}}  # fmt: skip
    req = anthropic(messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}, image]},
        {"role": "user", "content": "b"},
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [image, {"type": "text", "text": "c"},
                                     {"type": "text", "text": "d"}]},
    ])  # fmt: skip
    url = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}}
    assert anthropic_messages(req) == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, url,
                                     {"type": "text", "text": "b\n\ns"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [url, {"type": "text", "text": "c\n\nd"}]},
    ]  # fmt: skip
    part = {"type": "input_image", "image_url": "https://x/y.png", "detail": "high"}
    items = input_items(responses(input=[
        {"role": "user", "content": "a"},
        {"role": "user", "content": [part, {"type": "input_text", "text": "b"}]},
        {"role": "user", "content": "c"},
    ]))  # fmt: skip
    assert items[1]["content"][0] == part  # stored as sent
    chat_url = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    assert chat_messages(None, items) == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, chat_url,
                                     {"type": "text", "text": "b\n\nc"}]},
    ]  # fmt: skip


def test_image_data_is_no_prompt_text_in_the_early_size_check():
    """The size check before tokenizing counts text: an Anthropic image block's base64 data
    and a Responses input_image's URL (megabytes for one image of 256 tokens) are not text."""
    from girandole.api.ops.server_ops import prompt_size

    data = "A" * 1_000_000
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    messages = [{"role": "user", "content": [block, {"type": "text", "text": "hello"}]}]
    assert prompt_size(messages)[0] == len("user") + len("text") + len("hello") + len("image")
    part = {"type": "input_image", "image_url": "data:image/png;base64," + data, "detail": "auto"}
    assert prompt_size([{"role": "user", "content": [part]}])[0] < 100
