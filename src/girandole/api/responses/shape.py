"""How a Responses response is written: the `response` object whole, or OpenAI's `response.*`
event stream (the contract: `girandole.api.responses`). A stored response is saved when it
ends.

With MCP tools (`mcp.py`) a response is a loop of engine rounds: a round whose output calls MCP
tools has those calls run by this server, their `mcp_call` items (with output) join the output,
and the model is run again on the conversation so far, until it answers without such calls or
its round also calls a client function or asks for an approval (the client's turn). Later rounds take `tool_choice: "auto"`, or
`"none"` once `max_tool_calls` calls were made or at the last of `MAX_ROUNDS`;
`max_output_tokens` bounds the output tokens of all rounds together, and usage sums them."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from girandole.api.chat.reasoning import reasoning_tokens
from girandole.api.chat.shape import ChatShape
from girandole.api.http.sse import sse_named_event
from girandole.api.messages.blocks import Block, OutputBlocks
from girandole.api.messages.translated import TranslatedShape, to_chat
from girandole.api.responses.convert import chat_messages, namespaces, new_id
from girandole.api.responses.mcp import approval_item, call_item
from girandole.api.responses.schema import McpTool, ResponsesRequest
from girandole.api.serving.choice import Choice
from girandole.api.serving.fanout import ChoiceFanout
from girandole.api.serving.job import Job
from girandole.api.serving.logprobs import content_format
from girandole.api.serving.response import engine_error, finish_metrics, read_all
from girandole.api.serving.response_size import (
    RESPONSES_ADVICE,
    RESPONSES_MCP_ADVICE,
    RESPONSES_WHOLE,
    ResponseSize,
)
from girandole.api.serving.usage import Usage, sum_usage
from girandole.registry.conversation_refs import ConversationSnapshot

if TYPE_CHECKING:
    from girandole.api.responses.mcp import McpToolbox

Event = tuple[str, dict[str, Any]]  # a stream event: its type, and its fields
MAX_ROUNDS = 16  # engine rounds of one response's MCP tool loop (the last one calls no tool)


@dataclass
class Conversation:
    """What a Responses request runs: its request, the input items of the whole conversation
    (earlier turns first), and where it is saved (None: `store: false`)."""

    request: ResponsesRequest
    items: list[dict[str, Any]]
    save: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None
    item_ids: dict[int, str] = field(default_factory=dict)  # output index -> output item id
    toolbox: McpToolbox | None = None  # its MCP servers
    prelude: list[dict[str, Any]] = field(default_factory=list)  # output before the 1st round
    chat_fields: dict[str, Any] = field(default_factory=dict)  # later rounds' chat request
    conversation_id: str | None = None  # the Conversations API's conversation it runs on
    tool_paths: list[str] = field(default_factory=list)  # chat tool i -> its request field
    # `previous_response_id`, and how many of `items` are its input (its whole conversation)
    # or the conversation's (`snapshot`): the store keeps only the others (registry/responses.py)
    previous_id: str | None = None
    inherited: int = 0
    snapshot: ConversationSnapshot | None = None  # of the conversation's items it read


ITEM_PREFIXES = {"thinking": "rs", "text": "msg", "call": "fc"}  # output item ids by block


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's Responses usage, with Fireworks' names for the same counts."""
    total = usage.prompt_tokens + usage.completion_tokens
    return {
        "input_tokens": usage.prompt_tokens,
        # cache_write_tokens: OpenAI's SDK requires it; nothing here is a billed cache write
        # (the prefix cache fills itself, at no cost), so none is counted
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens or 0},
        "total_tokens": total,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }


def echo_tool(tool: Any) -> dict[str, Any]:
    """A request's tool as the response echoes (and stores) it: an MCP server's `headers` and
    `authorization` left out, as they may hold credentials."""
    secret = {"headers", "authorization"} if isinstance(tool, McpTool) else set()
    return tool.model_dump(exclude_none=True, exclude=secret)


