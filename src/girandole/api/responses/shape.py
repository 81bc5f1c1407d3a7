"""How a Responses response is written: the `response` object whole, or OpenAI's `response.*`
event stream (the contract: `girandole.api.responses`). A stored response is saved when it
ends."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from girandole.api.chat.reasoning import reasoning_tokens
from girandole.api.chat.shape import ChatShape
from girandole.api.http.sse import sse_named_event
from girandole.api.messages.blocks import Block, OutputBlocks
from girandole.api.messages.translated import TranslatedShape
from girandole.api.responses.convert import new_id
from girandole.api.responses.schema import ResponsesRequest
from girandole.api.serving.choice import Choice
from girandole.api.serving.fanout import ChoiceFanout
from girandole.api.serving.job import Job
from girandole.api.serving.logprobs import content_format
from girandole.api.serving.response import engine_error, finish_metrics, read_all
from girandole.api.serving.usage import Usage


@dataclass
class Conversation:
    """What a Responses request runs: its request, the input items of the whole conversation
    (earlier turns first), and where it is saved (None: `store: false`)."""

    request: ResponsesRequest
    items: list[dict[str, Any]]
    save: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None
    item_ids: dict[int, str] = field(default_factory=dict)  # block index -> output item id


ITEM_PREFIXES = {"thinking": "rs", "text": "msg", "call": "fc"}  # output item ids by block


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's Responses usage, with Fireworks' names for the same counts."""
    total = usage.prompt_tokens + usage.completion_tokens
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens or 0},
        "total_tokens": total,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }


class ResponsesShape(TranslatedShape):
    def __init__(self, chat: ChatShape, conversation: Conversation) -> None:
        super().__init__(chat)
        self.conversation = conversation
        self._output: tuple[Choice, OutputBlocks] | None = None  # the one choice, once running
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

    def item_id(self, block: Block) -> str:
        ids = self.conversation.item_ids
        if block.index not in ids:
            ids[block.index] = new_id(ITEM_PREFIXES[block.type])
        return ids[block.index]

    def item(self, block: Block, status: str) -> dict[str, Any]:
        """A block as an output item (`in_progress` ones as `output_item.added` shows them)."""
        done = status != "in_progress"
        if block.type == "thinking":  # the reasoning itself, as open-weight models give it
            content = [self.reasoning_part(block.text)] if done else []
            return {"id": self.item_id(block), "type": "reasoning", "status": status,
                    "summary": [], "content": content}  # fmt: skip
        if block.type == "text":
            content = [self.part(block.text, self._text_entries())] if done else []
            return {"id": self.item_id(block), "type": "message", "status": status,
                    "role": "assistant", "content": content}  # fmt: skip
        return {"id": self.item_id(block), "type": "function_call", "status": status,
                "call_id": block.call_id, "name": block.name,
                "arguments": block.text if done else ""}  # fmt: skip

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
            "reasoning": {"effort": effort, "summary": summary},
            "store": self.conversation.save is not None,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_logprobs": req.top_logprobs,
            "text": {"format": text_format},
            "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": req.truncation or "disabled",
            "max_tool_calls": req.max_tool_calls,
            "usage": usage_json(usage) if usage is not None else None,
            "user": req.user,
            "safety_identifier": req.safety_identifier,
            "prompt_cache_key": req.prompt_cache_key,
            "metadata": req.metadata or {},
        }

    def finish(self, job: Job, choice: Choice, blocks: OutputBlocks) -> dict[str, Any]:
        """The finished response object, saved if stored."""
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        output = [self.item(b, self.item_status(b, blocks)) for b in blocks.blocks]
        body = self.response(job, status, output, finish_metrics(job))
        if self.conversation.save is not None:
            self.conversation.save(body, self.conversation.items)
        return body

    # -- the loops ---------------------------------------------------------------------------

    async def collect_body(self, job: Job, fanout: ChoiceFanout) -> dict[str, Any]:
        await read_all(fanout)
        (choice,) = job.choices
        blocks = self.output_blocks(self.conversation.request.max_tool_calls)
        self._output = (choice, blocks)
        self.feed(blocks, choice, choice.full_text, True)
        return self.finish(job, choice, blocks)

    async def stream_body(
        self, job: Job, fanout: ChoiceFanout, usage_placement: str
    ) -> AsyncIterator[bytes]:
        sequence = 0

        def event(name: str, /, **fields: Any) -> bytes:
            nonlocal sequence
            payload = {"type": name, "sequence_number": sequence, **fields}
            sequence += 1
            return sse_named_event(name, payload)

        (choice,) = job.choices
        blocks = self.output_blocks(self.conversation.request.max_tool_calls)
        self._output = (choice, blocks)
        try:
            started = self.response(job, "in_progress", [], None)
            yield event("response.created", response=started)
            yield event("response.in_progress", response=started)
            async for c, out in fanout.events():
                update = c.add(out)
                for what, block, text in self.feed(blocks, c, update.text, out.finished):
                    for name, fields in self.block_events(what, block, text, blocks):
                        yield event(name, **fields)
            # `response.completed` whatever the status (the SDK's stream helper waits for it)
            yield event("response.completed", response=self.finish(job, choice, blocks))
        except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
            error = engine_error(exc)
            yield event("error", code=error.code, message=error.message, param=error.param)
        finally:
            fanout.close()

    def block_events(
        self, what: str, block: Block, text: str, blocks: OutputBlocks
    ) -> list[tuple[str, dict[str, Any]]]:
        """The `response.*` events of one block event (`blocks`: the output so far)."""
        where = {"item_id": self.item_id(block), "output_index": block.index}
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
                     {"output_index": block.index, "item": self.item(block, "in_progress")}),
                    ("response.content_part.added", at | {"part": part}),
                ]  # fmt: skip
            if what == "delta":
                lp = {} if thinking else {"logprobs": self._delta_logprobs()}
                return [(f"response.{kind}.delta", at | {"delta": text} | lp)]
            assert done is not None
            part = done["content"][0]
            lp = {} if thinking else {"logprobs": part["logprobs"]}
            return [
                (f"response.{kind}.done", at | {"text": block.text} | lp),
                ("response.content_part.done", at | {"part": part}),
                ("response.output_item.done", {"output_index": block.index, "item": done}),
            ]  # fmt: skip
        if what == "start":
            item = self.item(block, "in_progress")
            return [("response.output_item.added", {"output_index": block.index, "item": item})]
        if what == "delta":
            return [("response.function_call_arguments.delta", where | {"delta": text})]
        return [
            ("response.function_call_arguments.done",
             where | {"name": block.name, "arguments": block.text}),
            ("response.output_item.done", {"output_index": block.index, "item": done}),
        ]  # fmt: skip
