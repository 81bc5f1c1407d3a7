"""Fireworks' request fields beyond sampling, through the real openai and fireworks clients:
reasoning (`reasoning_effort`, `thinking`, `reasoning_history`, `reasoning_content`, reasoning
tokens in usage; through Anthropic's Messages and OpenAI's Responses too), `service_tier: "priority"`, stream coalescing (`stream_options.buffer_*`),
`stream_options.include_internal_content`, and `metadata` on the usage rows.

The server serves a tiny random Qwen3 with Qwen3's chat template and a keys database; one slot
at the engine, so that queued requests show the admission order. Where an output must have a
known shape (a thinking block, then an answer), a GBNF grammar fixes it: the model's random
weights only choose how the tokens spell it.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import fireworks
import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_helpers import API_KEY, ROOT, api_conftest  # noqa: E402

ACCOUNT = "testing"
MODEL = f"accounts/{ACCOUNT}/models/tiny-qwen3"
THOUGHT = "I think so"
ANSWER = "Yes."
THINK_THEN_ANSWER = {
    "type": "grammar",
    "grammar": f'root ::= "<think>\\n{THOUGHT}\\n</think>\\n\\n{ANSWER}"',
}
HI = [{"role": "user", "content": "hi"}]


def _root_conftest():
    import importlib.util

    name = "_girandole_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests/conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def cli(data_dir: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "girandole.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fields")
    data = tmp / "data"
    key = json.loads(cli(data, "keys", "create", "--account", ACCOUNT, "--json"))
    model = _root_conftest().write_tiny_qwen3(tmp / "qwen3")
    srv = api_conftest().start_server(
        tmp, "--model", str(model), "--model-id", "tiny-qwen3", "--account", ACCOUNT,
        "--data-dir", str(data), "--kv-cache-gb", "0.02", "--max-model-len", "8192",
        "--max-concurrent-requests", "1", "--max-queued-requests", "16", "--queue-timeout", "60",
        api_key=key["key"],
    )  # fmt: skip
    srv.data_dir = data
    srv.key = key
    srv.model_dir = model
    yield srv
    api_conftest().stop_server(srv)


def oa(srv) -> openai.OpenAI:
    return openai.OpenAI(api_key=srv.api_key, base_url=srv.url + "/inference/v1", max_retries=0)


def fw(srv) -> fireworks.Fireworks:
    return fireworks.Fireworks(api_key=srv.api_key, base_url=srv.url, max_retries=0)


def raw(srv, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(
        srv.url + path, json={"model": MODEL, **body}, headers=srv.headers, timeout=120
    )


# -- reasoning --------------------------------------------------------------------------------


def test_reasoning_content_is_split_from_the_answer(qwen):
    r = oa(qwen).chat.completions.create(
        model=MODEL, messages=HI, max_tokens=64, temperature=0,
        extra_body={"response_format": THINK_THEN_ANSWER, "return_token_ids": True},
    )  # fmt: skip
    message = r.choices[0].message
    assert message.content == ANSWER
    assert message.model_extra["reasoning_content"] == THOUGHT
    assert r.choices[0].finish_reason == "stop"
    # every generated token up to the one that completes </think> is a reasoning token
    ids = r.choices[0].model_extra["token_ids"]
    from girandole.tokenizer import load_tokenizer

    tok = load_tokenizer(qwen.model_dir)
    written, upto = b"", None
    for i, t in enumerate(ids):
        written += tok.token_bytes(t)
        if b"</think>" in written:
            upto = i + 1
            break
    assert r.usage.completion_tokens_details.reasoning_tokens == upto
    assert 0 < upto < r.usage.completion_tokens


def test_calls_in_qwens_tool_call_tags_are_tool_calls(qwen):
    """Qwen3's template renders the tools itself and asks for each call in <tool_call> tags:
    under tool_choice auto such an answer came back as content, whole and streamed, never as
    tool_calls."""
    call = '<tool_call>\\n{\\"name\\": \\"f\\", \\"arguments\\": {\\"a\\": 1}}\\n</tool_call>'
    grammar = {"type": "grammar", "grammar": f'root ::= "<think>\\nhm\\n</think>\\n\\n{call}"'}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}]  # fmt: skip
    body = {"model": MODEL, "messages": HI, "tools": tools, "temperature": 0, "max_tokens": 200,
            "extra_body": {"response_format": grammar}}  # fmt: skip
    r = oa(qwen).chat.completions.create(**body)
    message = r.choices[0].message
    assert (r.choices[0].finish_reason, message.content) == ("tool_calls", None)
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("f", '{"a": 1}')]  # fmt: skip
    with oa(qwen).chat.completions.stream(**body) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert (final.finish_reason, final.message.content) == ("tool_calls", None)
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        ("f", '{"a": 1}')]  # fmt: skip


# with logprobs or token ids every token gets a chunk: those of the <think> markers, which the
# split holds, carry no content (they once went out as delta.content)
@pytest.mark.parametrize(
    "extra", [{}, {"logprobs": True, "top_logprobs": 1}, {"return_token_ids": True}]
)
def test_streamed_reasoning_arrives_as_reasoning_content_deltas(qwen, extra):
    stream = fw(qwen).chat.completions.create(
        model=MODEL, messages=HI, max_tokens=64, temperature=0, stream=True,
        response_format=THINK_THEN_ANSWER, extra_body=extra,
    )  # fmt: skip
    reasoning, content, order, usage = "", "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        r = getattr(delta, "reasoning_content", None) or extra.get("reasoning_content")
        if r:
            reasoning += r
            order.append("reasoning")
        if delta.content:
            content += delta.content
            order.append("content")
    assert (reasoning, content) == (THOUGHT, ANSWER)
    assert order == sorted(order, key=lambda kind: kind == "content")  # reasoning first
    assert usage.model_dump()["completion_tokens_details"]["reasoning_tokens"] > 0


@pytest.mark.parametrize(
    "fields",
    [{"reasoning_effort": "none"}, {"reasoning_effort": False},
     {"thinking": {"type": "disabled"}}],
)  # fmt: skip
def test_thinking_off_renders_qwen3s_empty_thinking_block(qwen, fields):
    r = raw(qwen, {"messages": HI, "max_tokens": 3, "raw_output": True, **fields})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["raw_output"]["prompt_fragments"][-1].endswith(
        "assistant\n<think>\n\n</think>\n\n"
    )
    assert choice["message"]["reasoning_content"] is None
    assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


@pytest.mark.parametrize(
    "fields",
    [{"reasoning_effort": "high"}, {"reasoning_effort": True},
     {"thinking": {"type": "enabled", "budget_tokens": 2048}}, {}],
)  # fmt: skip
def test_thinking_on_leaves_the_answer_open(qwen, fields):
    r = raw(qwen, {"messages": HI, "max_tokens": 3, "raw_output": True, **fields})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["raw_output"]["prompt_fragments"][-1].endswith("assistant\n")


def test_a_prompt_that_ends_inside_a_thinking_block_starts_in_reasoning(qwen):
    """A continued assistant message that opened <think>: the output is reasoning until
    </think>."""
    messages = [*HI, {"role": "assistant", "content": "<think>\nLet me see"}]
    grammar = {"type": "grammar", "grammar": 'root ::= " more\\n</think>\\n\\nDone."'}
    r = raw(qwen, {"messages": messages, "max_tokens": 64, "response_format": grammar})
    message = r.json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (" more", "Done.")


def _tool_turn(reasoning: str) -> list[dict]:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": "{\"q\": 1}"}}  # fmt: skip
    return [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]


@pytest.mark.parametrize(
    "history, shown",
    [(None, True), ("interleaved", True), ("preserved", True), ("disabled", False)],
)
def test_reasoning_history_decides_which_earlier_reasoning_the_prompt_holds(qwen, history, shown):
    body = {"messages": _tool_turn("SECRET-PLAN"), "max_tokens": 1, "echo": True}
    if history is not None:
        body["reasoning_history"] = history
    r = fw(qwen).chat.completions.create(model=MODEL, **body)
    assert ("SECRET-PLAN" in r.choices[0].message.content) is shown
    # an earlier exchange (before the last user message) loses it under "interleaved"
    messages = [*_tool_turn("OLD-PLAN"), {"role": "user", "content": "and now?"}]
    r = fw(qwen).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1, echo=True, reasoning_history="interleaved"
    )
    assert "OLD-PLAN" not in r.choices[0].message.content


def test_integer_reasoning_effort_is_a_400(qwen):
    with pytest.raises(openai.BadRequestError) as err:
        oa(qwen).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=1, extra_body={"reasoning_effort": 500}
        )
    assert "free text" in err.value.body["message"]


def test_bad_reasoning_values_are_400s_naming_the_field(qwen):
    for fields, param in (
        ({"reasoning_effort": "enormous"}, "reasoning_effort"),
        ({"thinking": {"type": "enabled", "budget_tokens": 10}}, "thinking.budget_tokens"),
        ({"reasoning_history": "sometimes"}, "reasoning_history"),
    ):
        r = raw(qwen, {"messages": HI, "max_tokens": 1, **fields})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


def test_completions_take_reasoning_only_when_it_asks_for_nothing(qwen):
    r = raw(qwen, {"prompt": "hi", "max_tokens": 1, "reasoning_effort": "high"}, "/v1/completions")
    assert r.status_code == 400
    assert "/v1/chat/completions" in r.json()["error"]["message"]
    r = raw(qwen, {"prompt": "hi", "max_tokens": 1, "reasoning_effort": "none",
                   "thinking": {"type": "disabled"}}, "/v1/completions")  # fmt: skip
    assert r.status_code == 200, r.text


def test_a_model_that_cannot_reason_says_so(server):
    from api_helpers import MODEL as GEMMA

    client = openai.OpenAI(api_key=API_KEY, base_url=server.url + "/inference/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=GEMMA, messages=HI, max_tokens=1, reasoning_effort="high"
        )
    assert "cannot reason" in err.value.body["message"]
    # turning thinking off asks for nothing: accepted, and no reasoning fields appear
    r = client.chat.completions.create(
        model=GEMMA, messages=HI, max_tokens=1, reasoning_effort="none"
    )
    assert "reasoning_content" not in r.choices[0].message.model_extra
    assert r.usage.completion_tokens_details is None


# -- reasoning through Anthropic's Messages and OpenAI's Responses -----------------------------

# a conversation whose answer starts inside a thinking block (the final assistant turn is
# continued): what the random model writes is reasoning, cut by max_tokens
OPENED = [*HI, {"role": "assistant", "content": "<think>\nI"}]


def chat_split(srv, **fields) -> tuple[str | None, str, dict]:
    """(reasoning_content, content, usage) of OPENED on chat, greedy, tokenized as the
    translated APIs always tokenize (typed tags are text)."""
    body = {"messages": OPENED, "max_tokens": 8, "temperature": 0, "safe_tokenization": True}
    r = raw(srv, body | fields)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    return message["reasoning_content"], message["content"], r.json()["usage"]


def claude(srv) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=srv.api_key, base_url=srv.url + "/inference", max_retries=0)


def test_messages_give_reasoning_as_thinking_blocks(qwen):
    thought, answer, _ = chat_split(qwen)
    assert thought  # the model's first tokens, inside the open block
    # greedy: the SDK no longer takes `temperature`, the API does
    body = {"model": MODEL, "max_tokens": 8, "messages": OPENED, "extra_body": {"temperature": 0}}
    r = claude(qwen).messages.create(**body)
    expected = [("thinking", thought)] + ([("text", answer)] if answer else [])
    got = [(b.type, b.thinking if b.type == "thinking" else b.text) for b in r.content]
    assert got == expected and r.content[0].signature == ""
    with claude(qwen).messages.stream(**body) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert final.content == r.content and deltas[0] == "thinking_delta"
    # thinking off: Qwen3's empty thinking block ends the prompt, nothing is reasoning
    raw_output = {"raw_output": True}
    off = claude(qwen).messages.create(
        model=MODEL, max_tokens=3, messages=HI, thinking={"type": "disabled"},
        extra_body={**raw_output, "temperature": 0},  # sampled, its first token may be EOS: []
    )  # fmt: skip
    assert [b.type for b in off.content] == ["text"]
    assert off.model_extra["raw_output"]["prompt_fragments"][-1].endswith("</think>\n\n")
    on = claude(qwen).messages.create(model=MODEL, max_tokens=3, messages=HI, extra_body=raw_output,
                                      output_config={"effort": "max"})  # fmt: skip
    assert on.model_extra["raw_output"]["prompt_fragments"][-1].endswith("assistant\n")


def thinking_first(ask, tries: int = 5):
    """`ask()`'s answer (a message, or a stream's events) where the model thought: thinking
    takes no temperature but 1 (Anthropic's 400), so the tiny model is sampled, and its first
    token inside the opened block closes it or ends the answer about one time in 160: asked
    again then (five misses in a row: about 1e-11)."""
    for _ in range(tries):
        answer = ask()
        blocks = answer.content if hasattr(answer, "content") else [
            e.content_block for e in answer if e.type == "content_block_start"]  # fmt: skip
        if blocks and blocks[0].type == "thinking":
            return answer
    raise AssertionError(f"no thinking in {tries} answers")


def test_messages_thinking_display_omitted_leaves_the_text_out(qwen):
    """Anthropic's `thinking.display: "omitted"`: the thinking block is there, its text empty
    (whole), and a stream sends no thinking_delta; "summarized" (the default) shows it whole
    (nothing here summarizes): the model's output up to `</think>`, as its raw completion
    says."""
    body = {"model": MODEL, "max_tokens": 8, "messages": OPENED,
            "extra_body": {"raw_output": True}}  # fmt: skip
    client = claude(qwen)
    summarized = {"type": "adaptive", "display": "summarized"}
    shown = thinking_first(lambda: client.messages.create(**body, thinking=summarized))
    # the raw completion writes out special tokens the sampled tiny model may emit inside its
    # thinking (`<|im_start|>`); the block's text, as every answer's, leaves them out
    completion = re.sub(r"<\|[a-z_]+\|>", "", shown.model_extra["raw_output"]["completion"])
    assert shown.content[0].thinking and shown.content[0].thinking in completion
    omitted = {"type": "adaptive", "display": "omitted"}
    r = thinking_first(lambda: client.messages.create(**body, thinking=omitted))
    assert [(b.type, b.thinking, b.signature) for b in r.content[:1]] == [("thinking", "", "")]
    assert r.model_extra["raw_output"]["completion"] and r.usage.output_tokens > 0

    def streamed():
        with client.messages.stream(**{**body, "extra_body": {}}, thinking=omitted) as stream:
            events = list(stream)
            events.append(stream.get_final_message())
        return events

    *events, final = thinking_first(streamed)
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert "thinking_delta" not in deltas
    assert (final.content[0].type, final.content[0].thinking) == ("thinking", "")


def test_messages_thinking_blocks_reach_the_template_in_a_tool_loop(qwen):
    messages = [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "SECRET-PLAN", "signature": ""},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "42"}]},
    ]  # fmt: skip
    r = claude(qwen).messages.create(model=MODEL, max_tokens=1, messages=messages,
                                     extra_body={"raw_output": True})  # fmt: skip
    assert "SECRET-PLAN" in str(r.model_extra["raw_output"]["prompt_fragments"])


def test_responses_give_reasoning_items(qwen):
    thought, answer, usage = chat_split(qwen, reasoning_effort="high")
    client = oa(qwen)
    body = {"model": MODEL, "input": OPENED, "max_output_tokens": 8, "temperature": 0,
            "reasoning": {"effort": "high", "summary": "auto"}}  # fmt: skip
    r = client.responses.create(**body)
    assert r.output[0].type == "reasoning" and r.output[0].id.startswith("rs_")
    assert [c.text for c in r.output[0].content] == [thought] and r.output[0].summary == []
    assert r.output_text == (answer or "")
    assert (r.reasoning.effort, r.reasoning.summary) == ("high", "auto")
    details = usage["completion_tokens_details"]["reasoning_tokens"]
    assert r.usage.output_tokens_details.reasoning_tokens == details > 0
    with client.responses.stream(**body) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.reasoning_text.delta" in kinds
    assert [o.model_dump(exclude={"id"}) for o in final.output] == \
        [o.model_dump(exclude={"id"}) for o in r.output]  # fmt: skip
    # encrypted content (the Codex CLI asks for it with store false): the field, null, since
    # the reasoning's text is in the item itself
    enc = client.responses.create(**body, store=False, include=["reasoning.encrypted_content"])
    assert enc.output[0].encrypted_content is None
    assert enc.output[0].content == r.output[0].content
    # logprobs go with the text: not the reasoning's tokens
    lp = client.responses.create(**body, include=["message.output_text.logprobs"])
    text = sum(len(c.logprobs) for o in lp.output if o.type == "message" for c in o.content)
    assert text == lp.usage.output_tokens - lp.usage.output_tokens_details.reasoning_tokens
    # the stored reasoning is the next turn's reasoning_content: Qwen3 shows it while the turn
    # is still in progress (no user message after it), so the prompt grows by it
    call = {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"}
    turn = [{"role": "user", "content": "look it up"}, call,
            {"type": "function_call_output", "call_id": "c1", "output": "42"}]  # fmt: skip
    plain = client.responses.create(model=MODEL, input=turn, max_output_tokens=1)
    thinking = {"type": "reasoning", "summary": [],
                "content": [{"type": "reasoning_text", "text": "A long plan " * 20}]}  # fmt: skip
    reasoned = client.responses.create(model=MODEL, input=[turn[0], thinking, *turn[1:]],
                                       max_output_tokens=1)  # fmt: skip
    assert reasoned.usage.input_tokens > plain.usage.input_tokens + 20


def test_responses_truncation_auto_drops_the_oldest_turns(qwen):
    client = oa(qwen)

    def exchange(i: int) -> list[dict]:
        return [{"role": "user", "content": f"turn {i} " + "hello " * 100},
                {"role": "assistant", "content": "ok"}]  # fmt: skip

    one = client.responses.create(model=MODEL, input=exchange(0), max_output_tokens=1, store=False)
    size = one.usage.input_tokens  # an exchange's tokens, and a little of the template's
    context = client.models.retrieve(MODEL).model_extra["context_length"]  # the KV cache's room
    turns = [m for i in range(context // size + 4) for m in exchange(i)]
    turns.append({"role": "user", "content": "and now?"})
    with pytest.raises(openai.BadRequestError) as err:  # past the context
        client.responses.create(model=MODEL, input=turns, max_output_tokens=16)
    # Responses' own field and OpenAI's code (chat's `messages` is no field here)
    assert (err.value.body["param"], err.value.body["code"]) == ("input", "context_length_exceeded")
    r = client.responses.create(
        model=MODEL, input=turns, max_output_tokens=16, truncation="auto", store=False
    )
    assert r.truncation == "auto" and r.output_text is not None
    # the oldest exchanges went, as few as fit: room left for the 16 tokens asked for
    assert context - 16 - 2 * size < r.usage.input_tokens <= context - 16
    alone = [
        {"role": "user", "content": "hello " * (2 * context)}
    ]  # the last turn alone does not fit
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input=alone, max_output_tokens=16, truncation="auto")
    assert err.value.body["param"] == "input"


def test_responses_max_tool_calls_keeps_the_first_calls(qwen):
    tool = {"type": "function", "name": "lookup",
            "parameters": {"type": "object", "properties": {}}}  # fmt: skip
    r = oa(qwen).responses.create(model=MODEL, input="look", tools=[tool], tool_choice="required",
                                  max_tool_calls=1, max_output_tokens=64)  # fmt: skip
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and r.max_tool_calls == 1


# -- service_tier -------------------------------------------------------------------------------


def _open_stream(srv, max_tokens: int):
    """A streaming request holding the one slot once this returns (its first chunk came)."""
    cm = httpx.stream(
        "POST", srv.url + "/v1/completions", timeout=300, headers=srv.headers,
        json={"model": MODEL, "prompt": "hold", "max_tokens": max_tokens, "ignore_eos": True,
              "stream": True},
    )  # fmt: skip
    response = cm.__enter__()
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            break
    return cm, response, lines  # the response must live: a collected one hangs up


def _wait_queued(srv, n: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        line = next(x for x in metrics.splitlines() if x.startswith("girandole_requests_queued "))
        if float(line.split()[1]) >= n:
            return
        assert time.monotonic() < deadline, line
        time.sleep(0.05)


def test_priority_requests_pass_queued_default_ones(qwen):
    client = oa(qwen)
    ids: dict[str, str] = {}
    errors: list[Exception] = []

    def run(name: str, **extra) -> None:
        try:  # the openai client's completions take service_tier only in extra_body
            r = client.completions.create(
                model=MODEL, prompt=name, max_tokens=8, extra_body={"ignore_eos": True, **extra}
            )
            ids[name] = r.id
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    holder, *_alive = _open_stream(qwen, 8000)
    threads = []
    try:
        for n, (name, extra) in enumerate((("d1", {}), ("d2", {"service_tier": "default"}),
                                           ("p1", {"service_tier": "priority"}))):  # fmt: skip
            t = threading.Thread(target=run, args=(name,), kwargs=extra)
            t.start()
            threads.append(t)
            _wait_queued(qwen, n + 1)  # queued in this order
    finally:
        holder.__exit__(None, None, None)  # frees the slot
    for t in threads:
        t.join(60)
    assert not errors
    # The order the server finished them in, from its usage rows (start + duration, both its
    # own clocks): a client thread's wake-up, or the lag before the server reads a request,
    # can exceed a tiny request's whole run under load.
    ends = {}
    for name, request_id in ids.items():
        row = _usage_row(qwen, request_id)
        ends[name] = row["time"] + row["duration_s"]
    assert sorted(ends, key=ends.get) == ["p1", "d1", "d2"]


def test_service_tier_values_are_checked(qwen):
    r = raw(qwen, {"prompt": "x", "max_tokens": 1, "service_tier": "urgent"}, "/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "service_tier"
    for tier in ("auto", "default", "flex", "priority"):
        assert raw(qwen, {"messages": HI, "max_tokens": 1, "service_tier": tier}).status_code == 200


# -- stream_options: buffering, internal content ---------------------------------------------


def _chunks(srv, body: dict, path: str = "/v1/completions") -> list[dict]:
    with httpx.stream(
        "POST", srv.url + path, headers=srv.headers, timeout=120,
        json={"model": MODEL, "stream": True, "ignore_eos": True, **body},
    ) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _token_chunks(chunks: list[dict]) -> list[list[int]]:
    """The token ids behind each content chunk (include_internal_content)."""
    out = []
    for c in chunks:
        for choice in c["choices"]:
            inner = choice.get("internal_content") or choice.get("delta", {}).get(
                "internal_content"
            )
            if inner is not None:
                assert inner["token_id"] == inner["token_ids"][-1]
                out.append(inner["token_ids"])
    return out


def test_internal_content_names_the_tokens_behind_each_chunk(qwen):
    body = {"prompt": "once", "max_tokens": 6,
            "stream_options": {"include_internal_content": True}, "return_token_ids": True}  # fmt: skip
    chunks = _chunks(qwen, body)
    per_chunk = _token_chunks(chunks)
    ids = [t for c in chunks for choice in c["choices"] for t in choice.get("token_ids", [])]
    assert [t for group in per_chunk for t in group] == ids and len(ids) == 6
    chat = _chunks(qwen, {"messages": HI, "max_tokens": 4,
                          "stream_options": {"include_internal_content": True}},
                   "/v1/chat/completions")  # fmt: skip
    assert sum(len(g) for g in _token_chunks(chat)) >= 1


def test_buffer_tokens_coalesces_chunks(qwen):
    opts = {"include_internal_content": True, "buffer_tokens": 4}
    chunks = _chunks(qwen, {"prompt": "once", "max_tokens": 12, "stream_options": opts})
    assert [len(g) for g in _token_chunks(chunks)] == [4, 4, 4]
    # fireworks' client reads the coalesced stream as any other
    stream = fw(qwen).completions.create(
        model=MODEL, prompt="once", max_tokens=10, stream=True, ignore_eos=True,
        extra_body={"stream_options": {"buffer_tokens": 4}},
    )  # fmt: skip
    texts = [c.choices[0].text for c in stream if c.choices]
    assert len(texts) <= 4  # 4 + 4 + 2 tokens, then the finish chunk


def test_buffer_mode_all_waits_for_every_limit(qwen):
    opts = {"include_internal_content": True, "buffer_tokens": 3, "buffer_ms": 600_000,
            "buffer_mode": "all"}  # fmt: skip
    chunks = _chunks(qwen, {"prompt": "once", "max_tokens": 7, "stream_options": opts})
    assert [len(g) for g in _token_chunks(chunks)] == [7]  # the time limit is never reached
    opts["buffer_mode"] = "any"
    chunks = _chunks(qwen, {"prompt": "once", "max_tokens": 7, "stream_options": opts})
    assert [len(g) for g in _token_chunks(chunks)] == [3, 3, 1]
    opts = {"include_internal_content": True, "buffer_ms": 0}
    chunks = _chunks(qwen, {"prompt": "once", "max_tokens": 5, "stream_options": opts})
    assert sum(len(g) for g in _token_chunks(chunks)) == 5


def test_buffered_chat_stream_keeps_its_text(qwen):
    body = {"messages": HI, "max_tokens": 64, "temperature": 0,
            "response_format": THINK_THEN_ANSWER, "stream_options": {"buffer_tokens": 5}}  # fmt: skip
    chunks = _chunks(qwen, body, "/v1/chat/completions")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER


def test_a_long_buffered_chunk_costs_each_token_the_same():
    """The held text grows in place: `+=` on the held update's attribute copied all the held
    text at every token (buffer_tokens 100,000, tokens of 8 characters: 1.6 s, the last ones
    15-40 us each, the first ones 1-2 us). The test pins the held text on 100,000 tokens."""

    from girandole.api.serving.buffering import StreamBuffer
    from girandole.api.serving.choice import Update

    buffer = StreamBuffer(buffer_tokens=100_000)
    for k in range(100_000):
        sent = buffer.push(0, Update(text="abcdefgh", token_ids=[k]), False)
    assert sent is not None and sent.text == "abcdefgh" * 100_000
    assert sent.token_ids == list(range(100_000))


def test_bad_buffer_options_are_400s(qwen):
    for opts, param in (({"buffer_tokens": 0}, "stream_options.buffer_tokens"),
                        ({"buffer_mode": "most"}, "stream_options.buffer_mode"),
                        ({"buffer_ms": -1}, "stream_options.buffer_ms")):  # fmt: skip
        for stream in (True, False):  # checked without a stream too (docs/request-fields.md)
            body = {"prompt": "x", "stream": stream, "stream_options": opts}
            r = raw(qwen, body, "/v1/completions")
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_stream_options_without_a_stream_do_nothing(qwen):
    """Accepted, as Fireworks' schema allows (OpenAI refuses it): a whole body, with its usage
    (include_usage false is about the stream's last chunk)."""
    opts = {"include_usage": False, "buffer_tokens": 2, "include_internal_content": True}
    r = raw(qwen, {"prompt": "x", "max_tokens": 3, "stream_options": opts}, "/v1/completions")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] >= 1
    assert "internal_content" not in body["choices"][0]


# -- metadata ------------------------------------------------------------------------------------


def _usage_row(srv, request_id: str) -> dict:
    from girandole.registry.keystore import Database

    deadline = time.monotonic() + 10
    db = Database.in_folder(srv.data_dir)
    try:
        while True:
            rows = db.usage_rows(request_id)
            if rows or time.monotonic() > deadline:
                return rows[0]
            time.sleep(0.05)
    finally:
        db.close()


def test_metadata_is_kept_with_the_usage_row_and_queryable(qwen):
    r = oa(qwen).chat.completions.create(
        model=MODEL, messages=HI, max_tokens=2, metadata={"team": "search", "run": "r-7"}
    )
    row = _usage_row(qwen, r.id)
    assert row["metadata"] == {"team": "search", "run": "r-7"}
    assert row["completion_tokens"] == r.usage.completion_tokens
    r2 = fw(qwen).completions.create(
        model=MODEL, prompt="x", max_tokens=1, metadata={"team": "ads"}
    )
    assert _usage_row(qwen, r2.id)["metadata"] == {"team": "ads"}
    by_team = json.loads(cli(qwen.data_dir, "usage", "--by", "metadata.team", "--json"))
    teams = {row["metadata.team"]: row["requests"] for row in by_team}
    assert teams["search"] >= 1 and teams["ads"] >= 1
    only = json.loads(cli(qwen.data_dir, "usage", "--metadata", "run=r-7", "--json"))
    assert [row["requests"] for row in only] == [1]
    assert "REQUESTS" in cli(qwen.data_dir, "usage", "--by", "metadata.team")


def test_metadata_with_non_ascii_keys_is_queryable(qwen):
    from girandole.registry.keystore import Database

    metadata = {"équipe": "récolte", "チーム": "検索"}
    r = raw(qwen, {"messages": HI, "max_tokens": 1, "metadata": metadata})
    assert r.status_code == 200, r.text
    assert _usage_row(qwen, r.json()["id"])["metadata"] == metadata
    by = json.loads(cli(qwen.data_dir, "usage", "--by", "metadata.équipe", "--json"))
    assert {row["metadata.équipe"]: row["requests"] for row in by}.get("récolte") == 1, by
    only = json.loads(cli(qwen.data_dir, "usage", "--metadata", "チーム=検索", "--json"))
    assert [row["requests"] for row in only] == [1]
    # rows written before metadata was stored unescaped spell the key \u00e9quipe: found too
    db = Database.in_folder(qwen.data_dir)
    try:
        db.insert_usage([{
            "time": time.time(), "request_id": "before-the-fix", "account": ACCOUNT,
            "endpoint": "chat", "status": 200, "stream": 0, "aborted": 0, "num_choices": 1,
            "prompt_tokens": 1, "cached_tokens": 0, "completion_tokens": 1, "duration_s": 0.1,
            "metadata": json.dumps({"équipe": "récolte"}),
        }])  # fmt: skip
    finally:
        db.close()
    only = json.loads(cli(qwen.data_dir, "usage", "--metadata", "équipe=récolte", "--json"))
    assert [row["requests"] for row in only] == [2]
    # a value with a terminal escape sequence is shown escaped in the table
    r = raw(qwen, {"messages": HI, "max_tokens": 1, "metadata": {"équipe": "\x1b[31mred"}})
    assert r.status_code == 200, r.text
    _usage_row(qwen, r.json()["id"])
    table = cli(qwen.data_dir, "usage", "--by", "metadata.équipe")
    assert "\x1b" not in table and "\\x1b[31mred" in table, table


def test_bad_metadata_is_a_400(qwen):
    for metadata, param in (({"a": 1}, "metadata.a"),
                            ({f"k{i}": "v" for i in range(17)}, "metadata"),
                            ({"k": "v" * 513}, "metadata.k")):  # fmt: skip
        r = raw(qwen, {"messages": HI, "max_tokens": 1, "metadata": metadata})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


# -- sampling_mask -------------------------------------------------------------------------------


def test_sampling_mask_reports_the_tokens_sampling_allowed(qwen):
    base = {"prompt": "once", "max_tokens": 4, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 5, "seed": 7}  # fmt: skip
    # top_k 5: five tokens allowed at every step, and the chosen one is among them
    r = raw(qwen, {**base, "top_k": 5, "sampling_mask": "non_zero_list"}, "/v1/completions")
    for entry in r.json()["choices"][0]["logprobs"]["content"]:
        assert entry["sampling_mask_count"] == 5 == len(entry["sampling_mask"])
        assert entry["token_id"] in entry["sampling_mask"]
        assert set(entry["sampling_mask"]) == {t["token_id"] for t in entry["top_logprobs"]}
    # greedy: only the argmax; the buffer is a bitmask of the same set
    r = oa(qwen).chat.completions.create(
        model=MODEL, messages=HI, max_tokens=3, temperature=0, logprobs=True,
        extra_body={"sampling_mask": "non_zero_buffer"},
    )  # fmt: skip
    for entry in r.choices[0].logprobs.content:
        extra = entry.model_extra
        bits = base64.b64decode(extra["sampling_mask"])
        allowed = [i for i in range(len(bits) * 8) if bits[i // 8] >> (i % 8) & 1]
        assert allowed == [entry.model_extra["token_id"]] and extra["sampling_mask_count"] == 1
    # count only; top_p 1, temperature 1: the whole vocabulary
    r = raw(qwen, {**base, "sampling_mask": "count", "top_k": 0, "temperature": 1},
            "/v1/completions")  # fmt: skip
    for entry in r.json()["choices"][0]["logprobs"]["content"]:
        assert "sampling_mask" not in entry and entry["sampling_mask_count"] == 322


def test_sampling_mask_needs_content_logprobs(qwen):
    for extra in ({}, {"logprobs": 2}):
        r = raw(qwen, {"prompt": "x", "max_tokens": 1, "sampling_mask": "count", **extra},
                "/v1/completions")  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_mask", r.text


# -- prompt_token_ids (chat) ---------------------------------------------------------------------


def test_chat_prompt_token_ids_skip_the_template(qwen):
    templated = raw(qwen, {"messages": HI, "max_tokens": 4, "temperature": 0,
                           "raw_output": True, "reasoning_effort": "none"})  # fmt: skip
    ids = templated.json()["choices"][0]["raw_output"]["prompt_token_ids"]
    r = oa(qwen).chat.completions.create(
        model=MODEL, messages=[], max_tokens=4, temperature=0,
        extra_body={"prompt_token_ids": ids, "raw_output": True, "messages": None},
    )  # fmt: skip
    assert r.choices[0].model_extra["raw_output"]["prompt_token_ids"] == ids
    assert r.choices[0].message.content == templated.json()["choices"][0]["message"]["content"]
    assert r.usage.prompt_tokens == len(ids)


def test_chat_prompt_token_ids_errors(qwen):
    for body, param in (({"messages": HI, "prompt_token_ids": [1, 2]}, "prompt_token_ids"),
                        ({}, "messages"),
                        ({"prompt_token_ids": [10**6]}, "prompt_token_ids"),
                        ({"prompt_token_ids": []}, "prompt_token_ids")):  # fmt: skip
        r = raw(qwen, {"max_tokens": 1, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_an_echoed_prompt_is_content_and_only_the_output_is_split(qwen):
    # the prompt ends inside a <think> block: echo must not turn the prompt into reasoning
    messages = [*HI, {"role": "assistant", "content": "<think>\nLet me see"}]
    grammar = {"type": "grammar", "grammar": 'root ::= " more\\n</think>\\n\\nDone."'}
    body = {"messages": messages, "max_tokens": 64, "response_format": grammar, "echo": True}
    message = raw(qwen, body).json()["choices"][0]["message"]
    assert message["reasoning_content"] == " more"
    assert message["content"].endswith("<think>\nLet me seeDone.")
    chunks = _chunks(qwen, {**body, "ignore_eos": False}, "/v1/chat/completions")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == " more"
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
