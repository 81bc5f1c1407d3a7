"""A request's images for a vision model (Gemma 3 4B and up): chat's `image_url` parts and
/completions' `images`. Each URL read (a base64 `data:` URL, or fetched over http(s) with a size
limit and a timeout), decoded and preprocessed off the event loop, in prompt order; and the image
marker in the prompt's text expanded as transformers' Gemma3Processor expands it.

Every problem is a 400 naming the field: `messages.{i}.content.{j}.image_url.url`, `images.{k}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass

import httpx

from girandole.api.http.errors import bad_request
from girandole.engine.images import PromptImage
from girandole.model.gemma3_vision import VisionConfig
from girandole.model.image_input import ImageError, decode_image, pixel_values
from girandole.tokenizer.tokenizer import Tokenizer

MAX_IMAGE_BYTES = 20 << 20  # one image's file, as sent or fetched
FETCH_TIMEOUT_S = 10.0


async def read_images(urls: list[tuple[str, str]], vision: VisionConfig) -> list[PromptImage]:
    """The images at `urls` ((field path, url) each, in prompt order) as the engine takes them;
    a 400 naming the field of one that cannot be read."""
    images = []
    for where, url in urls:
        data = await _read(url, where)
        try:
            images.append(await asyncio.to_thread(_prepare, data, vision))
        except ImageError as exc:
            raise bad_request(f"{exc}, field: '{where}'", where) from None
    return images


def _prepare(data: bytes, vision: VisionConfig) -> PromptImage:
    return PromptImage.from_pixels(pixel_values(decode_image(data), vision))


async def _read(url: str, where: str) -> bytes:
    if url.startswith("data:"):
        return _data_url(url, where)
    if re.match(r"https?://", url, re.IGNORECASE):
        return await _fetch(url, where)
    shown = url if len(url) <= 60 else url[:60] + "..."
    raise bad_request(
        f"An image URL must be a base64 data: URL or an http(s):// URL, got {shown!r}, field: "
        f"'{where}'",
        where,
    )


def _data_url(url: str, where: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad_request(
            f"A data: URL must be base64 (data:image/png;base64,...), field: '{where}'", where
        )
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise bad_request(_too_big(where), where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"The data: URL is not valid base64, field: '{where}'", where) from None


def _too_big(where: str) -> str:
    return f"The image is larger than {MAX_IMAGE_BYTES >> 20} MB, field: '{where}'"


async def _fetch(url: str, where: str) -> bytes:
    """The URL's body, at most MAX_IMAGE_BYTES, within FETCH_TIMEOUT_S."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT_S):
            async with httpx.AsyncClient(follow_redirects=True, timeout=FETCH_TIMEOUT_S) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise bad_request(
                            f"Fetching the image failed: HTTP {response.status_code}, field: "
                            f"'{where}'",
                            where,
                        )
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_IMAGE_BYTES:
                            raise bad_request(_too_big(where), where)
                    return bytes(body)
    except TimeoutError:
        raise bad_request(
            f"Fetching the image took longer than {FETCH_TIMEOUT_S:g} s, field: '{where}'", where
        ) from None
    except (httpx.HTTPError, ValueError) as exc:
        raise bad_request(f"Fetching the image failed ({exc}), field: '{where}'", where) from None


@dataclass(frozen=True)
class ImageMarkers:
    """How an image's marker in the rendered chat (`boi`: the chat template writes
    <start_of_image> for an image part) becomes its tokens, as Gemma3Processor does it: blank
    lines, boi, mm_tokens_per_image image tokens, eoi, blank lines; tokenized with the text."""

    boi: str
    full: str

    @classmethod
    def of(cls, tokenizer: Tokenizer, vision: VisionConfig) -> ImageMarkers:
        boi, image, eoi = (
            tokenizer.id_to_token(i)
            for i in (vision.boi_token_id, vision.image_token_id, vision.eoi_token_id)
        )
        if boi is None or image is None or eoi is None:
            raise bad_request("This model's tokenizer lacks its image tokens", "messages")
        return cls(boi, f"\n\n{boi}{image * vision.mm_tokens_per_image}{eoi}\n\n")

    def expand(self, text: str, mark: str | None = None) -> str:
        """`text` with every marker expanded; `mark`: a marker right after it is a user's
        string read as text (safe tokenization), left as it is."""
        if mark is None:
            return text.replace(self.boi, self.full)
        pattern = f"(?<!{re.escape(mark)}){re.escape(self.boi)}"
        return re.sub(pattern, lambda _: self.full, text)
