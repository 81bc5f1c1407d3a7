"""Anthropic's image blocks as chat's image_url parts: a base64 source becomes a data: URL (its
media_type checked against the bytes, as Anthropic checks it), a URL source its URL. Chat's
path then reads them (girandole.api.serving.images) for a vision model, or refuses them for a
text-only one."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from girandole.api.http.errors import bad_request
from girandole.api.messages.schema import Base64Source, ImageBlock, URLSource

IMAGE = "image_url"
ImagePart = dict[str, Any]  # chat's {"type": "image_url", "image_url": {"url": ...}}

# the first bytes of each media type Anthropic takes
_SIGNATURES = {
    "image/png": lambda head: head.startswith(b"\x89PNG\r\n\x1a\n"),
    "image/jpeg": lambda head: head.startswith(b"\xff\xd8\xff"),
    "image/gif": lambda head: head.startswith((b"GIF87a", b"GIF89a")),
    "image/webp": lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP",
}


def image_part(block: ImageBlock, where: str) -> ImagePart:
    """The chat part of an image block at `where` (a user turn's); a 400 for a file source or
    base64 data whose bytes are not its media_type."""
    source = block.source
    if isinstance(source, URLSource):
        return {"type": IMAGE, "image_url": {"url": source.url}}
    if not isinstance(source, Base64Source):
        raise bad_request(
            "Image blocks with a 'file' source are not supported: this server has no Anthropic"
            f" Files API; send the image as base64 or a URL, field: '{where}.source'",
            f"{where}.source",
        )
    seen = _media_type(source.data)
    if seen is not None and seen != source.media_type:
        at = f"{where}.source.media_type"
        raise bad_request(
            f"Image does not match the provided media type {source.media_type} (the data is"
            f" {seen}), field: '{at}'",
            at,
        )
    return {"type": IMAGE, "image_url": {"url": f"data:{source.media_type};base64,{source.data}"}}


def _media_type(data: str) -> str | None:
    """The media type the base64 `data` starts as; None when unknown or not base64 (chat's
    reading of the data: URL then says what is wrong)."""
    try:
        head = base64.b64decode(data[:16], validate=True)
    except (binascii.Error, ValueError):
        return None
    return next((kind for kind, match in _SIGNATURES.items() if match(head)), None)
