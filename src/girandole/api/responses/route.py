"""POST /v1/responses (also under /inference/v1), run as chat; GET and DELETE
/v1/responses/{id}, GET /v1/responses (list) and GET /v1/responses/{id}/input_items over the
stored responses of the key's account."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import Response

from girandole.api.chat.route import DEFAULT_MAX_TOKENS
from girandole.api.chat.shape import ChatShape
from girandole.api.http.auth import require_api_key
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.pages import list_page
from girandole.api.http.sse import SSEResponse
from girandole.api.messages.translated import TranslatedChat, TranslatedEndpoint, to_chat
from girandole.api.ops.tracking import principal_of
from girandole.api.responses.background import KEEP_SECONDS, BackgroundResponses
from girandole.api.responses.convert import (
    chat_messages,
    chat_tools,
    check_unique_ids,
    image_fields,
    input_items,
    response_format,
)
from girandole.api.responses.input_tokens import InputTokensRequest, count_input_tokens
from girandole.api.responses.mcp import McpToolbox, call_item
from girandole.api.responses.pairing import check_call_outputs
from girandole.api.responses.schema import FunctionTool, McpTool, ResponsesRequest
from girandole.api.responses.shape import Conversation, ResponsesShape
from girandole.api.serving.job import Job
from girandole.api.serving.pipeline import BackgroundStart, Rounds, inference_router, post_route
from girandole.api.serving.response import ResponseShape
from girandole.api.state import AppState
from girandole.engine.protocol import EngineClient
from girandole.registry.conversations import ConversationStore, Run
from girandole.registry.responses import ResponseStore

MAX_LIST = 100  # items in one page of a list
UNFINISHED = ("queued", "in_progress")  # a background response's statuses while it runs


def _never(value: Any) -> bool:
    return False


# Fields of OpenAI's request this server does not run, accepted only when they ask for nothing.
RESPONSES_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "prompt": _never,
}


def account_of(request: Request) -> str:
    """Whose responses a request sees: its key's account ("" on an open server)."""
    principal = principal_of(request)
    return (principal.account if principal is not None else None) or ""


def store_of(request: Request | FastAPI) -> ResponseStore:
    app_state = request.app.state if isinstance(request, Request) else request.state
    store = getattr(app_state, "response_store", None)
    if store is None:
        store = app_state.response_store = ResponseStore(app_state.girandole.ops.db)
    return store


def conversations_of(request: Request) -> ConversationStore:
    app_state = request.app.state
    store = getattr(app_state, "conversation_store", None)
    if store is None:
        store = app_state.conversation_store = ConversationStore(app_state.girandole.ops.db)
    return store


def background_of(request: Request | FastAPI) -> BackgroundResponses:
    app_state = request.app.state if isinstance(request, Request) else request.state
    runs = getattr(app_state, "background_responses", None)
    if runs is None:
        runs = BackgroundResponses(getattr(app_state, "webhooks", None))
        app_state.background_responses = runs
    return runs


@asynccontextmanager
async def background_responses(app: FastAPI) -> AsyncIterator[None]:
    """The app's lifetime as background responses see it: those a stopped server left
    unfinished are failed at start-up, and those running when it stops are failed then."""
    background_of(app).recover(store_of(app))
    try:
        yield
    finally:
        await background_of(app).shutdown()


def not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", code="NOT_FOUND")


