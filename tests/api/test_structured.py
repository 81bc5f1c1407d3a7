"""Structured output on the real default model: response_format (JSON schema, JSON object, GBNF)
on /completions and /chat/completions, tool calls through the openai client, and the 400s.

Requests go out concurrently (a few batches), so the engine decodes constrained and free rows
in the same batches. Strings in the schemas have a maxLength so every output is bounded.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from api_helpers import API_KEY, MODEL, post, sse_events

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
S = {"type": "string", "maxLength": 16}


def _schemas() -> list[tuple[str, dict]]:
    """50 schemas: ten families (nested objects, arrays, enums, ranges, optional fields, unions,
    $ref, tuples...) in five variants each."""
    out = []
    colors = ["red", "green", "blue", "black", "white", "amber", "teal"]
    for v in range(5):
        lo, hi = -5 * v, 10 + 20 * v
        enum = colors[v : v + 3]
        out += [
            (
                "a person",
                {
                    "type": "object",
                    "properties": {"name": S, "age": {"type": "integer", "minimum": 0,
                                                      "maximum": 100 + v}},
                    "required": ["name", "age"],
                    "additionalProperties": False,
                },
            ),
            (
                "a product colour and size",
                {
                    "type": "object",
                    "properties": {
                        "color": {"type": "string", "enum": enum},
                        "size": {"enum": ["S", "M", "L", v]},
                    },
                    "required": ["color", "size"],
                },
            ),
            (
                "a measurement",
                {
                    "type": "object",
                    "properties": {
                        "value": {"type": "integer", "minimum": lo, "maximum": hi},
                        "ratio": {"type": "number", "minimum": 0, "maximum": 1 + v},
                        "unit": {"const": "cm"},
                    },
                    "required": ["value", "ratio", "unit"],
                },
            ),
            (
                "a shipping address",
                {
                    "type": "object",
                    "properties": {
                        "to": S,
                        "address": {
                            "type": "object",
                            "properties": {
                                "city": S,
                                "zip": {"type": "string", "pattern": "[0-9]{5}"},
                                "geo": {
                                    "type": "object",
                                    "properties": {"lat": {"type": "integer", "minimum": -90,
                                                           "maximum": 90},
                                                   "lon": {"type": "integer", "minimum": -180,
                                                           "maximum": 180}},
                                    "required": ["lat", "lon"],
                                },
                            },
                            "required": ["city", "zip"] + (["geo"] if v % 2 else []),
                        },
                    },
                    "required": ["to", "address"],
                },
            ),
            (
                "a shopping list",
                {
                    "type": "object",
                    "properties": {
                        "items": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"name": S, "qty": {"type": "integer",
                                                                  "minimum": 1, "maximum": 9}},
                                "required": ["name", "qty"],
                            },
                            "minItems": 1,
                            "maxItems": 1 + v % 3,
                        }
                    },
                    "required": ["items"],
                },
            ),
            (
                "a user profile",
                {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                   "nick": S, "bio": S, "admin": {"type": "boolean"}},
                    "required": ["id"] if v % 2 else ["id", "admin"],
                },
            ),
            (
                "a flag and an optional note",
                {
                    "type": "object",
                    "properties": {"ok": {"type": "boolean"},
                                   "note": {"type": ["string", "null"], "maxLength": 12}},
                    "required": ["ok", "note"],
                },
            ),
            (
                "a value that is a number or a word",
                {
                    "type": "object",
                    "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0,
                                                        "maximum": 99}, S]},
                                   "kind": {"enum": ["a", "b"]}},
                    "required": ["value", "kind"],
                },
            ),
            (
                "a small tree",
                {
                    "$defs": {"leaf": {"type": "object", "properties": {"label": S},
                                       "required": ["label"]}},
                    "type": "object",
                    "properties": {"root": {"$ref": "#/$defs/leaf"},
                                   "children": {"type": "array", "items": {"$ref": "#/$defs/leaf"},
                                                "maxItems": 2}},
                    "required": ["root", "children"],
                },
            ),
            (
                "a point and tags",
                {
                    "type": "object",
                    "properties": {
                        "point": {"type": "array",
                                  "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                  {"type": "integer", "minimum": 0, "maximum": 9}],
                                  "items": False, "minItems": 2},
                        "tags": {"type": "array", "items": {"enum": enum}, "minItems": v % 2,
                                 "maxItems": 3},
                    },
                    "required": ["point", "tags"],
                },
            ),
        ]  # fmt: skip
    return out


SCHEMAS = _schemas()


def _body(i: int, what: str, schema: dict) -> tuple[str, dict]:
    common = {"model": MODEL, "max_tokens": 300, "temperature": 0.7, "seed": i}
    if i % 2:  # chat, the json_schema form
        return CHAT, {
            **common,
            "messages": [{"role": "user", "content": f"Give me {what} as JSON."}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": f"s{i}", "schema": schema}},
        }  # fmt: skip
    # completions, the legacy json_object + schema form
    return "/v1/completions", {
        **common,
        "prompt": f"Here is {what} as JSON: ",
        "response_format": {"type": "json_object", "schema": schema},
    }


async def _send_all(server, requests: list[tuple[str, dict]], batch: int) -> list[dict]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    out: list[dict] = []
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=600) as client:
        for start in range(0, len(requests), batch):
            part = requests[start : start + batch]
            rs = await asyncio.gather(*(client.post(p, json=b) for p, b in part))
            for r in rs:
                assert r.status_code == 200, r.text
                out.append(r.json())
    return out


def _output(body: dict) -> tuple[str, str]:
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, choice["finish_reason"]


@pytest.mark.timeout(1200)  # one batch of 50 short outputs: about a minute on a quiet machine
def test_fifty_json_schemas_validate(server):
    assert len(SCHEMAS) == 50
    requests = [_body(i, what, schema) for i, (what, schema) in enumerate(SCHEMAS)]
    bodies = asyncio.run(_send_all(server, requests, batch=50))
    for (what, schema), body in zip(SCHEMAS, bodies):
        text, finish = _output(body)
        assert finish == "stop", (what, text)
        jsonschema.validate(json.loads(text), schema)


GBNF = {
    "arithmetic": (
        'root ::= num (" " op " " num){1,3}\nop ::= "+" | "-" | "*" | "/"\nnum ::= [1-9] [0-9]{0,2}',
        r"[1-9][0-9]{0,2}( [-+*/] [1-9][0-9]{0,2}){1,3}",
        "Write an arithmetic expression: ",
    ),
    "list": (
        'root ::= item ("\\n" item){0,3}\nitem ::= "- " [a-z]{1,12}',
        r"- [a-z]{1,12}(\n- [a-z]{1,12}){0,3}",
        "A shopping list:\n",
    ),
    "answers": (
        'root ::= "yes" | "no" | "maybe"',
        r"yes|no|maybe",
        "Is the sky blue? Answer: ",
    ),
}


def test_gbnf_grammars_and_a_mixed_batch(server):
    """GBNF outputs lie in their grammar; free requests decode beside them in the same batches."""
    requests = []
    for grammar, _, prompt in GBNF.values():
        for seed in range(4):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 60, "temperature": 1.0,
                    "seed": seed, "response_format": {"type": "grammar", "grammar": grammar}}  # fmt: skip
            requests.append(("/v1/completions", body))
    free = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True,
            "temperature": 0}  # fmt: skip
    # greedy: sampled, a JSON string can legitimately run on past max_tokens
    json_chat = {"model": MODEL, "max_tokens": 200, "messages": [{"role": "user", "content": "Hi"}],
                 "response_format": {"type": "json_object"}, "temperature": 0}  # fmt: skip
    mixed = [("/v1/completions", free)] * 3 + [(CHAT, json_chat)] * 2
    bodies = asyncio.run(_send_all(server, requests + mixed, batch=len(requests) + len(mixed)))
    k = 0
    for name, (_, pattern, _) in GBNF.items():
        for _ in range(4):
            text, finish = _output(bodies[k])
            k += 1
            assert re.fullmatch(pattern, text), (name, text)
            assert finish == "stop", (name, text)
    free_texts = set()
    for body in bodies[k : k + 3]:
        text, finish = _output(body)
        assert finish == "length" and body["usage"]["completion_tokens"] == 24
        free_texts.add(text)
    assert len(free_texts) == 1  # greedy free rows agree whatever their neighbours' masks
    for body in bodies[k + 3 :]:
        text, finish = _output(body)
        assert finish == "stop" and isinstance(json.loads(text), dict), text


def test_raw_output_shows_the_grammar(server):
    grammar = 'root ::= "yes" | "no"'
    r = post(server, {"messages": [{"role": "user", "content": "Yes?"}], "raw_output": True,
                      "response_format": {"type": "grammar", "grammar": grammar}}, path=CHAT)  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] in ("yes", "no")
    assert choice["raw_output"]["grammar"] == grammar


# ambiguous: the Earley parser's work per token grows with the output (cubic here)
AMBIGUOUS = 'root ::= s\ns ::= s s s | s s | "a"'


@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_too_slow_per_token_ends_its_request_alone(server, stream):
    """A grammar whose per-token work grows with the output used to stall every request in the
    batch (0.7 s of the engine thread a token by token 300, rising): it ends with finish_reason
    "error" once one token's grammar work passes the limit, its text so far kept (only "a"s),
    and a request running beside it finishes as usual."""
    body = {"prompt": "Say a:", "max_tokens": 2000, "temperature": 0, "logit_bias": {"1": -100, "106": -100},
            "response_format": {"type": "grammar", "grammar": AMBIGUOUS}}  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(post, server, {"prompt": "Once upon a time", "max_tokens": 40,
                                           "temperature": 0, "ignore_eos": True})  # fmt: skip
        if stream:
            events = [e for e in sse_events(server, body) if e != "[DONE]"]
            text = "".join(c["text"] for e in events for c in e["choices"])
            finish = [
                c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]
            ]
            usage = events[-1]["usage"]
        else:
            r = post(server, body)
            assert r.status_code == 200, r.text
            (choice,) = r.json()["choices"]
            text, finish, usage = choice["text"], [choice["finish_reason"]], r.json()["usage"]
        r = other.result()
    assert finish == ["error"]
    assert text and set(text) == {"a"} and len(text) < 2000
    assert 0 < usage["completion_tokens"] < 2000
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 40
    assert "its grammar took" in server.log()


@pytest.mark.parametrize("stream", [False, True])
def test_the_stop_token_that_ends_a_grammar_is_counted_and_scored(server, stream):
    """The EOS a finished grammar takes is a generated token like any other EOS: it is in
    usage.completion_tokens and has its logprobs entry. Before, it showed in token_ids but was
    neither counted nor scored (usage 1 for ids [yes, <eos>])."""
    body = {"prompt": "Answer:", "max_tokens": 10, "temperature": 0, "n": 2, "logprobs": 1,
            "return_token_ids": True,
            "response_format": {"type": "grammar", "grammar": 'root ::= "yes" | "no"'}}  # fmt: skip
    if stream:
        events = [e for e in sse_events(server, body) if e != "[DONE]"]
        usage = events[-1]["usage"]
        ids: dict[int, list[int]] = {}
        scored: dict[int, list[str]] = {}
        for event in events:
            for c in event["choices"]:
                ids.setdefault(c["index"], []).extend(c.get("token_ids") or [])
                scored.setdefault(c["index"], []).extend((c["logprobs"] or {}).get("tokens", []))
    else:
        r = post(server, body)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        choices = r.json()["choices"]
        ids = {c["index"]: c["token_ids"] for c in choices}
        scored = {c["index"]: c["logprobs"]["tokens"] for c in choices}
    assert sorted(ids) == [0, 1]
    for k in ids:
        assert ids[k][-1] == 1 and len(scored[k]) == len(ids[k]), (ids, scored)  # <eos> last
        assert scored[k][-1] == "<eos>"
    assert usage["completion_tokens"] == sum(len(v) for v in ids.values())


# -- tools -------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}  # fmt: skip
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                           "b": {"type": "integer", "minimum": -999, "maximum": 999}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}  # fmt: skip
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/inference/v1", api_key=API_KEY, max_retries=0)


def _check_call(call, names=("get_weather", "add")) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_tool_call_required_and_named(client):
    """Forced calls (sent concurrently): required without parallel calls, a named function, the
    flat allowed_tools form, and `any` with parallel calls (one call or an array)."""
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    add = [{"role": "user", "content": "Add 2 and 3."}]
    cases = [
        (weather, "required", {"parallel_tool_calls": False}, ("get_weather", "add")),
        (add, {"type": "function", "function": {"name": "add"}}, {}, ("add",)),
        (add, {"type": "allowed_tools", "allowed_tools": {"mode": "required",
                                                          "tools": [{"type": "function",
                                                                     "name": "get_weather"}]}},
         {}, ("get_weather",)),
        (add, "any", {}, ("get_weather", "add")),
    ]  # fmt: skip

    def send(case):
        messages, tool_choice, extra, _ = case
        return client.chat.completions.create(
            model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice,
            max_tokens=150, seed=1, **extra,
        )  # fmt: skip

    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(send, cases))
    for (_, tool_choice, extra, names), r in zip(cases, responses):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", (tool_choice, choice)
        assert choice.message.content is None and choice.message.tool_calls
        if extra or isinstance(tool_choice, dict) and tool_choice["type"] == "function":
            assert len(choice.message.tool_calls) == 1  # no parallel calls
        for call in choice.message.tool_calls:
            _check_call(call, names)


def test_tool_call_stream(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo, in celsius?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120, stream=True, temperature=0,
    )  # fmt: skip
    calls: dict[int, dict] = {}
    finish = None
    fragments = 0
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content
        for tc in delta.tool_calls or []:
            if tc.id is not None:  # the header fragment: id, type and name, first
                assert tc.index not in calls and tc.function.name == "get_weather"
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            calls[tc.index]["arguments"] += tc.function.arguments or ""
            fragments += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert fragments > 2  # the arguments arrive as several fragments
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMS["get_weather"])


def test_a_streamed_call_with_logprobs_has_no_content(client):
    """logprobs on a streamed tool call: the tokens that write the call's JSON before its name
    is whole send their logprobs in chunks of their own, with an empty delta. Before, those
    chunks said `content: ""`, so the openai SDK's streamed message had content "" beside its
    tool_calls where the whole answer (and OpenAI) has null."""
    body = dict(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo, in celsius?"}],
        tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0, logprobs=True,
    )  # fmt: skip
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    with client.chat.completions.stream(**body) as stream:
        deltas = [e.chunk.choices[0].delta for e in stream if e.type == "chunk" and e.chunk.choices]
        streamed = stream.get_final_completion().choices[0]
    assert all(d.content is None for d in deltas)
    assert streamed.finish_reason == "tool_calls" and streamed.message.content is None
    assert len(streamed.logprobs.content) == len(whole.logprobs.content)
    got = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]
    assert got == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def streamed_calls(client, body: dict) -> tuple[str, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)] by call index, finish_reason) of the streamed request."""
    content, finish = "", None
    calls: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, [tc.function.name, ""])
                entry[1] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [(name, args) for _, (name, args) in sorted(calls.items())], finish


