"""Structured output without a server: response_format to grammars, schema checks, the tool-call
prompt, schema, parser and stream (girandole.api.serving.structured, girandole.api.chat.tools,
girandole.api.chat.tool_calls)."""

from __future__ import annotations

import json

import pytest

from girandole.api.chat.schema import ChatCompletionRequest, Tool
from girandole.api.chat.tool_calls import (
    CallScanner,
    ToolStream,
    finish_message,
    parse_calls,
    scan_calls,
    unfence,
    untag_calls,
)
from girandole.api.chat.tools import ToolPlan, call_schema, plan_tools, prompt_messages
from girandole.api.http.errors import APIError
from girandole.api.http.schema import ResponseFormat
from girandole.api.serving.structured import check_schema, response_format_grammar
from girandole.tokenizer.chat_template import GEMMA_TEMPLATE

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"]}}}  # fmt: skip
NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "$defs": {"t": {"type": "string"}},
    "properties": {"text": {"$ref": "#/$defs/t"}}}}}  # fmt: skip


def rf(**kw) -> ResponseFormat:
    return ResponseFormat.model_validate(kw)


def test_response_format_grammars():
    assert response_format_grammar(None) is None
    assert response_format_grammar(rf(type="text")) is None
    assert response_format_grammar(rf(type="json_object")).kind == "json_object"
    schema = {"type": "object", "properties": {"z": {}, "a": {}}}
    spec = response_format_grammar(rf(type="json_object", schema=schema))
    assert spec.kind == "json_schema" and list(json.loads(spec.text)["properties"]) == ["z", "a"]
    spec = response_format_grammar(
        rf(type="json_schema", json_schema={"name": "x", "schema": schema})
    )
    assert spec.kind == "json_schema" and spec.describe() == spec.text
    spec = response_format_grammar(rf(type="grammar", grammar='root ::= "a"'))
    assert (spec.kind, spec.text) == ("gbnf", 'root ::= "a"')


@pytest.mark.parametrize(
    "schema,ok",
    [
        (
            {"type": "object", "properties": {"not": {"type": "string"}}},
            True,
        ),  # a name, not a keyword
        ({"type": "string", "format": "email", "title": "t", "x-vendor": 1}, True),
        ({"allOf": [{"type": "integer"}]}, True),
        ({"anyOf": [{"type": "integer"}, {"not": {}}]}, False),
        ({"items": [{"type": "string"}, {"if": {}}]}, False),
        ({"$defs": {"a": {"dependentRequired": {}}}}, False),
        ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, False),
        ({"type": "array", "uniqueItems": False}, True),
        ({"properties": []}, False),
        (True, True),
        # what the grammar engine accepts but would not enforce (or could not meet)
        ({"$defs": {"a": {"type": "boolean"}}, "$ref": "#/$defs/a", "const": True}, False),
        ({"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a", "description": "d"}, True),
        ({"type": "array", "contains": {"const": 7}}, False),
        ({"type": "array", "contains": {}}, True),
        ({"type": "object", "required": ["zz"]}, False),
        ({"type": "object", "properties": {"zz": {}}, "required": ["zz"]}, True),
        ({"type": "object", "required": ["zz"], "anyOf": [{"properties": {"zz": {}}}]}, True),
        ({"enum": [123456789012345678901234567890]}, False),
        ({"const": 2**53}, True),
        ({"anyOf": []}, False),
        ({"oneOf": []}, False),
        ({"type": "string", "maxLength": -1}, False),
        ({"type": "array", "minItems": 1.5}, False),
        ({"type": []}, False),
    ],
)
def test_check_schema(schema, ok):
    if ok:
        check_schema(schema, "p")
    else:
        with pytest.raises(APIError) as exc:
            check_schema(schema, "p")
        assert exc.value.param == "p"


