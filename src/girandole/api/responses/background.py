"""Background responses (`background: true`, OpenAI's background mode): the request is checked
and prepared while the client waits (its 400s are the usual ones), saved as `queued`, and
answered at once; its work then runs in a task of its own, under a record of its own
(`pipeline.detached`: admission, usage row, access log), whatever the client does. The stored
response goes `queued` -> `in_progress` (admitted) -> `completed` | `incomplete` | `failed`
(`error` set) | `cancelled` (`POST /v1/responses/{id}/cancel`). While the admission queue has no
room it stays `queued` (it asks again, every 0.5 s to 8 s), where a request would get a 429;
past `MAX_WAITING` responses queued so, a new background request gets the 429 itself.

Every background response's events are kept (an `EventLog`, `sequence_number` = place in the
log) while it runs and for `KEEP_SECONDS` after (the newest `KEEP_ENDED`, at most `KEEP_BYTES`
in all): `stream: true` follows the log from the start, and
`GET /v1/responses/{id}?stream=true&starting_after=N` replays it after event N and follows it
to the end, so a client whose connection dropped picks the stream up again. The log
opens with `response.created` and `response.queued` (status `queued`), then
`response.in_progress`, the output's events, and `response.completed` (or `response.failed`
with the failed response). A cancelled response's log just ends.

A server that stops ends its running background responses as `failed` (they are not resumed:
at its drain deadline, as it cuts streams, so their followers get `response.failed`), and one
that starts marks those a crash left `queued` or `in_progress` the same way (their
webhooks go then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from girandole.api.http.errors import APIError, too_many_requests
from girandole.api.http.finite_json import FiniteJSONResponse
from girandole.api.http.sse import SSEResponse
from girandole.api.ops.tracking import RequestRecord, record_of
from girandole.api.ops.webhooks import Webhooks
from girandole.api.responses.shape import ResponsesShape, sse_event_of
from girandole.api.serving.fanout import ChoiceFanout
from girandole.api.serving.job import Job
from girandole.api.serving.pipeline import start_job
from girandole.api.serving.response import engine_error
from girandole.api.serving.response_size import ResponseTooLarge
from girandole.api.serving.usage import Usage
from girandole.registry.responses import ResponseStore

if TYPE_CHECKING:
    from girandole.api.serving.pipeline import Rounds

logger = logging.getLogger("girandole.api")

KEEP_SECONDS = 600.0  # an ended response's events stay this long (OpenAI keeps ~10 minutes)
KEEP_ENDED = 256  # and at most this many ended responses' events
# and at most this many bytes of them: a long answer's log is large (2.3 KB a token with
# top_logprobs 5: 75 MB for 32k tokens), so 256 logs alone could hold many GB
KEEP_BYTES = 256 << 20
STOPPED = "The server stopped before this background response finished"
RETRY_MIN_S, RETRY_MAX_S = 0.5, 8.0  # between admissions refused for capacity
# Responses still waiting for admission (each holds its prepared prompt); one more is a 429:
# a flood of background requests piled up queued runs without a bound
MAX_WAITING = 1024


class EventLog:
    """A background response's stream events as SSE frames, in order, for any number of
    readers, each from a place of its own."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.num_bytes = 0  # of the frames
        self.closed = False
        self._changed = asyncio.Event()

    def add(self, name: str, fields: dict[str, Any]) -> None:
        frame = sse_event_of(name, len(self.frames), fields)
        self.frames.append(frame)
        self.num_bytes += len(frame)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int = -1) -> AsyncIterator[bytes]:
        """The events after sequence number `after`, then each new one, until the log ends."""
        at = max(after + 1, 0)
        while True:
            changed = self._changed  # taken before the check: no event is missed
            while at < len(self.frames):
                yield self.frames[at]
                at += 1
            if self.closed:
                return
            await changed.wait()


@dataclass
class BackgroundRun:
    id: str
    account: str
    log: EventLog = field(default_factory=EventLog)
    task: asyncio.Task[None] | None = None
    ended: float | None = None  # time.monotonic() when it ended
    admitted: bool = False  # past the admission queue (`queued` until then)
    end_as: str = "cancelled"  # the status a cancelled task leaves: `failed` when stopping


