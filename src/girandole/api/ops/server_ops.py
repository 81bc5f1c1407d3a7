"""The server's operational side, in one object hung on `AppState.ops`: keys database and
authentication, per-key rate limits, the admission queue, usage accounting, metrics, the
access log, and draining on shutdown. Built from the settings, the `--api-key` keys and the
model registry; it sees the model's state only through `engine_status`."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from girandole.api.http.auth import bearer_token
from girandole.api.http.errors import APIError, bad_request, unauthorized, unavailable
from girandole.api.ops.account_metrics import AccountMetrics, ended_of
from girandole.api.ops.admission import NOBODY, Admission, Owner
from girandole.api.ops.drain_cut import Unanswered
from girandole.api.ops.metrics import Metrics
from girandole.api.ops.ratelimit import RateLimiter
from girandole.api.ops.tracking import Principal, RequestRecord, principal_of, record_of
from girandole.api.serving.choice import Choice
from girandole.api.serving.fanout import ChoiceFanout
from girandole.api.serving.prompt import MAX_CHARS_PER_TOKEN, context_exceeded
from girandole.api.settings import ServerSettings
from girandole.engine.protocol import EngineClient
from girandole.registry.keys import ApiKeyStore
from girandole.registry.keystore import Database
from girandole.registry.models import ModelRegistry, ServedModel
from girandole.registry.roles import ADMIN
from girandole.registry.usage import UsageRecorder

# how the model is doing: its load status ("loading", "ready", "failed") and the engine once ready
EngineStatus = Callable[[], tuple[str, EngineClient | None]]

access_log = logging.getLogger("girandole.access")
logger = logging.getLogger("girandole.api")

OPEN = Principal(account=None, key_id=None)

# the body fields that make a prompt (/completions, chat and Messages, Responses; tools are
# rendered into the prompt)
PROMPT_FIELDS = ("prompt", "messages", "system", "input", "instructions", "documents", "query",
                 "tools", "functions")  # fmt: skip
TOOL_FIELDS = ("tools", "functions")


def endpoint_of(path: str) -> str:
    """A short route label for metrics and usage rows (unknown paths share one label)."""
    for prefix in ("/inference/v1", "/v1"):
        if path.startswith(prefix + "/"):
            rest = path[len(prefix) :]
            if rest == "/completions":
                return "completions"
            if rest == "/chat/completions":
                return "chat_completions"
            if rest == "/messages":
                return "messages"
            if rest == "/responses":
                return "responses"
            if rest == "/responses/input_tokens":
                return "count_tokens"
            if rest.startswith("/responses/"):
                return "stored_responses"
            for kind in ("conversations", "files", "batches"):
                if rest == f"/{kind}" or rest.startswith(f"/{kind}/"):
                    return kind
            if rest == "/models" or rest.startswith("/models/"):
                return "models"
            if rest in ("/embeddings", "/rerank", "/tokenize", "/detokenize"):
                return rest[1:]
            if rest == "/messages/count_tokens":
                return "count_tokens"
            if rest == "/messages/batches" or rest.startswith("/messages/batches/"):
                return "message_batches"
    if path in ("/health", "/ready", "/metrics", "/tokenize", "/detokenize"):
        return path[1:]
    if path == "/v2/rerank":  # Cohere's shape of rerank: its usage rows and metrics are rerank's
        return "rerank"
    return "other"


def _metadata_json(metadata: dict[str, str]) -> str:
    """A usage row's metadata: unescaped, since SQLite's json_extract('$."équipe"') matches a
    key only as spelled, not its \\u00e9 escape; an unpaired surrogate, which UTF-8 cannot
    hold, keeps its escape rather than failing the whole insert."""
    text = json.dumps(metadata, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(metadata)
    return text


def owner_of(record: RequestRecord) -> Owner:
    """Whose slots a request's are, for the admission queue's fair order: its key's account
    and id (nobody's on an open server)."""
    principal = record.principal
    return NOBODY if principal is None else (principal.account, principal.key_id)


def is_inference(record: RequestRecord) -> bool:
    return record.method == "POST" and endpoint_of(record.path) in (
        "completions",
        "chat_completions",
        "messages",
        "responses",
        "embeddings",
        "rerank",
    )


class ServerOps:
    def __init__(
        self,
        settings: ServerSettings,
        keys: ApiKeyStore,
        registry: ModelRegistry,
        served: ServedModel,
        engine_status: EngineStatus,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.registry = registry
        self.served = served
        self.engine_status = engine_status
        data_dir = settings.data_dir
        self.db = Database.in_folder(data_dir) if data_dir else Database(None)
        self.usage = UsageRecorder(self.db)
        self.limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
        self.admission = Admission(
            settings.max_concurrent_requests, settings.max_queued_requests, settings.queue_timeout
        )
        self.max_prompt_tokens = settings.max_prompt_tokens
        self.metrics = Metrics(self._gauges)
        self.account_metrics = AccountMetrics(settings.metrics_scrapes_per_minute)
        self.draining = False
        self.drain_started = asyncio.Event()  # for waits that end when the server stops
        self._streams: weakref.WeakSet[ChoiceFanout] = weakref.WeakSet()
        self.unanswered: set[Unanswered] = set()  # requests whose response has not started
        self._closed = False

    # -- authentication and access -----------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.keys.open and not self.db.has_keys()

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> Principal:
        """The key's principal: `Authorization: Bearer <key>`, else `x-api-key: <key>` (what
        Anthropic's clients send)."""
        if self.open:
            return OPEN
        token = bearer_token(authorization) or (api_key.strip() if api_key else None)
        if not token:
            raise unauthorized(
                "Missing API key: send it in the header 'Authorization: Bearer <API_KEY>'"
                " (or 'x-api-key: <API_KEY>')"
            )
        info = self.db.authenticate(token)
        if info is not None:
            return Principal(info.account, info.id, info.rpm, info.tpm, info.role, info.user_id)
        index = self.keys.find(token)
        if index is not None:
            # the operator's keys: admins of --account (registry/roles.py)
            return Principal(self.settings.account, f"static-{index}", role=ADMIN)
        raise unauthorized()

    async def authorize(self, request: Any) -> Principal:
        """The inference routes' dependency: who is asking (401), may they now (429, 503)."""
        headers = request.headers
        principal = self.authenticate(headers.get("authorization"), headers.get("x-api-key"))
        request.state.principal = principal
        record = record_of(request)
        if record is not None:
            record.principal = principal
        if request.method == "POST":
            if self.draining:
                raise shutting_down()
            try:
                headers = self.limiter.admit(principal.limit_key, principal.rpm, principal.tpm)
            except APIError:
                self.metrics.rate_limited.inc()
                raise
            if record is not None:
                record.headers.update(headers)
        return principal

    def can_see(self, principal: Principal | None, owner: str) -> bool:
        return principal is None or principal.account is None or principal.account == owner

    def resolve(self, request: Any, model: str, deployment_header: str | None) -> Any:
        """Resolve `model` for this request's key; None (a 404) for a model of another account
        too, as if it did not exist."""
        resolved = self.registry.resolve(model, deployment_header)
        record = record_of(request)
        principal = principal_of(request)
        if resolved is None or not self.can_see(principal, resolved.model.owned_by):
            return None
        if record is not None:
            record.model = resolved.model.name
        return resolved

    def check_prompt_size(self, data: dict, context_length: int | None = None) -> None:
        """Refuse, before tokenizing or validating, a prompt too long to fit any context (the
        server's model's, or `context_length`: a deployment's): too many characters, or more
        list items (messages, content parts, token ids, tools) than the context has tokens.
        Tools count unless tool_choice is none (then the template is not given them)."""
        prompts = data.get("prompt")
        if (
            isinstance(prompts, list)
            and len(prompts) > self.settings.max_choices_per_request
            and isinstance(prompts[0], str | list)
        ):
            # a list of prompts more than the choices allowed: refused after validation anyway,
            # and each prompt's walk below took 9 s of the event loop for 5.5M empty ones
            n = data.get("n")
            self.check_choices(len(prompts), n if type(n) is int and n >= 1 else 1)
        limit = self.max_prompt_tokens or context_length or self.served.context_length
        if not limit:
            return
        max_chars = limit * MAX_CHARS_PER_TOKEN
        sizes = {
            name: _prompt_size(name, data[name], max_chars, limit)
            for name in PROMPT_FIELDS
            if name in data and (name not in TOOL_FIELDS or _renders_tools(data))
        }
        chars = sum(c for c, _ in sizes.values())
        if chars > max_chars:
            field = max(sizes, key=lambda name: sizes[name][0])  # the field with the most text
            raise context_exceeded(
                f"The prompt is too long: {chars} characters, far above the limit of {limit}"
                " tokens",
                field,
            )
        items = sum(i for _, i in sizes.values())
        if items > limit:
            # each renders to a token at least (a message its turn markers); hundreds of
            # thousands of them also took seconds of the event loop to validate
            field = max(sizes, key=lambda name: sizes[name][1])
            raise context_exceeded(
                f"The prompt is too long: {items} or more items (messages, content"
                f" parts, token ids or tools), above the limit of {limit} tokens",
                field,
            )

    def check_choices(self, num_prompts: int, n: int) -> None:
        """Refuse, before any work, a request of more engine sequences than the setting allows."""
        limit = self.settings.max_choices_per_request
        if num_prompts * n > limit:
            raise bad_request(
                f"The request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n}"
                f" choices; this server's limit is {limit} per request"
                " (--max-choices-per-request)",
                "n" if num_prompts == 1 else "prompt",
            )

    # -- the serving pipeline's hook ---------------------------------------------------------

    def check_prompt_limit(self, choices: list[Choice], field: str = "prompt") -> None:
        """`--max-prompt-tokens`: a 400 for a prompt longer than the server takes; `field`: the
        body field its prompts come from (embeddings: `input`)."""
        if self.max_prompt_tokens:
            several = len({c.prompt_index for c in choices}) > 1
            for choice in choices:
                n = len(choice.prompt_token_ids)
                if n > self.max_prompt_tokens:
                    where = f" ({field}[{choice.prompt_index}])" if several else ""
                    raise context_exceeded(
                        f"The prompt is too long{where}: {n} tokens, this server's limit is"
                        f" {self.max_prompt_tokens}",
                        field,
                    )

    async def admit(
        self,
        record: RequestRecord | None,
        choices: list[Choice],
        tier: int = 0,
        slots: int | None = None,
        field: str = "prompt",
    ) -> None:
        """Before a request's engine requests start: the prompt-length limit, then a slot in the
        admission queue of its `tier` (waits; 429 when the queue is full, 503 after the
        timeout). The record then accounts for the choices. `slots`: the slots to take when
        fewer of its choices run at once than it has (Admission.prefill_window); default one a
        choice (at most every slot). `field`: the body field the prompts come from (its 400)."""
        self.check_prompt_limit(choices, field)
        if record is None or record.admitted:
            return
        slots = self.admission.weight(slots if slots is not None else len(choices))
        try:
            record.queue_s = await self.admission.acquire(slots, tier, owner_of(record))
        except APIError:
            self.metrics.rate_limited.inc()
            raise
        record.choices = choices
        record.slots = slots  # before `admitted`: release() frees record.slots
        record.admitted = True
        self.metrics.queue_time.observe(record.queue_s)
        # tokens count as they are admitted, not only when the request ends: a huge request
        # puts its key's token bucket in debt at once, and the next ones wait
        principal = record.principal
        if principal is not None:
            prompt_tokens = sum(len(c.prompt_token_ids) for c in choices)
            self.limiter.debit(principal.limit_key, prompt_tokens, principal.tpm)
            record.prepaid_tokens = prompt_tokens

    # -- the end of a request ----------------------------------------------------------------

    def finish(self, record: RequestRecord) -> None:
        try:
            self._finish(record)
        except Exception:  # noqa: BLE001 - accounting must never break serving
            logger.exception("accounting for request %s failed", record.request_id)

    def _finish(self, record: RequestRecord) -> None:
        if record.admitted:
            record.admitted = False
            self.admission.release(record.slots, owner_of(record))
        status = record.status or 500
        endpoint = endpoint_of(record.path)
        self.metrics.requests.labels(endpoint, str(status)).inc()
        duration = time.monotonic() - record.start
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "method": record.method,
            "path": record.path if endpoint != "other" else record.path[:200],
            "status": status,
            "duration_ms": round(duration * 1000, 1),
        }
        if record.client_request_id and record.client_request_id != record.request_id:
            fields["client_request_id"] = record.client_request_id
        # a background response's end (metrics, usage) is its run's
        inference = is_inference(record) and not record.handed_off
        usage = record.usage() if inference else None
        if record.deployment is not None and usage is not None:
            ran = usage if record.choices else None  # no choices: it never reached the engine
            try:  # never at the cost of the usage row below
                self.account_metrics.record(
                    record.deployment, ended_of(record, status, duration, ran)
                )
            except Exception:  # noqa: BLE001
                logger.exception("account metrics of request %s failed", record.request_id)
        principal = record.principal
        if principal is not None and principal.key_id is not None:
            fields["account"] = principal.account
            fields["key_id"] = principal.key_id
        if usage is not None and principal is not None:  # 401s are not anyone's usage
            prompt, cached = usage.prompt_tokens, usage.cached_tokens
            completion = usage.completion_tokens
            aborted = record.aborted
            self.metrics.prompt_tokens.inc(prompt)
            self.metrics.cached_tokens.inc(cached)
            self.metrics.completion_tokens.inc(completion)
            self.metrics.duration.observe(duration)
            if aborted:
                self.metrics.aborted.inc()
            owed = prompt + completion - record.prepaid_tokens  # prompts were charged at admit
            if owed:
                self.limiter.debit(principal.limit_key, owed, principal.tpm)
            ttft = (
                record.first_token_time - record.start
                if record.first_token_time is not None
                else None
            )
            self.usage.record(
                {
                    "time": record.wall_start,
                    "request_id": record.request_id,
                    "account": principal.account,
                    "key_id": principal.key_id,
                    "model": record.model,
                    "endpoint": endpoint,
                    "status": status,
                    "stream": int(record.stream),
                    "aborted": int(aborted),
                    "num_choices": len(record.choices),
                    "prompt_tokens": prompt,
                    "cached_tokens": cached,
                    "completion_tokens": completion,
                    "queue_s": record.queue_s,
                    "ttft_s": ttft,
                    "duration_s": duration,
                    "metadata": _metadata_json(record.metadata) if record.metadata else None,
                }
            )
            fields.update(
                model=record.model,
                stream=record.stream,
                aborted=aborted,
                prompt_tokens=prompt,
                cached_tokens=cached,
                completion_tokens=completion,
            )
            if ttft is not None:
                fields["ttft_ms"] = round(ttft * 1000, 1)
        level = logging.INFO if endpoint not in ("health", "ready", "metrics") else logging.DEBUG
        access_log.log(
            level, "%s %s %d", record.method, fields["path"], status, extra={"fields": fields}
        )

    # -- state ---------------------------------------------------------------------------------

    def _gauges(self) -> dict[str, Any]:
        _, engine = self.engine_status()
        stats = {}
        if engine is not None:
            try:
                stats = dict(engine.stats())
            except Exception:  # noqa: BLE001
                stats = {}
        return {
            "ready": self.ready()[0],
            "draining": self.draining,
            "active": self.admission.num_active,
            "queued": self.admission.num_queued,
            "engine": stats,
        }

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        status, engine = self.engine_status()
        if status != "ready" or engine is None:
            return False, status
        return True, "ready"

    def track_stream(self, fanout: ChoiceFanout) -> None:
        """A stream in flight: cut with an error event if it outlasts the drain period."""
        self._streams.add(fanout)

    def start_draining(self) -> None:
        if not self.draining:
            self.draining = True
            logger.info(
                "draining: %d choice(s) in flight, %d request(s) queued",
                self.admission.num_active,
                self.admission.num_queued,
            )
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.drain_started.set()
                return
            # called from a signal handler: the event's waiters are woken from the loop
            loop.call_soon_threadsafe(self.drain_started.set)
            loop.call_soon_threadsafe(self.admission.close, shutting_down)
            # a second before uvicorn cuts the connections: time for the error event to go out
            loop.call_later(max(0.0, self.settings.drain_seconds - 1.0), self._cut_streams)

    def cut_now(self) -> None:
        """The server stops without waiting (a second Ctrl-C): end what runs now, as the drain
        period's end would (called from the signal handler, on the loop's thread)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_soon_threadsafe(
            self.cut_in_flight,
            "The server was stopped before this response was done; retry the request",
        )

    def _cut_streams(self) -> None:
        self.cut_in_flight(
            "The server is shutting down and its drain period ended before this response did;"
            " retry the request"
        )

    def cut_in_flight(self, message: str) -> None:
        """End every request still running with a 503 saying `message`: a stream with an error
        event, a request not answered yet with the error as its response (DrainCut)."""
        streams = list(self._streams)
        if streams:
            logger.warning("drain period over: ending %d stream(s) with an error", len(streams))
        for fanout in streams:
            fanout.cut(unavailable(message))
        cut = [entry for entry in self.unanswered if entry.message is None]
        if cut:
            logger.warning("drain period over: answering %d request(s) 503", len(cut))
        for entry in cut:
            entry.message = message
            entry.task.cancel(msg="the drain period ended")

    def close(self) -> None:
        """Write every usage row still queued (the end of a clean shutdown)."""
        if self._closed:
            return
        self._closed = True
        self.usage.close()


def shutting_down() -> APIError:
    """The 503 of a request that a stopping server will not run."""
    return APIError(
        503,
        "The server is shutting down; retry on another replica",
        type="service_unavailable",
        code="UNAVAILABLE",
        headers={"Retry-After": "1"},
    )


def _renders_tools(data: dict) -> bool:
    """Whether the body's tools go into its prompt: not under tool_choice none (OpenAI's
    "none", Anthropic's {"type": "none"}, the legacy function_call "none")."""
    choice = data.get("tool_choice", data.get("function_call"))
    return not (choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"))


# Content parts' media (chat's image_url/video_url objects), left out of a prompt's text size.
MEDIA_PARTS = ("image_url", "video_url")  # chat's parts, Responses' input_image's URL


def _prompt_size(name: str, value: Any, max_chars: int, max_items: int) -> tuple[int, int]:
    """`prompt_size` of field `name`: a completions `prompt` list of texts or token-id lists is
    several prompts, each bounded by the context alone (its largest counts); any other field
    (a token-id list included) makes one prompt."""
    if name == "prompt" and isinstance(value, list) and value and isinstance(value[0], str | list):
        return max((prompt_size(v, max_chars, max_items) for v in value), key=min_tokens_of)
    return prompt_size(value, max_chars, max_items)


def prompt_size(
    value: Any, max_chars: int = sys.maxsize, max_items: int = sys.maxsize
) -> tuple[int, int]:
    """(characters of text, list items) in a prompt or messages value, strings and lists
    anywhere inside it; the count stops once either passes its max (a body of a million
    messages is not walked whole). An image part's URL (an Anthropic image block's source) is
    no text of the prompt (a data: URL is megabytes; the image is mm_tokens_per_image tokens):
    it is not counted."""
    chars = items = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            chars += len(item)
            if chars > max_chars:
                break
        elif depth > 8:
            continue
        elif isinstance(item, list):
            items += len(item)
            if items > max_items:
                break
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            # an Anthropic image block's `source` (its base64 data, or URL) is no text either
            image = item.get("type") == "image"
            stack.extend(
                (v, depth + 1)
                for k, v in item.items()
                if k not in MEDIA_PARTS and not (image and k == "source")
            )
    return chars, items


def min_tokens_of(size: tuple[int, int]) -> int:
    """The fewest tokens a prompt of `prompt_size` can take: a token stands for
    MAX_CHARS_PER_TOKEN characters at most, and each list item for one token at least."""
    chars, items = size
    return max(-(-chars // MAX_CHARS_PER_TOKEN), items)


def min_tokens(value: Any) -> int:
    """`min_tokens_of` a prompt value: the key to pick the largest of several prompts."""
    return min_tokens_of(prompt_size(value))


__all__ = ["ServerOps", "endpoint_of"]