@pytest.mark.parametrize("max_tokens", [5, 16])
def test_a_forced_call_cut_short_reads_the_same_whole_and_streamed(client, max_tokens):
    """max_tokens ends a forced call before its name is whole, or inside its arguments: the
    whole message is what the stream's deltas add up to (the forced function's call, its
    arguments as far as written, as OpenAI answers), never the call's JSON as content."""
    body = dict(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo, in celsius?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=max_tokens, temperature=0,
    )  # fmt: skip
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "length" and whole.message.content is None
    content, calls, _ = streamed_calls(client, body)
    assert content == ""
    got = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert got == calls
    # the forced function's call even when cut before its name (before: no call at all at 5)
    assert [name for name, _ in got] == ["get_weather"]
    assert (got[0][1] == "") == (max_tokens == 5)


def test_echo_with_a_forced_call_keeps_the_prompt_as_content(client):
    """echo with tools: the echoed prompt (which lists the tools' schemas) is content, and calls
    are read only from the generated text. Before, the whole answer had the call's JSON in
    `content` with no tool_calls, and the stream sent the listed schemas as two bogus calls."""
    body = dict(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=60,
        temperature=0, extra_body={"echo": True},
    )  # fmt: skip
    whole = client.chat.completions.create(**body).choices[0]
    content, calls, finish = streamed_calls(client, body)
    echo = whole.message.content
    assert echo.startswith("user\n") and echo.endswith("What is the weather in Paris?\nmodel\n")
    assert whole.finish_reason == finish == "tool_calls"
    assert len(whole.message.tool_calls) == 1
    _check_call(whole.message.tool_calls[0])
    got = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert content == echo and got == calls