def _req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def test_plan_tools():
    assert plan_tools(_req(), GEMMA_TEMPLATE) is None
    assert plan_tools(_req(tools=[], tool_choice="auto"), GEMMA_TEMPLATE) is None
    plan = plan_tools(_req(tools=[ADD, NOTE]), GEMMA_TEMPLATE)
    assert (plan.mode, plan.allowed, plan.grammar, plan.native) == (
        "auto", ["add", "note"], None, False)  # fmt: skip
    plan = plan_tools(_req(tools=[ADD, NOTE], tool_choice="any"), "{{ tools }}")
    assert plan.mode == "required" and plan.parallel and plan.native
    assert plan.grammar.kind == "json_schema"
    plan = plan_tools(
        _req(tools=[ADD, NOTE], tool_choice={"type": "function", "name": "note"}), None
    )
    assert plan.allowed == ["note"] and not plan.parallel
    plan = plan_tools(_req(functions=[ADD["function"]], function_call={"name": "add"}), None)
    assert plan.mode == "required" and plan.allowed == ["add"]
    with pytest.raises(APIError):
        plan_tools(_req(tools=[ADD], functions=[ADD["function"]]), None)
    with pytest.raises(APIError, match="needs the function"):
        plan_tools(_req(tools=[ADD], tool_choice={"type": "function"}), None)


def test_a_function_without_a_parameters_type_takes_an_object():
    """parameters {} is read as an object schema: a forced call's arguments must be one (the
    grammar allowed any JSON value, which the call parser then refused: no call, "stop")."""
    jsonschema = pytest.importorskip("jsonschema")
    tool = Tool.model_validate({"type": "function", "function": {"name": "f", "parameters": {}}})
    schema = call_schema([tool], parallel=False)
    jsonschema.validate({"name": "f", "arguments": {"x": 1}}, schema)
    for arguments in ("something", None, [1]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "f", "arguments": arguments}, schema)


def test_call_schema_moves_defs_and_validates():
    jsonschema = pytest.importorskip("jsonschema")
    tools = [Tool.model_validate(ADD), Tool.model_validate(NOTE)]
    schema = call_schema(tools, parallel=True)
    assert "note__t" in schema["$defs"]
    good = [{"name": "add", "arguments": {"a": 1, "b": 2}},
            [{"name": "note", "arguments": {"text": "x"}}]]  # fmt: skip
    for value in good:
        jsonschema.validate(value, schema)
    for value in [{"name": "add", "arguments": {"a": 1}}, {"name": "note", "arguments": {"text": 1}},
                  [], {"name": "sub", "arguments": {}}]:  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)


def test_prompt_messages_without_native_tools():
    plan = plan_tools(_req(tools=[ADD]), GEMMA_TEMPLATE)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}},
            {"id": "c2", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "tool", "tool_call_id": "c2", "content": "0"},
        {"role": "user", "content": "thanks"},
    ]  # fmt: skip
    out, tools = prompt_messages(messages, plan, GEMMA_TEMPLATE)
    assert tools is None
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these functions:")
    assert out[2]["content"] == (
        '[{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "add", "arguments": {}}]'
    )
    assert out[3]["content"] == "Result of add (call c1): 5\n\nResult of add (call c2): 0\n\nthanks"
    # a template that renders tools itself gets them, and the messages as they are
    out, tools = prompt_messages(messages, plan, "{% for t in tools %}{% endfor %}")
    assert out is messages and tools[0]["function"]["name"] == "add"


def test_scan_and_parse_calls():
    text = (
        '[{"name": "add", "arguments": {"a": [1, "}"], "b": 2}}, {"name": "note", "arguments": {}}]'
    )
    spans = scan_calls(text)
    assert [s.name for s in spans] == ["add", "note"]
    assert text[spans[0].args_start : spans[0].args_end] == '{"a": [1, "}"], "b": 2}'
    calls = parse_calls(text, ["add", "note"])
    assert [(c.name, c.arguments) for c in calls] == [
        ("add", '{"a": [1, "}"], "b": 2}'), ("note", "{}")]  # fmt: skip
    assert parse_calls(text, ["add"]) is None  # note is not allowed
    fenced = '```json\n{"name": "add", "parameters": {"a": 1}}\n```'
    assert parse_calls(fenced, ["add"])[0].arguments == '{"a": 1}'
    assert parse_calls('{"name": "add", "arguments": "{\\"a\\": 1}"}', ["add"])[0].arguments == (
        '{"a": 1}')  # fmt: skip
    for bad in ['Sure! {"name": "add"}', '{"name": "add", "arguments": 3}', "[]", '{"name": "add"',
                '{"name": "add", "arguments": {}, "x": 1}']:  # fmt: skip
        assert parse_calls(bad, ["add"]) is None, bad
    partial = scan_calls('{"name": "add", "arguments": {"a": 1')
    assert partial[0].name == "add" and partial[0].args_end is None


