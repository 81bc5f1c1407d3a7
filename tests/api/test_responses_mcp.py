"""OpenAI Responses' MCP tools, run by girandole itself (`girandole.api.responses.mcp`), on the
real server and default model against a real MCP server (`mcp_server.py`: the mcp SDK's, over
Streamable HTTP and over HTTP+SSE), driven by the openai SDK and raw HTTP: tools listed, calls
run and fed back to the model in a second round, the streamed events, failed calls, follow-up
turns that do not list again, approvals, allowed_tools, headers, and the 4xx."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from api_helpers import API_KEY, MODEL, WEATHER_PARAMETERS, usage_row
from loopback import free_port
from mcp_server import start_mcp_servers

pytestmark = pytest.mark.slow

QUESTION = "What is 2 + 40?"
ADD = {"type": "mcp", "server_label": "calc", "name": "add"}


@pytest.fixture(scope="module")
def mcp():
    servers = start_mcp_servers()
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/inference/v1", api_key=API_KEY, max_retries=0)


def calc(mcp, **extra) -> dict:
    return {"type": "mcp", "server_label": "calc", "server_url": mcp.http_url, **extra}


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body},
                      headers=server.headers, timeout=120)  # fmt: skip


def test_call_runs_and_its_result_reaches_the_model(client, server, mcp):
    r = client.responses.create(model=MODEL, input=QUESTION, tools=[calc(mcp)], tool_choice=ADD,
                                max_tool_calls=1, max_output_tokens=48, temperature=0)  # fmt: skip
    kinds = [o.type for o in r.output]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"], kinds
    listed, call = r.output[0], r.output[1]
    # the tools offered: a name that is not a function name is left out
    assert listed.server_label == "calc" and listed.id.startswith("mcpl_")
    assert sorted(t.name for t in listed.tools) == ["add", "boom", "slow"]
    add = next(t for t in listed.tools if t.name == "add")
    assert add.input_schema["required"] == ["a", "b"] and add.annotations["readOnlyHint"] is True
    args = json.loads(call.arguments)
    assert (call.name, call.server_label, call.status, call.error) == (
        "add",
        "calc",
        "completed",
        None,
    )
    assert call.output == str(args["a"] + args["b"]) and call.id.startswith("mcp_")
    assert "tools/call" in mcp.http.rpcs()
    # two rounds: the second's prompt is the conversation with the call and its output
    first = client.responses.create(model=MODEL, input=QUESTION, tools=[calc(mcp)],
                                    tool_choice=ADD, max_output_tokens=1, store=False, temperature=0)  # fmt: skip
    assert [o.type for o in first.output] == ["mcp_list_tools", "mcp_call"]
    assert first.output[1].status == "incomplete" and first.output[1].output is None  # not run
    replay = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": QUESTION}, call.model_dump()],
        tools=[calc(mcp)], tool_choice="none", max_output_tokens=1, store=False, temperature=0)  # fmt: skip
    assert r.usage.input_tokens == first.usage.input_tokens + replay.usage.input_tokens
    assert r.usage.output_tokens <= 48
    # the usage row counts both rounds
    assert usage_row(server, r.id) == [
        ("responses", 200, r.usage.input_tokens, r.usage.output_tokens)
    ]


def test_streamed_over_sse_as_fireworks_writes_it(client, mcp):
    """Fireworks' form (`{"type": "sse", "server_url"}`, no label: the host is the label),
    streamed: OpenAI's events for the list and the call, then the answer's; the final response
    is the whole one's."""
    tools = [{"type": "sse", "server_url": mcp.sse_url}]
    kwargs = dict(model=MODEL, input=QUESTION, tools=tools, max_tool_calls=1, temperature=0,
                  tool_choice={"type": "mcp", "server_label": "127.0.0.1", "name": "add"},
                  max_output_tokens=40)  # fmt: skip
    mcp.clear()
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert {"tools/list", "tools/call"} <= set(mcp.sse.rpcs())
    whole = client.responses.create(**kwargs)
    for r in (final, whole):
        assert [o.type for o in r.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert [(o.arguments, o.output) for o in (final.output[1], whole.output[1])] == [
        (whole.output[1].arguments, whole.output[1].output)
    ] * 2
    # (the texts may differ: the template shows the model the call's id)
    print(final.output[-1].content[0].text.split("</think>")[-1])  # Fireworks' example line
    assert [e.sequence_number for e in events] == list(range(len(events)))
    listed, call = final.output[0], final.output[1]

    def names(item_id: str) -> list[str]:
        got = [e.type for e in events if getattr(e, "item_id", None) == item_id
               or getattr(getattr(e, "item", None), "id", None) == item_id]  # fmt: skip
        return [n for i, n in enumerate(got) if i == 0 or n != got[i - 1]]  # deltas once

    assert names(listed.id) == ["response.output_item.added", "response.mcp_list_tools.in_progress",
                                "response.mcp_list_tools.completed", "response.output_item.done"]  # fmt: skip
    assert names(call.id) == [
        "response.output_item.added", "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done", "response.mcp_call.in_progress",
        "response.mcp_call.completed", "response.output_item.done",
    ]  # fmt: skip
    deltas = [e.delta for e in events if e.type == "response.mcp_call_arguments.delta"]
    assert "".join(deltas) == call.arguments
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.output_index for e in done] == [0, 1, 2] and done[1].item.output == call.output


