"""Fireworks-shaped error bodies, and the exception that carries one to the HTTP layer.

Validation errors are worded as Fireworks words them: pydantic's message followed by the field,
e.g. `Extra inputs are not permitted, field: 'reset_prompt_cache', value: True`; several errors
as `2 request validation errors:\n  <first>; <second>`.

Every error body has `error.message` (what both SDKs read). The shape follows what Fireworks
was seen to return:

    {"error": {"object": "error", "type": "invalid_request_error", "code": "invalid_request_error",
               "message": "...", "param": "temperature"}, "request_id": "..."}

404 for a model uses Fireworks' exact message and code (`NOT_FOUND`), which some clients match.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from girandole.api.http.disconnect import CLIENT_CLOSED, ClientDisconnected

if TYPE_CHECKING:
    from girandole.registry.deployments import DeploymentError

logger = logging.getLogger("girandole.api")

MODEL_NOT_FOUND = "Model not found, inaccessible, and/or not deployed"


class APIError(Exception):
    """An error answered with a Fireworks error body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.code = code or type
        self.param = param
        self.headers = headers or {}

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        return {
            "error": {
                "object": "error",
                "type": self.type,
                "code": self.code,
                "message": self.message,
                "param": self.param,
            },
            "request_id": request_id or new_request_id(),
        }

    def response(self, request_id: str | None = None) -> JSONResponse:
        return JSONResponse(
            self.body(request_id), status_code=self.status_code, headers=self.response_headers()
        )

    def response_headers(self) -> dict[str, str]:
        """Its headers, with `x-should-retry: false` on a 409: the Stainless SDKs (openai,
        fireworks-ai, anthropic) retry a 409 twice unless told not to, and a conflict (an id
        taken, the last admin) answers the same again."""
        if self.status_code == 409 and "x-should-retry" not in self.headers:
            return {**self.headers, "x-should-retry": "false"}
        return self.headers


def new_request_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def deployment_error(exc: DeploymentError) -> APIError:
    """The API's error for a control plane's DeploymentError (a deployment that cannot serve, an
    adapter that does not fit): its status, words, code, param and headers."""
    return APIError(
        exc.status,
        exc.message,
        type=exc.type or "invalid_request_error",
        code=exc.code,
        param=exc.param,
        headers=exc.headers,
    )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found() -> APIError:
    return APIError(404, MODEL_NOT_FOUND, type="error", code="NOT_FOUND", param="model")


def unauthorized(message: str = "The API key you provided is invalid.") -> APIError:
    return APIError(
        401,
        message,
        type="authentication_error",
        code="UNAUTHORIZED",
        headers={"WWW-Authenticate": "Bearer"},
    )


def payload_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"Request body is larger than the server's limit of {limit} bytes",
        code="PAYLOAD_TOO_LARGE",
    )


def unsupported_media_type(message: str) -> APIError:
    return APIError(415, message, code="UNSUPPORTED_MEDIA_TYPE")


def unavailable(message: str) -> APIError:
    return APIError(
        503, message, type="service_unavailable", code="UNAVAILABLE", headers={"Retry-After": "1"}
    )


def too_many_requests(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="RESOURCE_EXHAUSTED")


def internal_error() -> APIError:
    return APIError(500, "Internal server error", type="internal_error", code="INTERNAL")


_MAX_VALUE_CHARS = 100


def _field_name(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def _value_text(value: Any) -> str | None:
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS] + "...'"
    return None  # objects and arrays are not repeated back