def test_a_forced_call_follows_refs_into_its_parameters(client):
    """A tool whose parameters point into themselves (`#/properties/celsius`, as
    zod-to-json-schema writes a reused schema, and `#` for a recursive one): before, a forced
    call was a 400 ("Cannot find field 'properties' in #/properties/celsius, field: 'tools'"),
    the reference resolved against the call's schema rather than the parameters."""
    parameters = {
        "type": "object",
        "properties": {
            "celsius": {"type": "integer", "minimum": -50, "maximum": 50},
            "feels_like": {"$ref": "#/properties/celsius"},
            "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
        },
        "required": ["celsius", "feels_like", "next"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "report", "parameters": parameters}}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Report the temperature."}],
        tools=[tool], tool_choice="required", max_tokens=120, temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "report"
    args = call.function.arguments
    if choice.finish_reason == "tool_calls":
        jsonschema.validate(json.loads(args), parameters)
        return
    # Greedy decoding may take `next`'s object branch at every level (which branch follows the
    # last bits of the logits: the AVX2 and AVX512 builds differ there) until max_tokens: then
    # every level written follows the parameters, `feels_like` through its reference.
    assert choice.finish_reason == "length", choice
    level = r'\{\s*"celsius"\s*:\s*(-?\d+)\s*,\s*"feels_like"\s*:\s*(-?\d+)\s*,\s*"next"\s*:\s*'
    chain = re.match(f"(?:{level})+", args)  # levels nested one in the next, from the start
    assert chain and len(args) - chain.end() < 60, args  # then at most a level cut short
    levels = re.findall(level, args)
    assert len(levels) >= 2, args
    assert all(-50 <= int(c) <= 50 and -50 <= int(f) <= 50 for c, f in levels), levels


