"""CORS, as vLLM applies it: Starlette's CORSMiddleware with `--allowed-origins` (default every
origin), `--allowed-credentials` (default off), `--allowed-methods` and `--allowed-headers`
(default all). An empty origin list turns CORS off: no CORS headers, and a browser on another
origin cannot read any answer.

The middleware is the app's outermost one, so every response gets the headers (errors, the 500
of `UnhandledErrors`, streams) and a preflight (OPTIONS with `Origin` and
`Access-Control-Request-Method`) is answered before any route, key check or request tracking:
browsers send no credentials on a preflight. The real request still needs its key. Every route
shares the one policy, the admin and ops ones too: they need a key that a page must hold anyway
(a bearer header is never sent by a browser on its own, unlike a cookie).

A rejected preflight is a 400 in Fireworks' error shape (Starlette's is plain text) naming what
was not allowed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from girandole.api.http.errors import APIError

# The response headers a page may read besides the CORS-safelisted ones (its request id, when to
# retry, rate limits, Fireworks' usage headers). Named, not "*": with credentials a browser
# reads "*" as a header called "*".
EXPOSED_HEADERS = (
    "x-request-id",
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-over-limit",
    # every perf_metrics header a non-stream answer carries (api/serving/usage.py)
    "fireworks-prompt-tokens",
    "fireworks-cached-prompt-tokens",
    "fireworks-tokenizer-duration",
    "fireworks-prefill-queue-duration",
    "fireworks-prefill-duration",
    "fireworks-generation-duration",
    "fireworks-server-time-to-first-token",
    "fireworks-server-processing-time",
    "fireworks-sampling-options",
    "fireworks-speculation-prompt-tokens",
    "fireworks-speculation-prompt-matched-tokens",
    "fireworks-speculation-acceptance",
)

# An origin is scheme://host[:port], no path: a browser never sends "https://a.example/", so such
# an entry loses its slash. "null" is what a file:// page or a sandboxed frame sends.
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP method or header name


def parse_list(value: str | None) -> list[str] | None:
    """A flag's list: vLLM's JSON form (`["https://a.example"]`) or comma-separated; "" is the
    empty list; None stays None (the flag was not given)."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list: {value!r} ({exc.msg})") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"not a JSON list of strings: {value!r}")
        return [i.strip() for i in items if i.strip()]
    return [i.strip() for i in text.split(",") if i.strip()]


def check_origins(origins: Sequence[str]) -> list[str]:
    origins = [o if o in ("*", "null") else o.rstrip("/") for o in origins]
    bad = [o for o in origins if o not in ("*", "null") and not _ORIGIN.fullmatch(o)]
    if bad:
        raise ValueError(
            f"--allowed-origins: {', '.join(map(repr, bad))} is not an origin"
            " (scheme://host[:port] without a path, null, or *)"
        )
    return origins


def check_tokens(flag: str, names: Sequence[str], *, upper: bool = False) -> list[str]:
    bad = [n for n in names if n != "*" and not _TOKEN.fullmatch(n)]
    if bad:
        raise ValueError(f"{flag}: {', '.join(map(repr, bad))} is not a valid name (or *)")
    return [n.upper() for n in names] if upper else list(names)


class FireworksCORS(CORSMiddleware):
    """Starlette's CORS, with a rejected preflight answered in Fireworks' error shape."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        origins: Sequence[str],
        credentials: bool,
        methods: Sequence[str],
        headers: Sequence[str],
    ) -> None:
        super().__init__(
            app,
            allow_origins=origins,
            allow_credentials=credentials,
            allow_methods=methods,
            allow_headers=headers,
            # Chrome's Private Network Access preflight (a public page calling a server on the
            # user's machine or network): granted only to origins named on purpose. With "*"
            # (the default, as vLLM's) any web page a user opens could otherwise drive a local
            # server that has no keys.
            allow_private_network="*" not in origins,
            expose_headers=EXPOSED_HEADERS,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reasons = []
        origin = request_headers["origin"]
        if not self.is_allowed_origin(origin):
            reasons.append(f"origin {origin!r} is not in --allowed-origins")
        method = request_headers["access-control-request-method"]
        if method not in self.allow_methods:
            reasons.append(f"method {method!r} is not in --allowed-methods")
        wanted = request_headers.get("access-control-request-headers")
        if wanted and not self.allow_all_headers:
            refused = [
                h.strip() for h in wanted.split(",") if h.strip().lower() not in self.allow_headers
            ]
            if refused:
                reasons.append(f"header(s) {', '.join(refused)} not in --allowed-headers")
        if request_headers.get("access-control-request-private-network") and not (
            self.allow_private_network
        ):
            reasons.append(
                "private network access is granted only to origins named in --allowed-origins,"
                " not to *"
            )
        error = APIError(400, "CORS preflight rejected: " + ("; ".join(reasons) or "not allowed"))
        kept = {
            k: v
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "content-type")
        }
        return JSONResponse(error.body(), status_code=400, headers=kept)
