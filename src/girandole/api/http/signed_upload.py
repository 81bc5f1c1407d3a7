"""Signed file URLs served by this server itself, as a bucket's signed URLs are: what a
`:getUploadEndpoint` answers (a PUT of a declared size) and a `:getDownloadEndpoint` (a GET),
for datasets and models alike.

A URL carries an HMAC of the method, the resource and file (`accounts/<a>/<collection>/<id>`
and a flat file name), an expiry (an hour) and, for a PUT, the size declared in filenameToSize,
made with a secret of this server process: it needs no key, and a PUT of another size is a 400.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from urllib.parse import quote

from fastapi import Request
from starlette.requests import ClientDisconnect

from girandole.api.http.disconnect import ClientDisconnected
from girandole.api.http.errors import APIError, bad_request
from girandole.batch.store import is_valid_filename

URL_LIFETIME_S = 3600
_SECRET = secrets.token_bytes(32)


def _signature(method: str, resource: str, filename: str, expires: int, size: int | None) -> str:
    message = f"{method}\n{resource}/{filename}\n{expires}\n{size}".encode()
    return hmac.new(_SECRET, message, hashlib.sha256).hexdigest()


def signed_url(
    request: Request, method: str, resource: str, name: str, size: int | None = None
) -> str:
    """The URL of file `name` of `resource` (accounts/<a>/<collection>/<id>) on this server as
    the client reached it (/v1 or /inference/v1); a PUT's carries the size declared for it
    (signed: the PUT is held to it)."""
    prefix = "/inference/v1" if request.url.path.startswith("/inference/") else "/v1"
    expires = int(time.time()) + URL_LIFETIME_S
    signature = _signature(method, resource, name, expires, size)
    base = str(request.base_url).rstrip("/")
    path = f"{prefix}/{resource}/files/{quote(name)}"
    sized = "" if size is None else f"&size={size}"
    return f"{base}{path}?expires={expires}{sized}&signature={signature}"


def check_signature(
    method: str, resource: str, name: str, expires: int, signature: str, size: int | None = None
) -> None:
    expected = _signature(method, resource, name, expires, size)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise APIError(403, "The URL's signature is not valid", code="PERMISSION_DENIED")
    if expires < time.time():
        raise APIError(
            403,
            "The URL has expired: ask for a new one (:getUploadEndpoint, :getDownloadEndpoint)",
            code="PERMISSION_DENIED",
        )


def check_filename(name: str, param: str = "filename") -> None:
    """A flat file name: no path separator, never `.` or `..`."""
    if not is_valid_filename(name):
        raise bad_request(
            f"{name!r} is not a valid file name: 1-200 characters of A-Z, a-z, 0-9, '.', '_'"
            " and '-'",
            param,
        )


def check_sizes(filename_to_size: dict[str, str | int], max_bytes: int) -> dict[str, int]:
    """filenameToSize checked: at least one file, flat names, sizes of 0..max_bytes."""
    if not filename_to_size:
        raise bad_request("filenameToSize must name at least one file", "filenameToSize")
    sizes = {}
    for name, size in filename_to_size.items():
        check_filename(name, "filenameToSize")
        if not str(size).isdecimal() or int(size) > max_bytes:  # "²" is a digit, not int
            raise bad_request(
                f"filenameToSize[{name!r}]: the size must be a number of bytes up to"
                f" {max_bytes}, got {size!r}",
                "filenameToSize",
            )
        sizes[name] = int(size)
    return sizes


def file_too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"The file is larger than this server's limit of {max_bytes} bytes",
        code="PAYLOAD_TOO_LARGE",
    )


def wrong_size(name: str, declared: int, sent: str) -> APIError:
    return bad_request(
        f"The file {name!r} was declared as {declared} bytes in :getUploadEndpoint's"
        f" filenameToSize, and the PUT sent {sent}: ask for a URL with its size",
        "filenameToSize",
    )


def check_content_length(request: Request, name: str, size: int | None) -> None:
    """A PUT whose Content-Length is not its declared size: a 400 before reading any of it."""
    length = request.headers.get("content-length")
    if size is not None and length is not None and length.isdecimal() and int(length) != size:
        raise wrong_size(name, size, f"{int(length)} bytes")


async def receive_body(
    request: Request, partial: Path, name: str, max_bytes: int, declared: int | None = None
) -> int:
    """Stream the request body into `partial`, synced (413 above `max_bytes`; with `declared`,
    the size filenameToSize gave file `name`, a 400 for a body of another size). The caller
    places or removes `partial`."""
    size = 0
    limit = max_bytes if declared is None else declared
    try:
        with open(partial, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    if declared is not None:  # a chunked body: how much more is not known
                        raise wrong_size(name, declared, f"more ({size} bytes so far)")
                    raise file_too_large(max_bytes)
                f.write(chunk)
            if declared is not None and size != declared:
                raise wrong_size(name, declared, f"{size} bytes")
            f.flush()
            os.fsync(f.fileno())
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return size
