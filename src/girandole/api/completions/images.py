"""/completions' `images` for a vision model (Fireworks: data URIs for vision models, as many as
the prompt has image placeholders). One prompt, text or token ids, with one image marker per
image where the image goes: `<start_of_image>` in a text prompt (what Gemma 3's chat template
writes for an image), its token id in a token prompt. Each marker is expanded as Gemma3Processor
expands it (blank lines, boi, the image tokens, eoi); the images are read as chat's are
(girandole.api.serving.images). A text-only model refuses `images` as before
(girandole.api.http.unsupported)."""

from __future__ import annotations

from typing import Any

from girandole.api.http.errors import bad_request
from girandole.api.serving.images import ImageMarkers, read_images
from girandole.engine.images import MAX_IMAGES_PER_REQUEST, PromptImage
from girandole.model.gemma3_vision import VisionConfig
from girandole.tokenizer.tokenizer import Tokenizer


def checked_urls(value: Any) -> list[str]:
    """`images` as a list of URL strings; a 400 naming it otherwise."""
    if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
        raise bad_request("'images' must be an array of image URLs (strings)", "images")
    if len(value) > MAX_IMAGES_PER_REQUEST:
        raise bad_request(
            f"{len(value)} images in one request: at most {MAX_IMAGES_PER_REQUEST} are allowed",
            "images",
        )
    return value


async def prompt_with_images(
    tokenizer: Tokenizer,
    prompts: list[str] | list[list[int]],
    urls: list[str],
    vision: VisionConfig,
    allow_private: bool,
) -> tuple[list[str] | list[list[int]], list[PromptImage]]:
    """The prompt with its image markers expanded (a text prompt stays text, to be tokenized
    as any), and its images; a 400 naming `images` when they and the markers do not pair up."""
    if len(prompts) != 1:
        raise bad_request("'images' go with a single prompt, not a list of prompts", "images")
    markers = ImageMarkers.of(tokenizer, vision)
    prompt = prompts[0]
    if isinstance(prompt, str):
        found = prompt.count(markers.boi)
    else:
        found = prompt.count(vision.boi_token_id)
    if found != len(urls):
        raise bad_request(
            f"'images' has {len(urls)} images but the prompt has {found} image markers "
            f"({markers.boi}, or its token id {vision.boi_token_id} in a token prompt): each "
            "image goes where the prompt has one",
            "images",
        )
    fields = [(f"images.{k}", url) for k, url in enumerate(urls)]
    images = await read_images(fields, vision, allow_private=allow_private)
    if isinstance(prompt, str):
        return [markers.expand(prompt)], images
    full = tokenizer.encode(markers.full, add_bos=False)
    ids: list[int] = []
    for token in prompt:
        ids.extend(full if token == vision.boi_token_id else [token])
    return [ids], images
