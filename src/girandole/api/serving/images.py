"""A request's images for a vision model (Gemma 3 4B and up): chat's `image_url` parts and
/completions' `images`. Each URL read (a base64 `data:` URL, or fetched over http(s) with a size
limit and a timeout, from public addresses only unless the server allows others:
girandole.api.serving.image_fetch), decoded and preprocessed off the event loop, in prompt
order; and the image marker in the prompt's text expanded as transformers' Gemma3Processor
expands it.

Every problem is a 400 naming the field: `messages.{i}.content.{j}.image_url.url`, `images.{k}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass

from girandole.api.http.errors import bad_request
from girandole.api.serving.image_fetch import MAX_IMAGE_BYTES, fetch_image, too_big
from girandole.engine.images import PromptImage
from girandole.model.gemma3_vision import VisionConfig
from girandole.model.image_input import ImageError, decode_image, pixel_values
from girandole.tokenizer.tokenizer import Tokenizer


async def read_images(
    urls: list[tuple[str, str]], vision: VisionConfig, *, allow_private: bool
) -> list[PromptImage]:
    """The images at `urls` ((field path, url) each, in prompt order) as the engine takes them;
    a 400 naming the field of one that cannot be read. `allow_private`: http(s) URLs may be on
    non-public addresses (--allow-private-image-urls; girandole.api.serving.image_fetch)."""
    images = []
    for where, url in urls:
        data = await _read(url, where, allow_private)
        try:
            images.append(await asyncio.to_thread(_prepare, data, vision))
        except ImageError as exc:
            raise bad_request(f"{exc}, field: '{where}'", where) from None
    return images


def _prepare(data: bytes, vision: VisionConfig) -> PromptImage:
    return PromptImage.from_pixels(pixel_values(decode_image(data), vision))


async def _read(url: str, where: str, allow_private: bool) -> bytes:
    if url.startswith("data:"):
        return _data_url(url, where)
    if re.match(r"https?://", url, re.IGNORECASE):
        return await fetch_image(url, where, allow_private)
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
        raise bad_request(too_big(where), where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"The data: URL is not valid base64, field: '{where}'", where) from None


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