def error_json(error: APIError) -> dict[str, str]:
    """A failed response's `error`, in OpenAI's codes."""
    codes = {429: "rate_limit_exceeded", 400: "invalid_prompt"}
    return {"code": codes.get(error.status_code, "server_error"), "message": error.message}


class BackgroundResponses:
    """The server's background responses: a task each while it runs, and its events."""

    def __init__(self, webhooks: Webhooks | None = None) -> None:
        self.runs: OrderedDict[str, BackgroundRun] = OrderedDict()
        self.webhooks = webhooks  # told when a response ends: response.<its status>

    def recover(self, store: ResponseStore) -> None:
        """At start-up: responses a stopped server left unfinished (it crashed) can never
        finish. They end now, so their webhooks go now: the crashed server sent none."""
        for account, body in store.unfinished():
            if body["id"] not in self.runs:
                store.update(account, failed(body, STOPPED))
                if self.webhooks is not None:
                    self.webhooks.send("response.failed", body["id"])

    async def shutdown(self) -> None:
        """End every running background response as `failed` (the server is stopping)."""
        running = [r for r in self.runs.values() if r.task is not None and not r.task.done()]
        for run in running:
            run.end_as = "failed"
            assert run.task is not None
            run.task.cancel()
        for run in running:
            with contextlib.suppress(BaseException):
                await run.task  # type: ignore[misc]

    def get(self, response_id: str, account: str) -> BackgroundRun | None:
        self._forget_old()  # gone KEEP_SECONDS after its end, as the 400 for it says
        run = self.runs.get(response_id)
        return run if run is not None and run.account == account else None

    async def cancel(self, run: BackgroundRun) -> None:
        """Stop a run (its task saves it as `cancelled`); nothing if it has ended."""
        if run.task is not None and not run.task.done():
            run.task.cancel()
            with contextlib.suppress(BaseException):
                await run.task

    def start(
        self,
        request: Request,
        rounds: Rounds,
        shape: ResponsesShape,
        job: Job,
        store: ResponseStore,
        account: str,
    ) -> Response:
        """Save the prepared request as `queued`, start its task, and answer `request`: the
        queued response, or (`stream: true`) its events as they come."""
        rounds.got.state.ops.check_prompt_limit(job.choices)  # a 400 now, not a failed run
        self.check_room()
        http = record_of(request)
        if http is not None:  # the run's record writes the usage row; this request's, none
            http.handed_off = True
        self._forget_old()
        run = BackgroundRun(job.id, account)
        queued = shape.response(job, "queued", [], None)
        turn = shape.conversation
        store.put(account, queued, turn.items, turn.previous_id, turn.inherited, turn.snapshot)
        run.log.add("response.created", {"response": queued})
        run.log.add("response.queued", {"response": queued})
        self.runs[run.id] = run
        run.task = asyncio.create_task(self._run(run, rounds, shape, job, store))
        headers = {"x-request-id": request.headers.get("x-request-id") or job.id}
        if job.stream:
            return SSEResponse(run.log.follow(), headers=headers)
        return FiniteJSONResponse(queued, headers=headers)

    def check_room(self) -> None:
        """A 429 when MAX_WAITING responses already wait for admission."""
        waiting = sum(1 for r in self.runs.values() if r.ended is None and not r.admitted)
        if waiting >= MAX_WAITING:
            raise too_many_requests(
                f"{waiting} background responses already wait for this server's capacity;"
                " retry later"
            )

    async def _run(
        self, run: BackgroundRun, rounds: Rounds, shape: ResponsesShape, job: Job,
        store: ResponseStore,
    ) -> None:  # fmt: skip
        request, state = rounds.request, rounds.got.state
        record = record_of(request)
        assert record is not None  # pipeline.detached made it
        record.response_id, record.stream = job.id, job.stream
        status = "failed"
        try:
            fanout = await self._admitted(request, rounds, job)
            run.admitted = True
            # a stream's drain deadline is its too: cut then, it fails with `response.failed`
            # in its log, before the server cuts the connections of clients following it
            state.ops.track_stream(fanout)
            body = shape.response(job, "in_progress", [], None)
            store.update(run.account, body)
            run.log.add("response.in_progress", {"response": body})
            async for name, fields in shape.events(job, fanout):
                run.log.add(name, fields)  # the last, response.completed: saved by the shape
                if name == "response.completed":
                    status = fields["response"]["status"]  # completed, or incomplete
            record.status = 200
        except asyncio.CancelledError:
            if status in ("completed", "incomplete"):
                # ended and saved already; the cancel came while its MCP sessions closed (up to
                # 5 s): it stays as it ended (before, `cancelled` was saved over it and sent)
                record.status = 200
                return
            record.status, status = 499, run.end_as
            body = shape.response(job, run.end_as, shape.output_so_far(), _usage(record))
            if run.end_as == "failed":
                body = failed(body, STOPPED)
            store.update(run.account, body)
            if run.end_as == "failed":  # a cancelled one's log just ends
                run.log.add("response.failed", {"response": body})
        except Exception as exc:  # noqa: BLE001 - the client is gone: the response says it
            error = engine_error(exc)
            if state.ops.draining:  # cut by the drain deadline: the server's stop ended it
                error = APIError(503, STOPPED, type="server_error")
            record.status = error.status_code
            # a response past --max-response-bytes keeps none of its output: a stored half of
            # it would be up to that size, to be read back and chained from as if whole
            output = [] if isinstance(exc, ResponseTooLarge) else shape.output_so_far()
            body = failed(shape.response(job, "failed", output, _usage(record)))
            body["error"] = error_json(error)
            store.update(run.account, body)
            run.log.add("response.failed", {"response": body})
        finally:
            self._end(run)
            state.ops.finish(record)  # usage row, admission slot, access log
            if self.webhooks is not None:
                self.webhooks.send(f"response.{status}", job.id)

    @staticmethod
    async def _admitted(request: Request, rounds: Rounds, job: Job) -> ChoiceFanout:
        """The job started once admitted. Refused for capacity (the admission queue full: 429;
        its wait over: 503), it stays `queued` and asks again, as OpenAI's queue keeps it,
        unless the server is stopping: then it fails as the server's stop fails the others
        (not with the refusal's "at capacity, retry later"), as soon as the stop begins, so a
        client following it gets `response.failed` before its connection is closed (it slept
        up to RETRY_MAX_S, past a short drain period)."""
        state, delay = rounds.got.state, RETRY_MIN_S
        while True:
            try:
                return await start_job(request, state, rounds.got.engine, job, rounds.got.target)
            except APIError as exc:
                if exc.status_code not in (429, 503):
                    raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.ops.drain_started.wait(), delay)
            if state.ops.draining:
                raise APIError(503, STOPPED, type="server_error")
            delay = min(delay * 2, RETRY_MAX_S)

    def _end(self, run: BackgroundRun) -> None:
        """Close the run's log, and drop it (with any others as old) once it is KEEP_SECONDS
        old, even if no request comes: an idle server held up to KEEP_ENDED logs for good."""
        run.ended = time.monotonic()
        run.log.close()
        self._forget_old()  # its bytes count now, not when the next response starts
        asyncio.get_running_loop().call_later(KEEP_SECONDS + 0.1, self._forget_old)

    def _forget_old(self) -> None:
        """Drop the events of responses that ended long ago, or beyond the newest KEEP_ENDED,
        or beyond KEEP_BYTES of them (oldest first). Readers following a log keep theirs."""
        now = time.monotonic()
        ended = [r for r in self.runs.values() if r.ended is not None]
        kept = sum(r.log.num_bytes for r in ended)
        for k, run in enumerate(ended):
            assert run.ended is not None
            if now - run.ended > KEEP_SECONDS or len(ended) - k > KEEP_ENDED or kept > KEEP_BYTES:
                del self.runs[run.id]
                kept -= run.log.num_bytes


def failed(body: dict[str, Any], message: str | None = None) -> dict[str, Any]:
    """`body` as a failed response (`message`: a server error's)."""
    body = dict(body, status="failed", completed_at=None)
    if message is not None:
        body["error"] = {"code": "server_error", "message": message}
    return body


def _usage(record: RequestRecord) -> Usage | None:
    """What the engine did for a response cut short; None before it was admitted."""
    return record.usage() if record.choices else None