def test_a_scanner_over_a_growing_text_reads_what_a_whole_scan_does():
    """CallScanner reads on from where it stopped (a whole scan at each token was quadratic);
    at every cut of these texts (escapes and strings cut anywhere, numbers, nesting, arrays
    of calls, broken JSON) it gives the spans a scan of the text so far gives."""
    import random

    texts = [
        '[{"name": "add", "arguments": {"a": [1, "}"], "b": 2.5e3}}, {"name": "note", '
        '"arguments": {"t": "say \\"hi\\" \\\\ \\u00e9 ok", "n": null, "u": true}}]',
        '{"name": "f", "arguments": {"x": {"y": [[], {}, "a,b]"]}, "z": -12}}',
        '{"name": "f", "parameters": "{\\"a\\": 1}"}',
        '{"name": "f", "arguments": {"a": 1} x',
        '  {"name" : "g" , "arguments" : { "k" : "\\\\" } }',
    ]
    rng = random.Random(7)
    fields = ("name", "args_start", "args_end")
    for text in texts:
        for _ in range(30):
            scanner, end = CallScanner(), 0
            while end < len(text):
                end = min(len(text), end + rng.randint(1, 4))
                got = [[getattr(s, f) for f in fields] for s in scanner.scan(text[:end])]
                want = [[getattr(s, f) for f in fields] for s in scan_calls(text[:end])]
                assert got == want, (text[:end], got, want)
    assert [s.name for s in scan_calls(texts[0])] == ["add", "note"]


def _plan(mode: str, allowed: tuple[str, ...] = ("add",)) -> ToolPlan:
    return ToolPlan([], mode, list(allowed), True, False)


def _replay(stream: ToolStream, text: str, step: int = 3):
    deltas = []
    for i in range(0, len(text), step):
        deltas += stream.feed(text[i : i + step])
    tail, finish = stream.finish("stop")
    return deltas + tail, finish


def test_tool_stream():
    call = '{"name": "add", "arguments": {"a": 12, "b": 3}}'
    deltas, finish = _replay(ToolStream(_plan("required")), call)
    assert finish == "tool_calls"
    header = deltas[0]["tool_calls"][0]
    assert header["function"] == {"name": "add", "arguments": ""} and header["id"]
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert args == '{"a": 12, "b": 3}' and len(deltas) > 3
    # auto: JSON-looking output is held back, then sent as a call or as content
    deltas, finish = _replay(ToolStream(_plan("auto")), " " + call)
    assert finish == "tool_calls" and len(deltas) == 2
    deltas, finish = _replay(ToolStream(_plan("auto")), '{"x": 1}')
    assert (deltas, finish) == ([{"content": '{"x": 1}'}], "stop")
    deltas, finish = _replay(ToolStream(_plan("auto")), "Hello there")
    assert "".join(d["content"] for d in deltas) == "Hello there" and len(deltas) > 1
    deltas, _ = _replay(ToolStream(None), call)
    assert "".join(d["content"] for d in deltas) == call