class ResponsesShape(TranslatedShape):
    def __init__(self, chat: ChatShape, conversation: Conversation) -> None:
        super().__init__(chat)
        self.conversation = conversation
        self.toolbox = conversation.toolbox
        self.output: list[dict[str, Any]] = list(conversation.prelude)  # items of past rounds
        self._base = len(self.output)  # output index of this round's first block
        # output index -> a call's MCP item (None: a client function's call)
        self._mcp: dict[int, dict[str, Any] | None] = {}
        self._usages: list[Usage] = []  # of the rounds so far
        self._calls_made = 0  # tool calls in the output so far (max_tool_calls)
        self._cut = False  # max_output_tokens reached: the response is incomplete
        self._client_turn = False  # the last round called a function or asked for approval
        self._output: tuple[Choice, OutputBlocks] | None = None  # this round's choice
        self._namespaces = namespaces(conversation.request)  # function name -> its namespace
        # `include: ["reasoning.encrypted_content"]` (the Codex CLI asks, with store false):
        # reasoning items carry the field, null: their text is in the clear here, in `content`
        self._encrypted = "reasoning.encrypted_content" in (conversation.request.include or [])
        self._in_round = False  # a round started and not ended (its blocks not in `output`)
        self._logprobs_sent = 0  # a stream's text deltas: tokens whose logprobs went out
        self._text_from: int | None = None  # the text's first token, once </think> is written

    # -- logprobs (`include: ["message.output_text.logprobs"]`, `top_logprobs`) ----------------

    def _text_entries(self, start: int = 0) -> list[dict[str, Any]]:
        """OpenAI's logprobs of the text part: the tokens after the reasoning (all of them for
        a model that does not think), from the `start`th token on; [] unless asked for."""
        if self._output is None:
            return []
        choice, blocks = self._output
        if choice.options.logprobs_mode is None:
            return []
        entries = choice.tracker.entries[max(self._text_start(choice, blocks), start) :]
        keep = ("token", "logprob", "bytes")
        return [
            {k: e[k] for k in keep}
            | {"top_logprobs": [{k: t[k] for k in keep} for t in e["top_logprobs"]]}
            for e in content_format(choice.tokenizer, entries)["content"]
        ]

    def _text_start(self, choice: Choice, blocks: OutputBlocks) -> int:
        """The text's first token: the one after the reasoning's. Fixed once `</think>` is
        written, so counted once then, not again with every delta."""
        if self._text_from is not None or blocks.splitter is None:
            return self._text_from or 0
        first = reasoning_tokens(
            blocks.splitter, choice.token_ids, choice.tokenizer, self.think_end_id
        )
        if blocks.splitter.ended:
            self._text_from = first
        return first

    def _delta_logprobs(self) -> list[dict[str, Any]]:
        """A text delta's logprobs: those of the text's tokens not sent with an earlier one."""
        start = self._logprobs_sent
        if self._output is not None:
            self._logprobs_sent = len(self._output[0].tracker.entries)
        return self._text_entries(start)

    # -- the objects -------------------------------------------------------------------------

    def index(self, block: Block) -> int:
        """A block's output index (after the items of earlier rounds)."""
        return self._base + block.index

    def mcp_item(self, block: Block) -> dict[str, Any] | None:
        """A call block's MCP item (`mcp_call`, or `mcp_approval_request` for a tool that needs
        approval), made when the call starts; None for a client function's call."""
        if block.type != "call" or self.toolbox is None:
            return None
        index = self.index(block)
        if index not in self._mcp:  # once per call, not per streamed delta
            server = self.toolbox.server_of(block.name)
            make = (
                approval_item if server and server.needs_approval(block.name or "") else call_item
            )
            self._mcp[index] = make(server, block.name or "", "") if server else None
        return self._mcp[index]

    def item_id(self, block: Block) -> str:
        mcp = self.mcp_item(block)
        if mcp is not None:
            return mcp["id"]
        ids = self.conversation.item_ids
        index = self.index(block)
        if index not in ids:
            ids[index] = new_id(ITEM_PREFIXES[block.type])
        return ids[index]

    def item(self, block: Block, status: str) -> dict[str, Any]:
        """A block as an output item (`in_progress` ones as `output_item.added` shows them)."""
        done = status != "in_progress"
        if block.type == "thinking":  # the reasoning itself, as open-weight models give it
            content = [self.reasoning_part(block.text)] if done else []
            item = {"id": self.item_id(block), "type": "reasoning", "status": status,
                    "summary": [], "content": content}  # fmt: skip
            if self._encrypted:
                item["encrypted_content"] = None
            return item
        if block.type == "text":
            content = [self.part(block.text, self._text_entries())] if done else []
            return {"id": self.item_id(block), "type": "message", "status": status,
                    "role": "assistant", "content": content}  # fmt: skip
        mcp = self.mcp_item(block)
        if mcp is not None:
            arguments = block.text if done else ""
            mcp["arguments"] = arguments
            if mcp["type"] == "mcp_call":
                mcp["mcp"]["arguments"] = arguments
                if mcp["status"] not in ("completed", "failed"):  # not run (yet)
                    mcp["status"] = status
            return dict(mcp)
        item = {"id": self.item_id(block), "type": "function_call", "status": status,
                "call_id": block.call_id, "name": block.name,
                "arguments": block.text if done else ""}  # fmt: skip
        if block.name in self._namespaces:
            item["namespace"] = self._namespaces[block.name]
        return item

    @staticmethod
    def item_status(block: Block, blocks: OutputBlocks) -> str:
        """A closed item's status: `incomplete` for the one max_output_tokens cut (the last of an
        output that reached it), `completed` for those before it, streamed or whole."""
        cut = blocks.finish_reason == "length" and block is blocks.blocks[-1]
        return "incomplete" if cut else "completed"

    @staticmethod
    def part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    @staticmethod
    def reasoning_part(text: str) -> dict[str, Any]:
        return {"type": "reasoning_text", "text": text}

    def response(
        self, job: Job, status: str, output: list[dict[str, Any]], usage: Usage | None
    ) -> dict[str, Any]:
        req = self.conversation.request
        params = job.choices[0].params
        fmt = req.text.format if req.text is not None else None
        text_format = fmt.model_dump(exclude_none=True, by_alias=True) if fmt else {"type": "text"}
        tool_choice = req.tool_choice or "auto"
        if not isinstance(tool_choice, str):
            tool_choice = tool_choice.model_dump(exclude_none=True)
        incomplete = status == "incomplete"
        effort = req.reasoning.effort if req.reasoning is not None else None
        summary = req.reasoning.summary if req.reasoning is not None else None
        return {
            "id": job.id,
            "object": "response",
            "created_at": job.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": job.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "conversation": {"id": cid} if (cid := self.conversation.conversation_id) else None,
            "background": bool(req.background),
            "service_tier": "priority" if req.service_tier == "priority" else "default",
            "reasoning": {"effort": effort, "summary": summary},
            "store": req.store is not False,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_logprobs": req.top_logprobs,
            # verbosity: the only one accepted (a model without the knob writes as it does)
            "text": {"format": text_format, "verbosity": "medium"},
            "tool_choice": tool_choice,
            "tools": [echo_tool(t) for t in req.tools or []],
            "truncation": req.truncation or "disabled",
            "max_tool_calls": req.max_tool_calls,
            "usage": usage_json(usage) if usage is not None else None,
            "user": req.user,
            "safety_identifier": req.safety_identifier,
            "prompt_cache_key": req.prompt_cache_key,
            "prompt_cache_retention": req.prompt_cache_retention,
            "metadata": req.metadata or {},
        }

    def finish(self, job: Job) -> dict[str, Any]:
        """The finished response object (`job`: its first round's), saved if stored."""
        status = "incomplete" if self._cut else "completed"
        body = self.response(job, status, self.output, sum_usage(self._usages))
        if self.conversation.save is not None:
            self.conversation.save(body, self.conversation.items)
        return body

    def output_so_far(self) -> list[dict[str, Any]]:
        """The output of a response stopped on its way (a background one cancelled or failed):
        the items of the rounds that ended, then what the round under way wrote, `incomplete`."""
        items = [dict(item) for item in self.output]
        if self._in_round and self._output is not None:
            items += [self.item(block, "incomplete") for block in self._output[1].blocks]
        return items

    # -- the rounds --------------------------------------------------------------------------

    def start_round(self, job: Job) -> tuple[Choice, OutputBlocks]:
        (choice,) = job.choices
        left = self.conversation.request.max_tool_calls
        if left is not None:
            left = max(left - self._calls_made, 0) or None  # 0: the round offers no tools
        blocks = self.output_blocks(left)
        self._output, self._in_round = (choice, blocks), True
        self._logprobs_sent, self._text_from = 0, None
        return choice, blocks

    def end_round(self, job: Job, blocks: OutputBlocks) -> list[dict[str, Any]]:
        """Close a finished round: its items join the output; the MCP calls to run now (none
        when it was cut short: they stay `incomplete`)."""
        self._usages.append(finish_metrics(job))
        self._cut, self._in_round = blocks.finish_reason == "length", False
        runs, calls = [], 0
        for block in blocks.blocks:
            item = self.item(block, self.item_status(block, blocks))
            mcp = self.mcp_item(block)
            if mcp is not None and mcp["type"] == "mcp_call":
                item = mcp  # the live item: its output is written when it runs
                runs.append(mcp)
            calls += block.type == "call"
            self.output.append(item)
        self._calls_made += calls
        self._base, self._mcp = len(self.output), {}
        self._client_turn = len(runs) < calls  # a function call, or an approval request
        for item in runs:
            item["status"] = "incomplete" if self._cut else "in_progress"
        return [] if self._cut else runs

    async def next_round(self, ran: list[dict[str, Any]]) -> tuple[Job, ChoiceFanout] | None:
        """The model run again on the conversation with the tool results; None when the
        response ends here: no MCP call ran, or the round also called a client function or
        asked for an approval (the client's turn: the MCP calls beside them ran)."""
        req = self.conversation.request
        if not ran or self._client_turn or self.rounds is None:
            return None
        used = sum(u.completion_tokens for u in self._usages)
        budget = None
        if req.max_output_tokens is not None:
            budget = req.max_output_tokens - used
            if budget <= 0:
                self._cut = True
                return None
        last = len(self._usages) >= MAX_ROUNDS - 1
        spent = req.max_tool_calls is not None and self._calls_made >= req.max_tool_calls
        fields = self.conversation.chat_fields | {
            "messages": chat_messages(req.instructions, self.conversation.items + self.output),
            "tool_choice": "none" if last or spent else "auto",
            "max_tokens": budget,
        }
        if fields.get("tools") is None:
            fields.pop("tool_choice")
        shape, job, fanout = await self.rounds.next(to_chat(fields, self.conversation))
        assert isinstance(shape, TranslatedShape)
        self.take_chat(shape)
        return job, fanout

    async def run_call(self, item: dict[str, Any], size: ResponseSize) -> None:
        """Run an MCP call; its result joins the response held whole, counted in `size` (its
        arguments are the model's text, counted as it was read)."""
        assert self.toolbox is not None  # only MCP tools' calls run here
        await self.toolbox.run(item)
        size.grow(json_bytes([item["output"], item["error"]]), RESPONSES_MCP_ADVICE)

    def count_prelude(self, size: ResponseSize) -> None:
        """The output made before the first round (tool lists, calls the client approved) is
        held with the rest: counted whole, as no engine output counted any of it."""
        size.grow(json_bytes(self.conversation.prelude), RESPONSES_MCP_ADVICE)

    async def close_tools(self) -> None:
        if self.toolbox is not None:
            await self.toolbox.close()

    # -- the loops ---------------------------------------------------------------------------

    @staticmethod
    def response_size(job: Job) -> ResponseSize:
        """The bound of the whole response, all its rounds together: streamed or not, it is
        held whole for `response.completed` (and saved so when stored or in the background)."""
        return ResponseSize(job.max_response_bytes, RESPONSES_WHOLE, RESPONSES_ADVICE)

    async def collect_body(self, job: Job, fanout: ChoiceFanout) -> dict[str, Any]:
        first, size = job, self.response_size(job)
        try:
            self.count_prelude(size)
            while True:
                await read_all(fanout, size)
                choice, blocks = self.start_round(job)
                self.feed(blocks, choice, choice.full_text, True)
                runs = self.end_round(job, blocks)
                for item in runs:  # one after another: one session per server, calls in order
                    await self.run_call(item, size)
                following = await self.next_round(runs)
                if following is None:
                    return self.finish(first)
                job, fanout = following
        finally:
            fanout.close()
            await self.close_tools()

    def stream_body(
        self, job: Job, fanout: ChoiceFanout, usage_placement: str
    ) -> AsyncIterator[bytes]:
        return encode(self.stream_events(job, fanout))

    async def stream_events(self, job: Job, fanout: ChoiceFanout) -> AsyncIterator[Event]:
        """A streamed response's events: it opens (`response.created`, `in_progress`), runs
        (`events`), and ends with `response.completed`, or an `error` event when it fails
        after the stream began (its status line is gone)."""
        try:
            started = self.response(job, "in_progress", [], None)
            yield "response.created", {"response": started}
            yield "response.in_progress", {"response": started}
            async for event in self.events(job, fanout):
                yield event
        except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
            error = engine_error(exc)
            yield "error", {"code": error.code, "message": error.message, "param": error.param}
        finally:  # a client gone before `events` began: its first round still runs
            fanout.close()
            await self.close_tools()

    async def events(self, job: Job, fanout: ChoiceFanout) -> AsyncIterator[Event]:
        """The events of a response's output, from its first item to `response.completed`
        (whatever its status: the SDK's stream helper waits for that event)."""
        first, size = job, self.response_size(job)
        try:
            self.count_prelude(size)
            for index, item in enumerate(self.conversation.prelude):
                for event in prelude_events(index, item):
                    yield event
            while True:
                choice, blocks = self.start_round(job)
                async for c, out in fanout.events():
                    update = size.read(c, out)
                    for what, block, text in self.feed(blocks, c, update.text, out.finished):
                        for event in self.block_events(what, block, text, blocks):
                            yield event
                fanout.close()
                base = self._base
                runs = self.end_round(job, blocks)
                for index, item in enumerate(self.output[base:], base):
                    if item["type"] != "mcp_call":
                        continue
                    where = {"item_id": item["id"], "output_index": index}
                    if any(item is run for run in runs):
                        yield "response.mcp_call.in_progress", where
                        await self.run_call(item, size)
                        ended = "completed" if item["status"] == "completed" else "failed"
                        yield f"response.mcp_call.{ended}", where
                    yield "response.output_item.done", {"output_index": index, "item": dict(item)}
                following = await self.next_round(runs)
                if following is None:
                    break
                job, fanout = following
            yield "response.completed", {"response": self.finish(first)}
        finally:
            fanout.close()
            await self.close_tools()

    def block_events(
        self, what: str, block: Block, text: str, blocks: OutputBlocks
    ) -> list[tuple[str, dict[str, Any]]]:
        """The `response.*` events of one block event (`blocks`: the output so far)."""
        index = self.index(block)
        where = {"item_id": self.item_id(block), "output_index": index}
        done = self.item(block, self.item_status(block, blocks)) if what == "stop" else None
        if block.type in ("thinking", "text"):  # an item of one content part
            at = where | {"content_index": 0}
            # reasoning: `reasoning_text` parts and events; text: `output_text` ones (logprobs)
            thinking = block.type == "thinking"
            kind = "reasoning_text" if thinking else "output_text"
            if what == "start":
                part = self.reasoning_part("") if thinking else self.part("")
                return [
                    ("response.output_item.added",
                     {"output_index": index, "item": self.item(block, "in_progress")}),
                    ("response.content_part.added", at | {"part": part}),
                ]  # fmt: skip
            if what == "delta":
                lp = {} if thinking else {"logprobs": self._delta_logprobs()}
                return [(f"response.{kind}.delta", at | {"delta": text} | lp)]
            assert done is not None
            part = done["content"][0]
            lp = {} if thinking else {"logprobs": part["logprobs"]}
            # the logprobs of tokens no delta carried (the end-of-turn token's: no text), in
            # an empty delta, so that the deltas' pieces make the whole as chat's chunks do
            rest = [] if thinking else self._delta_logprobs()
            tail = (
                [(f"response.{kind}.delta", at | {"delta": "", "logprobs": rest})] if rest else []
            )
            return [
                *tail,
                (f"response.{kind}.done", at | {"text": block.text} | lp),
                ("response.content_part.done", at | {"part": part}),
                ("response.output_item.done", {"output_index": index, "item": done}),
            ]  # fmt: skip
        if what == "start":
            item = self.item(block, "in_progress")
            return [("response.output_item.added", {"output_index": index, "item": item})]
        kind = done["type"] if done is not None else self.item(block, "in_progress")["type"]
        if kind == "mcp_approval_request":  # no argument events; done when written
            return (
                [("response.output_item.done", {"output_index": index, "item": done})]
                if done
                else []
            )
        # a function call's arguments, or an MCP call's (whose item is done once it has run)
        prefix = (
            "response.mcp_call_arguments"
            if kind == "mcp_call"
            else "response.function_call_arguments"
        )
        if what == "delta":
            return [(f"{prefix}.delta", where | {"delta": text})]
        assert done is not None
        if kind == "mcp_call":
            return [(f"{prefix}.done", where | {"arguments": block.text})]
        return [
            (f"{prefix}.done", where | {"name": block.name, "arguments": block.text}),
            ("response.output_item.done", {"output_index": index, "item": done}),
        ]  # fmt: skip