def test_mcp_type_falls_back_to_the_sse_transport(client, mcp):
    """A `"type": "mcp"` server that answers the Streamable HTTP POST with 405 is spoken to
    over HTTP+SSE (the spec's rule)."""
    r = client.responses.create(
        model=MODEL, input=QUESTION, tools=[calc(mcp, server_url=mcp.sse_url)], tool_choice=ADD,
        max_tool_calls=1, max_output_tokens=24, temperature=0, store=False,
    )  # fmt: skip
    assert r.output[1].type == "mcp_call" and r.output[1].status == "completed"


def test_failed_call_is_reported_and_the_model_goes_on(client, mcp):
    r = client.responses.create(
        model=MODEL, input="Break it", tools=[calc(mcp)], max_tool_calls=1, max_output_tokens=40,
        tool_choice={"type": "mcp", "server_label": "calc", "name": "boom"}, store=False, temperature=0)  # fmt: skip
    assert [o.type for o in r.output] == ["mcp_list_tools", "mcp_call", "message"]
    call = r.output[1]
    assert call.status == "failed" and call.output is None
    assert call.error.type == "mcp_tool_execution_error" and "boom" in json.dumps(
        call.error.content
    )


def test_follow_up_turn_does_not_list_again(client, mcp):
    """The second turn reuses the first's tool list. What the model writes around its calls is
    not asserted: the first turn's random item ids are in the second's prompt, so its greedy
    text varies from run to run (a CI run got the second call and no message)."""
    first = client.responses.create(model=MODEL, input=QUESTION, tools=[calc(mcp)],
                                    tool_choice=ADD, max_tool_calls=1, max_output_tokens=30, temperature=0)  # fmt: skip
    mcp.clear()
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input="And 3 + 4?", tools=[calc(mcp)],
        tool_choice=ADD, max_tool_calls=1, max_output_tokens=30, temperature=0)  # fmt: skip
    kinds = [o.type for o in second.output]
    assert kinds[0] == "mcp_call" and "mcp_list_tools" not in kinds, kinds
    assert "tools/list" not in mcp.http.rpcs()
    ran = second.output[0].status == "completed"  # not cut short by max_output_tokens
    assert ("tools/call" in mcp.http.rpcs()) == ran
    items = [i.type for i in client.responses.input_items.list(second.id, order="asc").data]
    assert items == ["message", *(o.type for o in first.output), "message"]
    assert items.count("mcp_list_tools") == 1