def test_draft7_tuples_constrain_output_and_calls(client):
    """A tuple in draft-7's form (`items` a list, `additionalItems: false`), as pydantic v1 and
    zod-to-json-schema write one: before, a 400 ("invalid json schema: items must be a boolean
    or an object"), in response_format and in a tool's parameters alike."""
    schema = {
        "type": "object",
        "properties": {"pair": {"type": "array", "items": [
            {"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["x", "y"]}],
            "minItems": 2, "additionalItems": False}},
        "required": ["pair"],
        "additionalProperties": False,
    }  # fmt: skip
    messages = [{"role": "user", "content": "A pair."}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    out = json.loads(r.choices[0].message.content)
    jsonschema.Draft7Validator(schema).validate(out)
    assert len(out["pair"]) == 2
    tool = {"type": "function", "function": {"name": "pair", "parameters": schema}}
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0, tools=[tool],
        tool_choice="required",
    )  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    (call,) = r.choices[0].message.tool_calls
    jsonschema.Draft7Validator(schema).validate(json.loads(call.function.arguments))


@pytest.mark.parametrize("parallel", [False, None])
def test_parallel_tool_calls_false_gives_at_most_one_call_under_auto(client, parallel):
    """Under auto, output that is an array of two calls (a GBNF response_format writes it here)
    with parallel_tool_calls false: before, both calls came back, whole and streamed, which the
    client had asked never to get; now only the first. By default both."""
    two = ('[{"name": "add", "arguments": {"a": 2, "b": 3}},'
           ' {"name": "add", "arguments": {"a": 4, "b": 5}}]')  # fmt: skip
    body = dict(
        model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3, and 4 and 5."}],
        tools=TOOLS, max_tokens=60, temperature=0,
        response_format={"type": "grammar", "grammar": "root ::= " + json.dumps(two)},
    )  # fmt: skip
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    whole = client.chat.completions.create(**body).choices[0]
    content, calls, finish = streamed_calls(client, body)
    want = [("add", '{"a": 2, "b": 3}'), ("add", '{"a": 4, "b": 5}')]
    if parallel is False:
        want = want[:1]
    assert whole.finish_reason == finish == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == want
    assert content == "" and calls == want


def test_tool_auto_detects_a_call_and_results_go_back(client):
    # auto: free decoding, a call recognised in the output. Here response_format forces the
    # output into the call format, so the detection has something to recognise.
    call_format = {"type": "object", "properties": {"name": {"const": "add"},
                                                    "arguments": PARAMS["add"]},
                   "required": ["name", "arguments"]}  # fmt: skip
    ask = [{"role": "user", "content": "Add 2 and 3."}]
    r = client.chat.completions.create(
        model=MODEL, messages=ask, tools=TOOLS, max_tokens=100, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": call_format}},
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    _check_call(call, ("add",))
    # the call and its result go back through the template; tool_choice none: plain content
    history = ask + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8,
        extra_body={"raw_output": True},
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    prompt = "".join(f for f in choice.model_extra["raw_output"]["prompt_fragments"]
                     if isinstance(f, str))  # fmt: skip
    assert f"Result of add (call {call.id}): 5" in prompt
    assert "You can call these functions" not in prompt  # none: the tools are not described


# -- bad input ---------------------------------------------------------------------------------

U1 = {"role": "user", "content": "Hi"}
BAD = [
    ({"prompt": "x", "response_format": {"type": "json_object", "schema": {"type": "strnig"}}},
     "response_format", "Unsupported type"),
    ({"prompt": "x", "response_format": {"type": "json_object",
                                         "schema": {"type": "object", "properties": {
                                             "a": {"type": "string", "pattern": "(open"}}}}},
     "response_format", "Regex"),
    ({"prompt": "x", "response_format": {"type": "json_object", "schema": {
        "type": "object", "properties": {"a": {"if": {}, "then": {}}}}}},
     "response_format.schema", "Unsupported JSON schema keyword if at '/properties/a/if'"),
    ({"prompt": "x", "response_format": {"type": "json_object",
                                         "schema": {"type": "array", "uniqueItems": True}}},
     "response_format.schema", "uniqueItems"),
    ({"prompt": "x", "response_format": {"type": "json_object", "schema": [1]}},
     "response_format.schema", None),
    ({"prompt": "x", "response_format": {"type": "grammar", "grammar": "root ::= foo"}},
     "response_format", 'Rule "foo" is not defined'),
    ({"prompt": "x", "response_format": {"type": "grammar", "grammar": 'root ::= "a" |'}},
     "response_format", "EBNF parser error"),
    ({"prompt": "x", "response_format": {"type": "grammar"}}, "response_format.grammar", None),
    ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format.type", None),
    ({"messages": [U1], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "format": "ssn"}}}},
     "response_format.json_schema.schema", "format 'ssn'"),
    ({"messages": [U1], "tools": [ADD], "tool_choice": {"type": "function",
                                                       "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ({"messages": [U1], "tool_choice": "required"}, "tool_choice", None),
    ({"messages": [U1], "tools": [ADD], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format", None),
    ({"messages": [U1], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}}}]},
     "tools.0.function.parameters", None),
    ({"messages": [U1], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]}, "tools.0.function.parameters", None),
    ({"messages": [U1], "tools": [ADD, ADD]}, "tools", "unique"),
    # a schema the grammar engine rejects names its tool, under auto (before: a 200, the
    # schema never compiled until a call was forced) and forced (before: param 'tools')
    ({"messages": [U1], "tools": [ADD, {"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}]},
     "tools.1.function.parameters", "Unsupported type"),
    ({"messages": [U1], "tool_choice": "none", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {
            "a": {"$ref": "#/$defs/nope"}}}}}]},
     "tools.0.function.parameters", "Cannot find field '$defs' in #/$defs/nope"),
    ({"messages": [U1], "tool_choice": "required", "tools": [ADD, {"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "(open"}}}}}]},
     "tools.1.function.parameters", "Regex"),
    ({"messages": [U1], "tools": [{"type": "web_search", "function": {"name": "f"}}]},
     "tools.0.type", None),
    ({"messages": [U1], "tools": [ADD], "tool_choice": "sometimes"}, "tool_choice", None),
]  # fmt: skip


@pytest.mark.parametrize("body,param,text", BAD, ids=[p for _, p, _ in BAD])
def test_bad_structured_requests_are_400(server, body, param, text):
    path = CHAT if "messages" in body else "/v1/completions"
    r = post(server, {"max_tokens": 4, **body}, path=path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    if text:
        assert text in error["message"], error