def prelude_events(index: int, item: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The events of an item made before the first round: a server's tool list, or a call the
    client approved (run already)."""
    where = {"item_id": item["id"], "output_index": index}
    added = {"output_index": index}
    done = ("response.output_item.done", {"output_index": index, "item": item})
    if item["type"] == "mcp_list_tools":
        return [
            ("response.output_item.added", added | {"item": item | {"tools": []}}),
            ("response.mcp_list_tools.in_progress", where),
            ("response.mcp_list_tools.completed", where),
            done,
        ]
    ended = "completed" if item["status"] == "completed" else "failed"
    pending = item | {"status": "in_progress", "output": None, "error": None}
    return [
        ("response.output_item.added", added | {"item": pending}),
        ("response.mcp_call_arguments.done", where | {"arguments": item["arguments"]}),
        ("response.mcp_call.in_progress", where),
        (f"response.mcp_call.{ended}", where),
        done,
    ]


def json_bytes(value: Any) -> int:
    """About how many bytes `value` takes in the response's JSON (characters, as a choice's
    text is counted)."""
    return len(json.dumps(value, ensure_ascii=False))


async def encode(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """Events as SSE, each with `type` and its `sequence_number` (from 0)."""
    sequence = 0
    async for name, fields in events:
        yield sse_event_of(name, sequence, fields)
        sequence += 1


def sse_event_of(name: str, sequence: int, fields: dict[str, Any]) -> bytes:
    return sse_named_event(name, {"type": name, "sequence_number": sequence, **fields})
