"""How a Messages response is written: a `message` object whole, or Anthropic's event stream
(the contract: `girandole.api.messages`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from girandole.api.chat.shape import ChatShape
from girandole.api.http.errors import APIError
from girandole.api.http.sse import sse_named_event
from girandole.api.messages.blocks import Block
from girandole.api.messages.context_edits import AppliedEdits
from girandole.api.messages.schema import Diagnostics, MessagesRequest
from girandole.api.messages.translated import TranslatedShape
from girandole.api.serving.choice import Choice
from girandole.api.serving.fanout import ChoiceFanout
from girandole.api.serving.job import Job
from girandole.api.serving.response import engine_error, finish_metrics, read_all
from girandole.api.serving.response_size import MESSAGES_ADVICE, ResponseSize
from girandole.api.serving.usage import Usage

# APIError.type (and status) -> Anthropic's error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error(error: APIError, request_id: str | None = None) -> dict[str, Any]:
    """Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`."""
    kind = ERROR_TYPES.get(error.status_code)
    if kind is None:
        kind = "invalid_request_error" if error.status_code < 500 else "api_error"
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": error.message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def usage_json(usage: Usage) -> dict[str, int]:
    """Anthropic's usage: every prompt token is an input token (template and cached ones too)."""
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}


def tool_use_id(call_id: str | None) -> str:
    """Chat's `call_<hex>` ids as Anthropic's `toolu_<hex>`."""
    return "toolu_" + (call_id or "").removeprefix("call_")


def content_block(block: Block, whole: bool, omit_thinking: bool = False) -> dict[str, Any]:
    """A block as Anthropic writes it: whole, or as its `content_block_start` shows it; a
    thinking block without its text where `thinking.display` is "omitted"."""
    if block.type == "thinking":  # no signature: this server signs nothing
        text = block.text if whole and not omit_thinking else ""
        return {"type": "thinking", "thinking": text, "signature": ""}
    if block.type == "text":
        return {"type": "text", "text": block.text if whole else ""}
    arguments = block.arguments() if whole else {}
    if arguments is None:  # cut short by max_tokens: a tool_use as a stream of it reads
        arguments = block.partial_arguments()
    return {"type": "tool_use", "id": tool_use_id(block.call_id), "name": block.name,
            "input": arguments}  # fmt: skip


def diagnostics(asked: Diagnostics | None) -> dict[str, Any]:
    """The answer's `diagnostics` field ({}: not asked for). Nothing here keeps a record of
    earlier prompts to compare with, so the reason a cache missed the named message's prefix is
    Anthropic's `unavailable` (the request itself ran as usual); none named (the first turn's
    opt-in): nothing to compare, null."""
    if asked is None:
        return {}
    if asked.previous_message_id is None:
        return {"diagnostics": None}
    return {"diagnostics": {"cache_miss_reason": {"type": "unavailable"}}}


class MessagesShape(TranslatedShape):
    def __init__(self, chat: ChatShape, req: MessagesRequest) -> None:
        super().__init__(chat)
        self.stop_sequences = req.stop_sequences or []
        self.max_tokens = req.max_tokens  # as the client asked (chat lowers it to fit the context)
        # the request's context edits as applied (None: it asked for none)
        self.edits: AppliedEdits | None = None
        self.omit_thinking = getattr(req.thinking, "display", None) == "omitted"
        self.diagnostics = diagnostics(req.diagnostics)

    @property
    def context_management(self) -> dict[str, Any] | None:
        return self.edits.body() if self.edits is not None else None

    def stop_reason(self, choice: Choice) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence) of a finished choice."""
        if self.max_tokens == 0:  # a cache pre-warm: nothing was to be generated
            return "max_tokens", None
        if choice.finish_reason == "tool_calls":
            return "tool_use", None
        if choice.finish_reason == "length":
            # cut short of the client's max_tokens: it was lowered to what the context left
            if len(choice.token_ids) < self.max_tokens:
                return "model_context_window_exceeded", None
            return "max_tokens", None
        matched = choice.last.stop_reason if choice.last is not None else None
        if isinstance(matched, int):  # a stop token: a special token's string is a sequence
            matched = choice.tokenizer.id_to_token(matched)
        if isinstance(matched, str) and matched in self.stop_sequences:
            return "stop_sequence", matched
        return "end_turn", None

    def message(self, job: Job, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": job.id,
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": job.choices[0].num_prompt_tokens, "output_tokens": 0},
        } | self.diagnostics

    async def collect_body(self, job: Job, fanout: ChoiceFanout) -> dict[str, Any]:
        await read_all(fanout, ResponseSize(job.max_response_bytes, advice=MESSAGES_ADVICE))
        (choice,) = job.choices
        blocks = self.output_blocks()
        self.feed(blocks, choice, choice.full_text, True)
        # a cache pre-warm (max_tokens 0) has no content, not even a forced call's empty block
        shown = blocks.blocks if self.max_tokens else []
        body = self.message(
            job, [content_block(b, whole=True, omit_thinking=self.omit_thinking) for b in shown]
        )
        body["stop_reason"], body["stop_sequence"] = self.stop_reason(choice)
        body["usage"] = usage_json(finish_metrics(job))
        if self.context_management is not None:
            body["context_management"] = self.context_management
        if job.options.raw_output:
            body["raw_output"] = choice.raw_output()
        return body

    async def stream_body(
        self, job: Job, fanout: ChoiceFanout, usage_placement: str
    ) -> AsyncIterator[bytes]:
        def event(name: str, /, **fields: Any) -> bytes:
            return sse_named_event(name, {"type": name, **fields})

        (choice,) = job.choices
        blocks = self.output_blocks()
        try:
            yield event("message_start", message=self.message(job, []))
            yield event("ping")
            async for c, out in fanout.events():
                update = c.add(out)
                events = self.feed(blocks, c, update.text, out.finished)
                for what, block, text in events if self.max_tokens else []:
                    if what == "start":
                        block_json = content_block(block, whole=False)
                        yield event("content_block_start", index=block.index,
                                    content_block=block_json)  # fmt: skip
                    elif what == "delta" and block.type == "thinking":
                        if self.omit_thinking:
                            continue
                        delta = {"type": "thinking_delta", "thinking": text}
                        yield event("content_block_delta", index=block.index, delta=delta)
                    elif what == "delta" and block.type == "text":
                        delta = {"type": "text_delta", "text": text}
                        yield event("content_block_delta", index=block.index, delta=delta)
                    elif what == "delta":
                        delta = {"type": "input_json_delta", "partial_json": text}
                        yield event("content_block_delta", index=block.index, delta=delta)
                    else:
                        yield event("content_block_stop", index=block.index)
            usage = usage_json(finish_metrics(job))
            stop_reason, stop_sequence = self.stop_reason(choice)
            delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
            extra = {} if self.context_management is None else {
                "context_management": self.context_management}  # fmt: skip
            yield event("message_delta", delta=delta, usage=usage, **extra)
            yield event("message_stop")
        except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
            yield sse_named_event("error", anthropic_error(engine_error(exc)))
        finally:
            fanout.close()
