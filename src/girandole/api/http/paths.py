"""Requests whose method or path names no route exactly: a trailing slash, HEAD, OPTIONS, and the
`Allow` header of a 405.

- A trailing slash (`POST /v1/completions/`) is served as the path without it when that path
  names a route: no redirect (httpx, under the openai SDK, does not follow one for a POST, and a
  redirected POST is surprising). The request is tracked, billed and logged under the path
  without the slash. A path that names no route either way is a 404 naming it.
- HEAD is answered as GET without a body (FastAPI's GET routes take no HEAD). HEAD on a route
  without GET is a 405, whose body HTTP drops.
- OPTIONS without CORS' preflight headers (CORS answers those before the app) is a 204 with
  `Allow` on a path that names a route.
- A 405's `Allow` lists every method the path takes: Starlette's names only the methods of the
  first route whose path matched (PUT on the deployments list said `Allow: POST`, not GET).
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# the methods routes are declared with; HEAD and OPTIONS follow from them here
_DECLARED = ("GET", "POST", "PUT", "PATCH", "DELETE")


class _Routes:
    """Asks the app's routes which of them a method and path would reach (no routing done)."""

    def __init__(self, router: Any) -> None:
        self.router = router

    def best(self, scope: Scope, path: str, method: str) -> Match:
        probe = {
            "type": "http",
            "method": method,
            "path": path,
            "root_path": scope.get("root_path", ""),
            "headers": [],
            "query_string": b"",
        }
        best = Match.NONE
        route: BaseRoute
        for route in self.router.routes:
            match, _ = route.matches(probe)
            if match is Match.FULL:
                return match
            if match is Match.PARTIAL:
                best = match
        return best

    def names(self, scope: Scope, path: str) -> bool:
        """Some route has this path, whatever its methods."""
        return self.best(scope, path, "GET") is not Match.NONE

    def allowed(self, scope: Scope) -> list[str]:
        path = scope["path"]
        methods = [m for m in _DECLARED if self.best(scope, path, m) is Match.FULL]
        if "GET" in methods:
            methods.insert(1, "HEAD")
        return [*methods, "OPTIONS"] if methods else []


class TrailingSlashes:
    """ASGI middleware: `/x/` served as `/x` when `/x` names a route. Outside the request
    tracking, which labels metrics and usage rows by path."""

    def __init__(self, app: ASGIApp, router: Any) -> None:
        self.app = app
        self.routes = _Routes(router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            bare = path.rstrip("/") or "/"
            if self.routes.names(scope, bare):
                scope = dict(scope, path=bare)  # a copy: the server's own scope is left as sent
                raw = scope.get("raw_path")
                if isinstance(raw, bytes):
                    scope["raw_path"] = raw.rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


class MethodFallbacks:
    """ASGI middleware: HEAD as GET without the body, OPTIONS with `Allow`, a 405's `Allow`
    complete."""

    def __init__(self, app: ASGIApp, router: Any) -> None:
        self.app = app
        self.routes = _Routes(router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method == "OPTIONS":
            allowed = self.routes.allowed(scope)
            if allowed:
                await Response(status_code=204, headers={"Allow": ", ".join(allowed)})(
                    scope, receive, send
                )
                return
        head = method == "HEAD"

        async def send_fixed(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                allowed = self.routes.allowed(scope)
                if allowed:
                    MutableHeaders(scope=message)["Allow"] = ", ".join(allowed)
            elif head and message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}  # Content-Length stays the GET's
            await send(message)

        # a copy for HEAD: the server (uvicorn) reads its own scope's HEAD and sends no body
        inner = dict(scope, method="GET") if head else scope
        await self.app(inner, receive, send_fixed)