@pytest.mark.parametrize(
    "text, calls, allowed",
    [
        # cut before the name is whole: the one function the call is forced to (its name is
        # known), else no call and no content
        ('{"name": "ad', [("add", "")], ("add",)),
        ('{"name": "ad', [], ("add", "sub")),
        ("", [("add", "")], ("add",)),
        ('{"name": "add", "argu', [("add", "")], ("add",)),
        ('{"name": "add", "arguments": {"a": 1', [("add", '{"a": 1')], ("add",)),
        ('[{"name": "add", "arguments": {}}, {"name": "add", "arguments": {"b', [
            ("add", "{}"), ("add", '{"b')], ("add",)),
        ('[{"name": "add", "arguments": {}}, {"name": "sub", "arguments": {"b', [
            ("add", "{}"), ("sub", '{"b')], ("add", "sub")),
    ],
)  # fmt: skip
def test_a_forced_call_cut_short_is_what_its_stream_shows(text, calls, allowed):
    """A forced call cut by max_tokens: the whole message holds the calls as far as written
    (as OpenAI answers, and as the stream's tool_calls deltas add up), never its JSON as
    content; finish_reason stays length."""
    plan = _plan("required", allowed)
    message, finish = finish_message(plan, text, "length")
    assert finish == "length" and message["content"] is None
    got = [(c["function"]["name"], c["function"]["arguments"])
           for c in message.get("tool_calls", [])]  # fmt: skip
    assert got == calls
    deltas, _ = _replay(ToolStream(plan), text)
    streamed: dict[int, list[str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            entry = streamed.setdefault(tc["index"], [tc["function"].get("name"), ""])
            entry[1] += tc["function"]["arguments"]
    assert [tuple(v) for _, v in sorted(streamed.items())] == calls
    assert not any("content" in d for d in deltas)
    # under auto the same text is no call: it is content, as written
    assert finish_message(_plan("auto"), text, "length") == (
        {"role": "assistant", "content": text}, "length")  # fmt: skip


def test_deep_schema_is_a_400():
    schema: dict = {"type": "integer"}
    for _ in range(100):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(APIError) as exc:
        check_schema(schema, "response_format.schema")
    assert "deeper than" in exc.value.message


def test_calls_in_tool_call_tags_are_calls_under_auto():
    """Hermes' and Qwen's chat templates (which render tools themselves) ask the model for each
    call in `<tool_call>` tags: under auto such output was returned as content (whole and
    streamed), never as tool_calls; it is the calls, and text around the tags is still content."""
    one = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name": "note", "arguments": {}}\n</tool_call>\n'
    plan = _plan("auto", ("add", "note"))
    for text, calls in [(one, [("add", '{"a": 1}')]), (two, [("add", '{"a": 1}'), ("note", "{}")])]:
        message, finish = finish_message(plan, text, "stop")
        got = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
        assert (got, message["content"], finish) == (calls, None, "tool_calls")
        for step in (1, 3, 50):
            deltas, finish = _replay(ToolStream(_plan("auto", ("add", "note"))), text, step)
            assert finish == "tool_calls" and not any("content" in d for d in deltas)
            names = [tc["function"].get("name") for d in deltas for tc in d["tool_calls"]]
            assert [n for n in names if n] == [name for name, _ in calls]
    for text in ["Sure: " + one, one + " done", "<tool_call>\n{not json}\n</tool_call>",
                 '<tool_call>{"name": "sub", "arguments": {}}</tool_call>', "<tool", "<b>hi</b>"]:  # fmt: skip
        assert finish_message(plan, text, "stop") == (
            {"role": "assistant", "content": text},
            "stop",
        )
        deltas, finish = _replay(ToolStream(_plan("auto", ("add", "note"))), text)
        assert finish == "stop" and "".join(d["content"] for d in deltas) == text
    # many blocks and an unclosed one: read in one pass (a backtracking regex took minutes)
    many = '<tool_call>{"name": "note", "arguments": {}}</tool_call>' * 200
    assert len(parse_calls(many, ["note"])) == 200
    assert (
        finish_message(plan, many + "<tool_call>x", "length")[0]["content"] == many + "<tool_call>x"
    )


def test_a_schema_past_the_grammar_size_limit_is_refused_before_it_is_walked_or_written():
    # 200,000 properties (6 MB): refused by its size while its JSON text is still being counted,
    # not after check_schema's walk, tuple_items and json.dumps of all of it (1 s of the loop)
    props = {f"p{i}": {"type": "string"} for i in range(200_000)}
    schema = {"type": "object", "properties": props}
    with pytest.raises(APIError) as info:
        response_format_grammar(rf(type="json_schema", json_schema={"name": "x", "schema": schema}))
    assert info.value.param == "response_format.json_schema.schema"
    assert "the JSON schema is more than 262,144 bytes" in info.value.message
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}],
         "tools": [ADD, {"type": "function", "function": {"name": "big", "parameters": schema}}]}
    )  # fmt: skip
    with pytest.raises(APIError) as info:
        plan_tools(req, GEMMA_TEMPLATE)
    assert info.value.param == "tools.1.function.parameters"


