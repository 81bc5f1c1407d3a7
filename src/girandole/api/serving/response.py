"""The one collect loop and the one stream loop: engine outputs to a whole response body or to
SSE chunks, written in the endpoint's wire shape (`ResponseShape`). What the chunks carry and
where usage goes is the endpoints' contract: see `girandole.api.completions` and
`girandole.api.chat`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from girandole.api.http.errors import (
    APIError,
    bad_request,
    internal_error,
    model_not_found,
    unavailable,
)
from girandole.api.http.sse import DONE, sse_event
from girandole.api.serving.choice import Choice
from girandole.api.serving.fanout import ChoiceFanout
from girandole.api.serving.job import Job
from girandole.api.serving.response_size import RAW_OUTPUT, RAW_OUTPUT_ADVICE, ResponseSize
from girandole.api.serving.usage import Usage, count_usage, perf_metrics
from girandole.sampling.grammar import GrammarSpec

if TYPE_CHECKING:
    from girandole.api.serving.pipeline import Rounds
    from girandole.api.serving.structured import ToolsCheck

logger = logging.getLogger("girandole.api")


class ResponseShape:
    """How an endpoint writes a choice on the wire; the loops here do the rest. The defaults
    are /completions' (`text`); chat overrides them (`message`, `delta`, tool calls). An
    endpoint of another API (Messages, Responses) replaces the loops: `collect_body`,
    `stream_body`."""

    object = "text_completion"  # of a whole response
    chunk_object = "text_completion"  # of a stream chunk
    forced_grammar: GrammarSpec | None = None  # what the output must follow (chat: a forced call)
    tools_check: ToolsCheck | None = None  # chat: the tools' schemas, compiled to check them
    # return_token_ids: chat also puts `prompt_token_ids` on the body (whole) and on the first
    # chunk, where Fireworks' chat schema and litellm's fireworks_ai provider read them
    prompt_ids_on_body = False
    # image URLs may be on non-public addresses (--allow-private-image-urls): set by the
    # endpoint's shape() from the server's settings, read where a vision model's images are
    allow_private_images = False
    # the request's engine rounds (pipeline.py): a shape that runs more than one reads them
    rounds: Rounds | None = None

    def whole(self, choice: Choice) -> dict[str, Any]:
        """A whole choice's output fields (may set `choice.finish_reason`)."""
        return {"text": choice.full_text}

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        """The fields of a chunk sent for every choice before any output, if any."""
        return None

    def pieces(self, choice: Choice, text: str, finished: bool) -> list[dict[str, Any]]:
        """The output fields of the chunks new `text` makes (finished: with the choice's last
        ones; may set `choice.finish_reason`)."""
        return [self.text_piece(text)] if text else []

    def text_piece(self, text: str) -> dict[str, Any]:
        """A chunk's output fields for plain `text` (a chunk sent for logprobs or ids alone)."""
        return {"text": text}

    def finish_piece(self) -> dict[str, Any]:
        """The output fields of a choice's finish chunk."""
        return {"text": ""}

    async def collect_body(self, job: Job, fanout: ChoiceFanout) -> dict[str, Any]:
        """The whole response body."""
        return await collect(job, self, fanout)

    def stream_body(
        self, job: Job, fanout: ChoiceFanout, usage_placement: str
    ) -> AsyncIterator[bytes]:
        """The SSE body."""
        return stream(job, self, fanout, usage_placement)

    def add_internal_content(self, body: dict[str, Any], token_ids: list[int]) -> None:
        """`stream_options.include_internal_content`: the token ids behind a chunk (`token_id`
        the last of them, `token_ids` all: coalesced chunks and held-back text have several)."""
        body["internal_content"] = {"token_id": token_ids[-1], "token_ids": list(token_ids)}


def engine_error(exc: Exception) -> APIError:
    """What the client is told of an error from the engine: bad input is a 400."""
    if isinstance(exc, APIError):
        return exc
    if type(exc).__name__ == "AdapterNotLoadedError":  # unloaded while it was on its way
        return model_not_found()
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if type(exc).__name__ == "CompileBusy":  # grammar compiles queued: the server's state
        return unavailable(str(exc))
    if type(exc).__name__ == "EngineStoppedError":  # its deployment went away: say so
        return APIError(503, str(exc), type="service_unavailable", code="UNAVAILABLE")
    if type(exc).__name__ == "EngineDeadError":
        logger.error("the engine is not running: %s", exc)
        return APIError(
            503, "The engine is not running", type="service_unavailable", code="UNAVAILABLE"
        )
    logger.error("request failed in the engine", exc_info=exc)
    return internal_error()


def envelope(
    job: Job, obj: str, choices: list[dict[str, Any]], usage: Usage | None, perf: Any = None
) -> dict[str, Any]:
    """The body around the choices, whole and in chunks."""
    body: dict[str, Any] = {
        "id": job.id,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": usage.body() if usage is not None else None,
    }
    if perf is not None:
        body["perf_metrics"] = perf
    return body


def _choice(choice: Choice, fields: dict[str, Any], logprobs: Any = None) -> dict[str, Any]:
    return {"index": choice.index, **fields, "logprobs": logprobs, "finish_reason": None}


def finish_metrics(job: Job) -> Usage:
    """Usage and perf metrics once every choice finished (perf kept on the job)."""
    usage = count_usage(job.choices)
    lasts = [c.last for c in job.choices]
    job.perf_metrics = perf_metrics(usage, lasts, job.received, job.prepared)
    return usage


