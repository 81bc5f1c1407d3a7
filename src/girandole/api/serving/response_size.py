"""What a response held whole may grow to (`--max-response-bytes`): a body is held in memory
until it is written, as Python objects several times its size, so one that grows past the limit
(its JSON bytes, estimated as the engine's outputs are read: `Choice.json_size`) is a 400 that
says so, and its engine requests are aborted (the loop that reads them closes its fan-out).

Held whole: a non-stream response of every endpoint; what a completions/chat stream's finish
chunks repeat (`raw_output`); a Responses stream's `response.completed` event (the whole
response, which is also what a stored or background response saves). A Responses response also
holds what its MCP servers answered (tool lists, calls' results: up to 4 MiB each), counted as
each is added (`ResponseSize.grow`)."""

from __future__ import annotations

from dataclasses import dataclass

from girandole.api.http.errors import APIError
from girandole.api.serving.choice import Choice, Update
from girandole.engine.outputs import RequestOutput

# what a client can ask for less of, in each API's own field names
COMPLETIONS_ADVICE = (
    "stream it (stream: true), or ask for fewer choices (n), tokens (max_tokens), logprobs or"
    " sampling_mask ids"
)
RAW_OUTPUT_ADVICE = (
    "leave out raw_output, or ask for fewer choices (n), tokens (max_tokens), logprobs or"
    " sampling_mask ids"
)
MESSAGES_ADVICE = "stream it (stream: true), or ask for fewer tokens (max_tokens)"
RESPONSES_ADVICE = "ask for fewer tokens (max_output_tokens) or logprobs (top_logprobs)"
# an MCP server's answer made it pass the limit: the calls are what the client can ask less of
RESPONSES_MCP_ADVICE = (
    "its MCP tools' answers took it past: ask for fewer tool calls (max_tool_calls), narrow the"
    " tools (allowed_tools), or ask for fewer tokens (max_output_tokens) or logprobs"
    " (top_logprobs)"
)

WHOLE = "a whole (non-streamed) response"
RAW_OUTPUT = "what a stream's finish chunks repeat (raw_output)"
# a Responses stream ends with the whole response: streaming it holds as much
RESPONSES_WHOLE = "a response, streamed or not (its response.completed event holds all of it)"


class ResponseTooLarge(APIError):
    """A 400: the response grew past `--max-response-bytes` (no part of it is kept)."""

    def __init__(self, max_bytes: int, held: str, advice: str) -> None:
        super().__init__(
            400,
            f"The response grew larger than this server's limit of {max_bytes} bytes"
            f" (--max-response-bytes) for {held}: {advice}",
        )


@dataclass
class ResponseSize:
    """A response's estimated JSON bytes so far, across its choices (and rounds), checked
    against `max_bytes` (None: no limit) as they grow."""

    max_bytes: int | None
    held: str = WHOLE  # what is held whole, as the error names it
    advice: str = COMPLETIONS_ADVICE
    num_bytes: int = 0

    def read(self, choice: Choice, out: RequestOutput) -> Update:
        """`choice.add(out)`, its growth counted (a ResponseTooLarge past the limit)."""
        before = choice.json_size
        update = choice.add(out)
        self.num_bytes += choice.json_size - before
        self._check(self.advice)
        return update

    def grow(self, num_bytes: int, advice: str | None = None) -> None:
        """Count what the response holds beside its choices' output (an MCP tool's result),
        `advice` naming what to ask less of (a ResponseTooLarge past the limit)."""
        self.num_bytes += num_bytes
        self._check(advice or self.advice)

    def _check(self, advice: str) -> None:
        if self.max_bytes is not None and self.num_bytes > self.max_bytes:
            raise ResponseTooLarge(self.max_bytes, self.held, advice)