def test_the_schema_size_bound_never_exceeds_the_text_the_engine_is_given():
    from girandole.api.serving.structured import check_schema_size, schema_spec

    schemas = [
        {},
        {"type": "object", "properties": {"a": {"type": "string", "enum": ["x", "é", 1, None]}}},
        {"type": "array", "items": [{"type": "integer"}, {}], "additionalItems": False},
        {"type": "array", "items": [], "additionalItems": {"type": "string"}},
        {"anyOf": [{"const": 1.5}, {"const": True}, {"type": "null"}], "description": "d" * 40},
        {"type": "object", "properties": {"k": {"type": "array", "items": {"minItems": 0}}}},
    ]
    for schema in schemas:
        size = len(schema_spec(schema).text.encode())
        check_schema_size(schema, "p", max_bytes=size)  # the bound is at most the real size
        with pytest.raises(APIError):
            check_schema_size(schema, "p", max_bytes=0)


@pytest.mark.parametrize("after", ['{"name": "add", "arguments": {"a": 1, "b": 2}}', "Hi", ""])
def test_leading_blanks_of_an_auto_stream_cost_each_token_the_same(after):
    """Under tool_choice auto, blanks at the start leave the output undecided: the head is read
    from the new text, not by stripping the whole text again at every token (300,000 newline
    tokens took 26-29 s of the event loop; now 0.1 s), and the deltas are those of the whole
    text."""

    text = "\n" * 300_000 + after
    deltas, finish = _replay(ToolStream(_plan("auto")), text, step=1)
    if after.startswith("{"):
        assert finish == "tool_calls" and deltas[1]["tool_calls"][0]["function"]["arguments"]
    else:
        assert finish == "stop" and "".join(d["content"] for d in deltas) == text


def test_a_fence_after_many_blanks_is_read_at_once():
    """A fence is read by hand: the regex it replaces backtracked over blanks after the opening
    fence, cubic in their number (1,000 newlines: 2.9 s, 3,000: 77 s of the event loop at a
    tools response's finish, whole or streamed). What it reads is what the regex read (the
    plain reference, on random short bodies), and a call fenced after many blanks is a call."""
    import random
    import re

    regex = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)
    atoms = ["`", "```", "json", "a", " ", "\n", "\t", "\u2003", "{", "}", "x", "```json\n"]
    rng = random.Random(5)
    for _ in range(20_000):
        body = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 10))).strip()
        match = regex.match(body)
        assert unfence(body) == (match.group(1).strip() if match else None), body
    call = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    assert parse_calls("```" + "\n" * 100_000 + "x", ["add"]) is None
    (parsed,) = parse_calls("```json" + "\n" * 100_000 + call + "\n```", ["add"])
    deltas, finish = _replay(ToolStream(_plan("auto")), "```" + "\n" * 3_000 + "x", step=50)
    assert parsed.arguments == '{"a": 1, "b": 2}'
    assert finish == "stop" and deltas == [{"content": "```" + "\n" * 3_000 + "x"}]


def test_many_tagged_calls_are_read_in_one_pass():
    """Tagged calls are read by index: cutting the rest of the text off after each block
    copied it, quadratic (50,000 blocks: 4.7 s of the event loop; now 0.05 s). The result is
    the plain reading's (the reference below) on random texts."""
    import random

    def plain(body: str) -> str:
        parts, rest = [], body.strip()
        while rest:
            end = rest.find("</tool_call>") if rest.startswith("<tool_call>") else -1
            if end < 0:
                return body
            parts.append(rest[len("<tool_call>") : end].strip())
            rest = rest[end + len("</tool_call>") :].lstrip()
        return "[" + ", ".join(parts) + "]" if parts else body

    atoms = ["<tool_call>", "</tool_call>", " ", "\n", "\u2003", "{}", '{"name": "a"}', "x",
             "<tool", "_call>", "</tool_call", ">"]  # fmt: skip
    rng = random.Random(9)
    for _ in range(20_000):
        body = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        assert untag_calls(body) == plain(body), body
    body = '<tool_call>{"name": "add", "arguments": {}}</tool_call>\n' * 50_000
    untagged = untag_calls(body)
    assert untagged == "[" + ", ".join(['{"name": "add", "arguments": {}}'] * 50_000) + "]"
