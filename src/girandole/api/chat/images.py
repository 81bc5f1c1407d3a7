"""Chat's `image_url` content parts for a vision model: found in the messages, in prompt order,
and read (girandole.api.serving.images)."""

from __future__ import annotations

from girandole.api.chat.schema import ChatMessage
from girandole.api.http.errors import bad_request
from girandole.api.serving.images import read_images
from girandole.engine.images import MAX_IMAGES_PER_REQUEST, PromptImage
from girandole.model.gemma3_vision import VisionConfig


def image_parts(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """(field path, url) of every image_url part, in prompt order."""
    found = []
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if part.type == "image_url" and part.image_url is not None:
                found.append((f"messages.{i}.content.{j}.image_url.url", part.image_url.url))
    return found


async def load_images(
    messages: list[ChatMessage], vision: VisionConfig, allow_private: bool
) -> list[PromptImage]:
    """The messages' images as the engine takes them; a 400 naming the part for one that
    cannot be read, or for more than MAX_IMAGES_PER_REQUEST. `allow_private`: URLs on
    non-public addresses may be fetched."""
    parts = image_parts(messages)
    if len(parts) > MAX_IMAGES_PER_REQUEST:
        raise bad_request(
            f"{len(parts)} images in one request: at most {MAX_IMAGES_PER_REQUEST} are allowed",
            "messages",
        )
    return await read_images(parts, vision, allow_private=allow_private)