async def read_all(fanout: ChoiceFanout, size: ResponseSize | None = None) -> None:
    """Read every engine output into its choice (a whole response); engine errors as 4xx/5xx.
    A response growing past `size.max_bytes` is a 400, its engine requests aborted
    (`girandole.api.serving.response_size`)."""
    size = size or ResponseSize(None)
    try:
        async for choice, out in fanout.events():
            size.read(choice, out)
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise engine_error(exc) from None
    finally:
        fanout.close()


async def collect(job: Job, shape: ResponseShape, fanout: ChoiceFanout) -> dict[str, Any]:
    """The whole (non-streamed) response body."""
    await read_all(fanout, ResponseSize(job.max_response_bytes))

    def shaped() -> list[dict[str, Any]]:
        bodies = []
        for c in sorted(job.choices, key=lambda c: c.index):
            body = _choice(c, shape.whole(c), c.logprobs(c.tracker.entries))
            body["finish_reason"] = c.finish_reason
            bodies.append(body | c.extras())
        return bodies

    # off the event loop (the choices are finished: nothing changes them now): the logprobs of
    # n long choices are millions of small dicts (16 x 7,800 echoed tokens: seconds)
    bodies = await asyncio.to_thread(shaped)
    usage = finish_metrics(job)
    perf = job.perf_metrics if job.options.perf_metrics else None
    body = envelope(job, shape.object, bodies, usage, perf)
    if shape.prompt_ids_on_body and job.options.return_token_ids and job.choices:
        body["prompt_token_ids"] = list(job.choices[0].prompt_token_ids)  # one prompt: chat's
    return body


async def stream(
    job: Job, shape: ResponseShape, fanout: ChoiceFanout, usage_placement: str = "separate"
) -> AsyncIterator[bytes]:
    """The SSE body. Closing it (client gone) aborts the engine requests."""
    opts = job.options
    prompt_ids_sent: set[int] = set()
    body_ids = shape.prompt_ids_on_body and opts.return_token_ids and bool(job.choices)

    def chunk(choices: list[dict[str, Any]], usage: Usage | None = None, perf: Any = None) -> bytes:
        nonlocal body_ids
        body = envelope(job, shape.chunk_object, choices, usage, perf)
        if body_ids:  # the first chunk only
            body["prompt_token_ids"] = list(job.choices[0].prompt_token_ids)
            body_ids = False
        return sse_event(body)

    def with_prompt_ids(c: Choice, body: dict[str, Any]) -> dict[str, Any]:
        if opts.return_token_ids and c.index not in prompt_ids_sent:  # the choice's first chunk
            body["prompt_token_ids"] = list(c.prompt_token_ids)
            prompt_ids_sent.add(c.index)
        return body

    unfinished = len(job.choices)
    # raw_output holds every position until the finish chunks: bounded as a body is
    limit = job.max_response_bytes if opts.raw_output else None
    held = ResponseSize(limit, RAW_OUTPUT, RAW_OUTPUT_ADVICE)
    separate = job.include_usage and usage_placement != "finish"
    try:
        for c in sorted(job.choices, key=lambda c: c.index):
            opening = shape.opening(c)
            if opening is not None:
                yield chunk([with_prompt_ids(c, _choice(c, opening))])
        async for c, out in fanout.events():
            update = held.read(c, out)
            if job.buffer is not None:  # coalesced: held until due (all of it at the finish)
                update = job.buffer.push(c.index, update, out.finished)
                if update is None:
                    continue
            extras = (opts.return_token_ids or job.internal_content) and bool(update.token_ids)
            pieces = shape.pieces(c, update.text, out.finished)
            if pieces or update.entries or extras:
                # no pieces: the shape holds the text (a reasoning marker, a call being
                # recognised) or there is none yet; the logprobs or ids go with no text
                for j, piece in enumerate(pieces or [shape.text_piece("")]):
                    if j > 0:
                        yield chunk([_choice(c, piece)])
                        continue
                    body = with_prompt_ids(c, _choice(c, piece, c.logprobs(update.entries)))
                    if not opts.raw_output:  # written: nothing reads a mask again
                        for entry in update.entries:
                            entry.mask = None
                    if opts.return_token_ids:
                        body["token_ids"] = update.token_ids
                    if job.internal_content and update.token_ids:
                        shape.add_internal_content(body, update.token_ids)
                    yield chunk([body])
            if out.finished:
                unfinished -= 1
                usage = perf = None
                if unfinished == 0:
                    finish_usage = finish_metrics(job)
                    if opts.perf_metrics and not separate:
                        perf = job.perf_metrics
                if job.include_usage and usage_placement == "finish":
                    usage = finish_usage if unfinished == 0 else count_usage(job.choices)
                final = _choice(c, shape.finish_piece())
                final["finish_reason"] = c.finish_reason
                if opts.return_token_ids and c.index not in prompt_ids_sent:
                    with_prompt_ids(c, final)["token_ids"] = []
                if opts.raw_output:
                    final["raw_output"] = c.raw_output()
                yield chunk([final], usage, perf)
        if separate:
            perf = job.perf_metrics if opts.perf_metrics else None
            yield chunk([], finish_metrics(job), perf)
        yield DONE
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
        error = engine_error(exc)
        yield sse_event({"error": error.body(job.id)["error"]})
    finally:
        fanout.close()