class Responses(TranslatedEndpoint):
    chat_fields = {
        "reasoning_effort": "reasoning.effort",
        "response_format": "text.format",
        # chat's messages are the instructions and the turns merged: no index maps back
        r"messages(\..*)?": "input",
    }
    # chat's tools are the request's function tools, namespaces' functions and MCP servers' tools
    # flattened: Conversation.tool_paths says where each came from
    CHAT_TOOL = re.compile(r"tools\.(\d+)\.function(\..*)?")

    def rename_field(self, exc: APIError, req: TranslatedChat) -> None:
        match = self.CHAT_TOOL.fullmatch(exc.param or "")
        paths = req.source.tool_paths if isinstance(req.source, Conversation) else []
        if match is None or int(match[1]) >= len(paths):
            super().rename_field(exc, req)
            return
        path = paths[int(match[1])]
        mcp = isinstance(req.source.request.tools[int(path.split(".")[1])], McpTool)
        # an MCP tool's fields are its server's, not the request's: the server is named
        self.renamed(exc, path if mcp else path + (match[2] or ""))

    async def translate(
        self,
        request: Request,
        state: AppState,
        source: ResponsesRequest,
        run_approved: bool = True,
    ) -> TranslatedChat:
        """The chat request of `source`; `run_approved`: run the MCP calls the client approved
        (False when only counting its tokens)."""
        account, store = account_of(request), store_of(request)
        if source.background and source.store is False:
            raise bad_request(
                "background can only be used when 'store' is true: a background response is"
                " read back by its id, field: 'background'",
                "background",
            )
        items: list[dict[str, Any]] = []
        # of the items: the previous response's input, or the conversation's items (stored
        # once, with it or in the conversation)
        inherited = 0
        conversation_id = conversation_ref(request, source)
        snapshot = None
        if conversation_id is not None:  # its items, then the input
            snapshot = store.snapshot(conversation_id)
            items, inherited = list(snapshot.items), len(snapshot.items)
        if source.previous_response_id is not None:
            previous = store.get(account, source.previous_response_id)
            if previous is None:
                raise bad_request(
                    f"Previous response with id '{source.previous_response_id}' not found,"
                    " field: 'previous_response_id'",
                    "previous_response_id",
                )
            if previous.body["status"] in UNFINISHED:
                raise bad_request(
                    f"Previous response with id '{source.previous_response_id}' is still"
                    f" {previous.body['status']}: continue from it once it has ended,"
                    " field: 'previous_response_id'",
                    "previous_response_id",
                )
            inherited = len(previous.input_items)
            items = previous.input_items + previous.body["output"]
        new_items = input_items(source)
        if conversation_id is not None:  # they join it: their ids must be new there
            check_unique_ids(new_items, [item["id"] for item in items], "input")
        items += new_items
        check_call_outputs(items)
        toolbox = McpToolbox.of(source, state.settings)
        prelude: list[dict[str, Any]] = []
        if toolbox is not None:
            functions = [t for t in source.tools or [] if isinstance(t, FunctionTool)]
            prelude = await toolbox.list_tools(items, functions)
        try:
            if run_approved:
                prelude += await approved_calls(toolbox, items, new_items)
        finally:
            if toolbox is not None:
                await toolbox.close()
        messages = chat_messages(source.instructions, items + prelude)
        if not messages:
            raise bad_request("The conversation is empty: send 'input'", "input")
        stored = conversation_id is not None or source.previous_response_id is not None
        if stored and run_approved and source.truncation != "auto":
            # the stored turns were never in the body check_prompt_size read: a conversation
            # built up to 56 MB was tokenized whole (7 million tokens: 95 s of CPU and 2 s of
            # the event loop) before the prompt was found too long for the context
            target = getattr(request.state, "target", None)  # as `receive` resolved it
            context_length = target.context_length if target is not None else None
            state.ops.check_prompt_size({"input": messages}, context_length)
        tools, tool_choice, tool_paths = chat_tools(source, toolbox)
        parallel = source.parallel_tool_calls
        if source.max_tool_calls == 1:  # one call: decoded as one (a forced call's grammar too)
            parallel = False
        effort = source.reasoning.effort if source.reasoning is not None else None
        logprobs = wants_logprobs(source)
        fields = {
            "model": source.model,
            "messages": messages,
            "max_tokens": source.max_output_tokens,
            "temperature": source.temperature,
            "top_p": source.top_p,
            "stream": source.stream,
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel,
            "reasoning_effort": "low" if effort == "minimal" else effort,
            "logprobs": logprobs or None,
            "top_logprobs": source.top_logprobs if logprobs else None,
            "response_format": response_format(source),
            "user": source.user or source.safety_identifier,
            "prompt_cache_key": source.prompt_cache_key,
            "service_tier": source.service_tier,
            # the images of earlier turns are sent again with them (stored as sent)
            "image_fields": image_fields(
                items, inherited, "conversation" if conversation_id else "previous_response_id"
            ),
        }

        keep = source.store is not False

        def save(body: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
            if conversation_id is None:  # saved only when kept
                store.put(account, body, conversation, source.previous_response_id, inherited,
                          snapshot)  # fmt: skip
                return

            def put(run: Run) -> None:  # no previous response beside a conversation
                store.put_in(run, account, body, conversation, None, inherited, snapshot)

            # the turn joins the conversation once it ends
            conversations = conversations_of(request)
            # checked again as they are written (no await between): a request on the
            # conversation that ran meanwhile with the same input id added it first (two
            # items of one id); the loser is a 400, stored nowhere
            check_unique_ids(new_items, conversations.item_ids(conversation_id), "input")
            # the items and the stored response in one transaction: one never without the other
            conversations.add_items(
                conversation_id, new_items + body["output"], put if keep else None
            )

        saves = keep or conversation_id is not None
        conversation = Conversation(source, items, save if saves else None, toolbox=toolbox,
                                    prelude=prelude, chat_fields=fields,
                                    conversation_id=conversation_id,
                                    tool_paths=tool_paths,
                                    previous_id=source.previous_response_id,
                                    inherited=inherited, snapshot=snapshot)  # fmt: skip
        return to_chat(fields, conversation)

    async def prompts(
        self, engine: EngineClient, req: TranslatedChat, shape: ChatShape
    ) -> list[list[int]]:
        if req.source.request.truncation == "auto":
            req.prompt_truncate_len = truncation_limit(
                AppState.context_length_of(engine), req.source.request.max_output_tokens
            )
        try:
            return await super().prompts(engine, req, shape)
        except APIError as exc:
            if exc.param != "prompt_truncate_len":
                raise  # already named as Responses names it (TranslatedEndpoint.prompts)
            raise bad_request(
                "The input does not fit in the context window even with truncation 'auto': room"
                f" for {req.prompt_truncate_len} input tokens, and its last turn alone takes more",
                "input",
            ) from None

    def wire_shape(self, chat: ChatShape, req: TranslatedChat) -> ResponsesShape:
        return ResponsesShape(chat, req.source)

    def background(self, req: TranslatedChat) -> BackgroundStart | None:
        return self.start_background if req.source.request.background else None

    async def start_background(
        self, request: Request, rounds: Rounds, shape: ResponseShape, job: Job
    ) -> Response:
        assert isinstance(shape, ResponsesShape)
        runs, store = background_of(request), store_of(request)
        return runs.start(request, rounds, shape, job, store, account_of(request))


async def approved_calls(
    toolbox: McpToolbox | None, items: list[dict[str, Any]], new_items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The calls the client approved in this request (`mcp_approval_response` items answering
    the conversation's `mcp_approval_request` items), run: their `mcp_call` items. A denied
    call is not run, and the model does not see it."""
    requests = {i["id"]: i for i in items if i.get("type") == "mcp_approval_request"}
    ran = {i.get("approval_request_id") for i in items if i.get("type") == "mcp_call"}
    calls = []
    for k, answer in enumerate(new_items):
        if answer.get("type") != "mcp_approval_response":
            continue
        where = f"input.{k}.approval_request_id"
        asked = requests.get(answer["approval_request_id"])
        if asked is None:
            raise bad_request(
                f"No MCP approval request with id '{answer['approval_request_id']}' in the"
                f" conversation, field: '{where}'",
                where,
            )
        if not answer["approve"] or asked["id"] in ran:
            continue
        server = toolbox.server_labelled(asked["server_label"]) if toolbox is not None else None
        if toolbox is None or server is None:
            raise bad_request(
                f"The approved call is to the MCP server '{asked['server_label']}', which is not"
                f" among the request's tools, field: '{where}'",
                where,
            )
        item = call_item(server, asked["name"], asked["arguments"])
        item["approval_request_id"] = asked["id"]
        await toolbox.run(item)
        calls.append(item)
        ran.add(asked["id"])
    return calls


LOGPROBS = "message.output_text.logprobs"
# what `include` may name: logprobs, and reasoning's encrypted content (null: nothing is
# encrypted here, the reasoning text is in the item)
INCLUDABLE = (LOGPROBS, "reasoning.encrypted_content")


def conversation_ref(request: Request, source: ResponsesRequest) -> str | None:
    """The conversation a request runs on (`conversation`: its id, or `{"id"}`): the key's
    account's (400 otherwise), never beside `previous_response_id` (OpenAI's rule)."""
    ref = source.conversation
    if ref is None:
        return None
    conversation_id = ref if isinstance(ref, str) else ref.id
    if source.previous_response_id is not None:
        raise bad_request(
            "Mutually exclusive parameters: 'previous_response_id' and 'conversation'; send"
            " one of them, field: 'conversation'",
            "conversation",
        )
    if conversations_of(request).get(account_of(request), conversation_id) is None:
        raise bad_request(
            f"Conversation with id '{conversation_id}' not found, field: 'conversation'",
            "conversation",
        )
    return conversation_id


def check_includable(include: list[str]) -> None:
    """A 400 for an `include` value naming what this server never makes."""
    for i, value in enumerate(include):
        if value not in INCLUDABLE:
            raise bad_request(
                f"include value '{value}' is not supported: this server can include only"
                f" {', '.join(repr(v) for v in INCLUDABLE)}, field: 'include.{i}'",
                f"include.{i}",
            )


def checked_include(
    include: Annotated[list[str] | None, Query()] = None,
    include_brackets: Annotated[
        list[str] | None, Query(alias="include[]", include_in_schema=False)
    ] = None,
) -> list[str]:
    """The query's `include`, as `include=a&include=b` or as OpenAI's SDK writes a list,
    `include[]=a`, checked. The stored items and responses already hold what this server makes
    (output text logprobs, when the response asked for them; reasoning is never encrypted)."""
    values = (include or []) + (include_brackets or [])
    check_includable(values)
    return values


# a GET's `include`, checked before what it names is looked up, as a query parameter is
INCLUDE = [Depends(checked_include)]


def wants_logprobs(req: ResponsesRequest) -> bool:
    """Logprobs on the output text: `include` names them, or `top_logprobs` asks for
    alternatives. Other `include` values name what this server does not make (a 400)."""
    check_includable(req.include or [])
    return LOGPROBS in (req.include or []) or bool(req.top_logprobs)


def truncation_limit(context_length: int, max_output_tokens: int | None) -> int:
    """`truncation: "auto"`: the input's room in the context window. It leaves room for the
    output asked for (max_output_tokens, else the default), but never more than half the
    window: a conversation is cut by its oldest turns rather than refused."""
    wanted = max_output_tokens or DEFAULT_MAX_TOKENS
    return context_length - min(wanted, context_length // 2)


ENDPOINT = Responses(ResponsesRequest, RESPONSES_UNSUPPORTED, "resp_", DEFAULT_MAX_TOKENS)
router = inference_router(
    ENDPOINT, "/responses", "create_response", "Create a response (OpenAI's Responses API)"
)


async def count_handler(request: Request) -> Response:
    return await count_input_tokens(request, ENDPOINT)


input_tokens = post_route(
    count_handler,
    InputTokensRequest,
    "/responses/input_tokens",
    "count_response_input_tokens",
    "Count a Responses request's input tokens",
)
stored = APIRouter(dependencies=[Depends(require_api_key)])

Limit = Annotated[int, Query(ge=1, le=MAX_LIST)]


@stored.get(
    "/responses/{response_id}",
    name="get_response",
    summary="Get a stored response",
    dependencies=INCLUDE,
)
async def get_response(
    request: Request,
    response_id: str,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=0)] = None,
) -> Any:
    account = account_of(request)
    found = store_of(request).body(account, response_id)  # its conversation is not needed
    if found is None:
        raise not_found(response_id)
    if not stream:
        return found
    # a background response's events again, after `starting_after` (background.py)
    if not found.get("background"):
        raise bad_request(
            "Only a background response can be streamed from its id: this one was answered"
            " in its own request, field: 'stream'",
            "stream",
        )
    run = background_of(request).get(response_id, account)
    if run is None:
        raise bad_request(
            f"The events of response '{response_id}' are no longer kept (they are for"
            f" {KEEP_SECONDS / 60:.0f} minutes after it ends, while this server runs): GET"
            " it without stream, field: 'stream'",
            "stream",
        )
    after = -1 if starting_after is None else starting_after
    return SSEResponse(run.log.follow(after))


@stored.post(
    "/responses/{response_id}/cancel",
    name="cancel_response",
    summary="Cancel a background response",
)
async def cancel_response(request: Request, response_id: str) -> Any:
    account, store = account_of(request), store_of(request)
    found = store.body(account, response_id)
    if found is None:
        raise not_found(response_id)
    if not found.get("background"):
        raise bad_request(
            "Cannot cancel a synchronous response: only a response created with"
            " background=true can be cancelled, field: 'response_id'",
            "response_id",
        )
    run = background_of(request).get(response_id, account)
    if run is not None:
        await background_of(request).cancel(run)
    ended = store.body(account, response_id)  # an ended one as it is: cancelling is idempotent
    if ended is None:
        raise not_found(response_id)
    return ended


@stored.delete(
    "/responses/{response_id}", name="delete_response", summary="Delete a stored response"
)
async def delete_response(request: Request, response_id: str) -> Any:
    account = account_of(request)
    run = background_of(request).get(response_id, account)
    if run is not None:  # a background response still running stops first
        await background_of(request).cancel(run)
    if not store_of(request).delete(account, response_id):
        raise not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True,
            "message": f"Response {response_id} deleted"}  # fmt: skip


@stored.get("/responses", name="list_responses", summary="List stored responses, newest first")
async def list_responses(
    request: Request, limit: Limit = 20, after: str | None = None, before: str | None = None
) -> Any:
    store, account = store_of(request), account_of(request)
    for cursor, param in ((after, "after"), (before, "before")):
        if cursor is not None and store.body(account, cursor) is None:  # as the other lists
            raise bad_request(f"No item with id '{cursor}', field: '{param}'", param)
    page = store.list(account, limit, after, before)
    return list_page(page.items, limit) | {"has_more": page.has_more}


@stored.get(
    "/responses/{response_id}/input_items",
    name="list_input_items",
    summary="The input items of a stored response (its whole conversation)",
    dependencies=INCLUDE,
)
async def list_input_items(
    request: Request,
    response_id: str,
    limit: Limit = 20,
    after: str | None = None,
    before: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> Any:
    found = store_of(request).get(account_of(request), response_id)
    if found is None:
        raise not_found(response_id)
    items = found.input_items if order == "asc" else found.input_items[::-1]
    return list_page(items, limit, after, before)
