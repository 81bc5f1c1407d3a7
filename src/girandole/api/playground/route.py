"""GET / and /playground serve the page; /playground/<file> its scripts and style sheet. The page
is public: it holds no data, and the API calls it makes carry the key the user gives it."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from girandole.api.http.errors import APIError

router = APIRouter(include_in_schema=False)

# the page's files and their media types; nothing else under /playground/ is served
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "images.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


@cache
def asset(name: str) -> bytes:
    return files(__package__).joinpath(name).read_bytes()


def serve(name: str) -> Response:
    # no-cache: a browser revalidates, so an upgraded server never runs an old script
    return Response(asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


@router.get("/")
@router.get("/playground")
async def page() -> Response:
    return serve("index.html")


@router.get("/playground/{name}")
async def static(name: str) -> Response:
    if name not in ASSETS:
        raise APIError(404, f"Not found: GET /playground/{name}", type="error", code="NOT_FOUND")
    return serve(name)