def format_error(err: dict[str, Any]) -> str:
    field = _field_name(err.get("loc", ()))
    message = err.get("msg", "Invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    text = f"{message}, field: '{field}'" if field else message
    if err.get("type") != "missing":
        value = _value_text(err.get("input"))
        if value is not None:
            text += f", value: {value}"
    return text


MAX_ERRORS_LISTED = 10  # a message names this many of a request's validation errors


def format_errors(errors: Sequence[dict[str, Any]], total: int | None = None) -> str:
    """The message of `total` errors (default len(errors)), naming the first MAX_ERRORS_LISTED:
    a body of a million bad fields gets a short answer, not one larger than itself."""
    total = len(errors) if total is None else total
    if total == 1:
        return format_error(errors[0])
    body = "; ".join(format_error(e) for e in errors[:MAX_ERRORS_LISTED])
    if total > MAX_ERRORS_LISTED:
        body += f"; and {total - MAX_ERRORS_LISTED} more"
    return f"{total} request validation errors:\n  {body}"


def first_field(errors: Sequence[dict[str, Any]]) -> str | None:
    for err in errors:
        field = _field_name(err.get("loc", ()))
        if field:
            return field
    return None


_LOCATIONS = ("query.", "path.", "header.", "cookie.")  # FastAPI's parameter locations

_STATUS_CODES = {
    400: ("invalid_request_error", "invalid_request_error"),
    404: ("error", "NOT_FOUND"),
    405: ("invalid_request_error", "METHOD_NOT_ALLOWED"),
    413: ("invalid_request_error", "PAYLOAD_TOO_LARGE"),
    415: ("invalid_request_error", "UNSUPPORTED_MEDIA_TYPE"),
    422: ("invalid_request_error", "INVALID_ARGUMENT"),
}


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the app as a Fireworks error body; nothing escapes as a bare 500."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, code = _STATUS_CODES.get(exc.status_code, ("error", "UNKNOWN"))
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        elif exc.status_code == 405:  # the methods it takes: the Allow header (http/paths.py)
            message = f"Method Not Allowed: {request.method} {request.url.path}"
        error = APIError(exc.status_code, message, type=type_, code=code, headers=exc.headers)
        if _anthropic_caller(request):  # no route ran to say so: a 404 or 405 of the router
            from girandole.api.messages.shape import anthropic_error

            request.state.error_body = anthropic_error
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        field = first_field(errors)  # "query.pageSize": the parameter is pageSize
        param = field.split(".", 1)[-1] if field and field.startswith(_LOCATIONS) else field
        return error_response(request, bad_request(format_errors(errors), param))

    @app.exception_handler(ClientDisconnected)
    async def _client_left(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; logs and metrics do

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, internal_error())


class UnhandledErrors:
    """ASGI middleware: an exception no handler took becomes the JSON 500 here, inside the
    request tracking (so it carries `x-request-id` and is counted), and goes no further.
    Starlette's last-resort handler sends the same body but then re-raises, and uvicorn closes
    the connection: a client's next request on that kept-alive connection failed too. A
    response already under way cannot be replaced: that error still ends the connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            if started:
                raise
            request = Request(scope, receive)
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            await error_response(request, internal_error())(scope, receive, send)


def request_id_of(request: Request) -> str | None:
    """The request's id: its response's, else the one its tracking record shows (the client's
    `x-request-id`, else `req-<hex>`): an error body names the id of the header and the logs."""
    request_id = getattr(request.state, "request_id", None)
    if request_id is None:
        from girandole.api.ops.tracking import record_of  # tracking imports the serving code

        record = record_of(request)
        request_id = record.request_id if record is not None else None
    return request_id


def _anthropic_caller(request: Request) -> bool:
    """A request on Anthropic's paths (/v1/messages and under it), or from the `anthropic` SDK
    (its anthropic-version header): its errors are in Anthropic's shape."""
    from girandole.api.models.anthropic import wants_anthropic  # it imports this module

    if wants_anthropic(request):
        return True
    path = request.url.path
    return any(
        path == prefix + "/messages" or path.startswith(prefix + "/messages/")
        for prefix in ("/v1", "/inference/v1")
    )


# A route of another API's shape sets `request.state.error_body` (a dependency that runs before
# authentication): Anthropic's on /messages.
ErrorBody = Callable[[APIError, str | None], dict[str, Any]]


def error_response(request: Request, error: APIError) -> JSONResponse:
    """The error in the route's body shape: Fireworks' unless the route set its own."""
    body_of: ErrorBody = getattr(request.state, "error_body", None) or APIError.body
    return JSONResponse(
        body_of(error, request_id_of(request)),
        status_code=error.status_code,
        headers=error.response_headers(),
    )