def test_approval(client, server, mcp):
    tools = [calc(mcp, require_approval="always")]
    mcp.clear()
    asked = client.responses.create(model=MODEL, input=QUESTION, tools=tools, tool_choice=ADD,
                                    max_output_tokens=40, temperature=0)  # fmt: skip
    assert [o.type for o in asked.output] == ["mcp_list_tools", "mcp_approval_request"]
    assert asked.status == "completed" and "tools/call" not in mcp.http.rpcs()
    request = asked.output[1]
    assert (
        request.name == "add" and request.server_label == "calc" and request.id.startswith("mcpr_")
    )
    args = json.loads(request.arguments)

    def answer(approve: bool) -> openai.types.responses.Response:
        item = {"type": "mcp_approval_response", "approval_request_id": request.id,
                "approve": approve}  # fmt: skip
        return client.responses.create(model=MODEL, previous_response_id=asked.id, input=[item],
                                       tools=tools, tool_choice="none", max_output_tokens=8, temperature=0)  # fmt: skip

    approved = answer(True)
    assert [o.type for o in approved.output] == ["mcp_call", "message"]
    call = approved.output[0]
    assert call.approval_request_id == request.id and call.output == str(args["a"] + args["b"])
    mcp.clear()
    denied = answer(False)
    assert [o.type for o in denied.output] == ["message"] and "tools/call" not in mcp.http.rpcs()
    # a filter: `never` for add runs it without asking
    never = {"never": {"tool_names": ["add"]}, "always": {"read_only": False}}
    r = client.responses.create(model=MODEL, input=QUESTION, tools=[calc(mcp, require_approval=never)],
                                tool_choice=ADD, max_tool_calls=1, max_output_tokens=30, store=False, temperature=0)  # fmt: skip
    assert [o.type for o in r.output][:2] == ["mcp_list_tools", "mcp_call"]
    unknown = {"type": "mcp_approval_response", "approval_request_id": "mcpr_nope", "approve": True}
    bad = post(server, {"previous_response_id": asked.id, "input": [unknown], "tools": tools})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input.0.approval_request_id"
    # an approval without the server among the tools cannot run: a 400, not a silent skip
    item = {"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}
    for without in ([], [calc(mcp, server_label="other")]):
        bad = post(server, {"previous_response_id": asked.id, "input": [item], "tools": without})
        assert bad.status_code == 400 and "not among the request's tools" in bad.text


@pytest.mark.parametrize(
    "allowed, names",
    [(["add", "slow"], ["add", "slow"]), ({"read_only": True}, ["add"]),
     ({"tool_names": ["boom"]}, ["boom"])],
)  # fmt: skip
def test_allowed_tools(client, mcp, allowed, names):
    r = client.responses.create(model=MODEL, input="hi", tools=[calc(mcp, allowed_tools=allowed)],
                                tool_choice="none", max_output_tokens=1, store=False, temperature=0)  # fmt: skip
    assert sorted(t.name for t in r.output[0].tools) == names


def test_headers_and_authorization_reach_the_server(client, mcp):
    mcp.clear()
    tools = [calc(mcp, headers={"x-team": "search"}, authorization="tok-1")]
    r = client.responses.create(model=MODEL, input="hi", tools=tools, tool_choice="none",
                            max_output_tokens=1, temperature=0)  # fmt: skip
    assert "tok-1" not in json.dumps(client.responses.retrieve(r.id).model_dump())
    assert mcp.http.seen and all(
        e["headers"].get("x-team") == "search" and e["headers"]["authorization"] == "Bearer tok-1"
        for e in mcp.http.seen
    )
    # credentials are neither echoed nor stored
    assert "tok-1" not in r.model_dump_json() and r.tools[0].headers is None


def test_unreachable_server_is_a_424(server):
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    r = post(server, {"input": "hi", "tools": [{"type": "mcp", "server_label": "calc",
                                                "server_url": dead}]})  # fmt: skip
    assert r.status_code == 424, r.text
    error = r.json()["error"]
    assert error["message"].startswith("Error retrieving tool list from MCP server: 'calc'.")
    assert error["param"] == "tools.0" and error["object"] == "error"


def test_client_gone_during_a_call(client, server, mcp):
    """A stream closed while a call runs: the server drops the response and serves the next."""
    with client.responses.stream(
        model=MODEL, input="Sleep", tools=[calc(mcp)], max_output_tokens=30, store=False,
        tool_choice={"type": "mcp", "server_label": "calc", "name": "slow"}, temperature=0) as stream:  # fmt: skip
        for event in stream:
            if event.type == "response.mcp_call.in_progress":
                break
    r = client.responses.create(
        model=MODEL, input="hi", max_output_tokens=2, store=False, temperature=0
    )
    assert r.status in ("completed", "incomplete")
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_cancel_while_its_sessions_close_leaves_it_as_it_ended(server, mcp):
    """A background response ends (saved completed), then closes its MCP sessions (a DELETE per
    session, up to 5 s); a cancel in that window used to save it `cancelled`."""
    mcp.http.hold_deletes = threading.Event()
    try:
        r = post(server, {"input": QUESTION, "tools": [calc(mcp)], "tool_choice": ADD,
                          "max_tool_calls": 1, "max_output_tokens": 48, "temperature": 0,
                          "background": True})  # fmt: skip
        assert r.status_code == 200, r.text
        rid = r.json()["id"]
        url = f"{server.url}/v1/responses/{rid}"
        deadline = time.monotonic() + 120
        while (ended := httpx.get(url, headers=server.headers).json()["status"]) not in (
            "completed", "incomplete"
        ):  # fmt: skip
            assert ended in ("queued", "in_progress") and time.monotonic() < deadline, ended
            time.sleep(0.05)
        assert "tools/call" in mcp.http.rpcs()
        while mcp.http.seen[-1]["method"] != "DELETE":  # the call's session closing, held
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cancel = httpx.post(url + "/cancel", headers=server.headers, timeout=30)
        assert cancel.status_code == 200 and cancel.json()["status"] == ended, cancel.text
        assert httpx.get(url, headers=server.headers).json()["status"] == ended
    finally:
        mcp.http.hold_deletes.set()
        mcp.http.hold_deletes = None


WEATHER = {"type": "function", "name": "add", "parameters": WEATHER_PARAMETERS}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools.0.server_url"),
        ({"tools": [{"type": "mcp", "server_url": "ftp://h/x"}]}, "tools.0.server_url"),
        ({"tools": [{"type": "mcp", "server_url": "http://h:99999/x"}]}, "tools.0.server_url"),
        ({"tools": [{"type": "mcp", "connector_id": "connector_gmail"}]}, "tools.0.connector_id"),
        ({"tools": ["CALC", "CALC"]}, "tools.1.server_label"),
        ({"tools": ["CALC"], "tool_choice": {"type": "mcp", "server_label": "no"}},
         "tool_choice.server_label"),
        ({"tools": ["CALC"], "tool_choice": {"type": "mcp", "server_label": "calc", "name": "no"}},
         "tool_choice.name"),
        ({"tools": [WEATHER, "CALC"]}, "tools.1.allowed_tools"),  # two tools named add
        ({"tools": [{"type": "mcp", "server_url": "http://h/x", "require_approval": "maybe"}]},
         "tools.0"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        # `*` reaches public hosts only; this server names 127.0.0.1 besides
        ({"tools": [{"type": "mcp", "server_url": "http://10.1.2.3/mcp"}]}, "tools.0.server_url"),
        ({"tools": [{"type": "mcp", "server_url": "http://localhost:1/x"}]}, "tools.0.server_url"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field(server, mcp, body, field):
    body = {"input": "hi", **body}
    body["tools"] = [calc(mcp) if t == "CALC" else t for t in body["tools"]]
    r = post(server, body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"], r.json()
