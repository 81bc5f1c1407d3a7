"""A request's images inside the engine (Gemma 3 vision): where each image's tokens sit in the
prompt, their embeddings (the vision encoder's, computed once, when the image's chunk is first
prefilled), and the three rules that keep them correct:

- a prefill chunk never ends inside an image (its tokens attend to each other both ways, so they
  are computed in one forward): `fit_chunk`;
- a KV block holding an image's tokens is keyed by the image too, so the prefix cache never
  serves one image's keys for another's (same token ids): `block_key`;
- the forward gets the image embeddings of its rows and the spans its queries see: `image_batch`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from girandole.model.context import ImageBatch

if TYPE_CHECKING:
    from girandole.engine.sequence import Sequence
    from girandole.model.gemma3_vision import VisionConfig

# Images in one request, at most (each is mm_tokens_per_image prompt tokens and one encoder run).
MAX_IMAGES_PER_REQUEST = 8


@dataclass
class PromptImage:
    """One image of a request, as the API hands it to the engine: its pixel values (the
    processor's, [3, S, S] float32) and a digest of them (the prefix cache's key)."""

    pixel_values: torch.Tensor
    digest: bytes

    @classmethod
    def from_pixels(cls, pixel_values: torch.Tensor) -> PromptImage:
        pixels = pixel_values.float().contiguous()
        return cls(pixels, hashlib.sha256(pixels.numpy().tobytes()).digest())


@dataclass
class SeqImage:
    """An image placed in a sequence: its tokens are positions [start, end)."""

    start: int
    end: int
    digest: bytes
    pixel_values: torch.Tensor | None  # dropped once the embeddings exist
    embeds: torch.Tensor | None = None  # [end - start, hidden] float32 (kept for recompute)


def place_images(
    token_ids: list[int], images: list[PromptImage], vision: VisionConfig | None
) -> list[SeqImage]:
    """Each image at its run of image tokens in the prompt; ValueError when the prompt's runs
    and the images do not pair up."""
    if not images:
        return []
    if vision is None:
        raise ValueError("images are not supported: this model takes text only")
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise ValueError(
            f"{len(images)} images in one request: at most {MAX_IMAGES_PER_REQUEST} are allowed"
        )
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(token_ids):
        if token_ids[i] == vision.image_token_id:
            j = i
            while j < len(token_ids) and token_ids[j] == vision.image_token_id:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    n = vision.mm_tokens_per_image
    if len(runs) != len(images) or any(end - start != n for start, end in runs):
        raise ValueError(
            f"the prompt has {len(runs)} image placeholders but the request has "
            f"{len(images)} images (each image is {n} image tokens)"
        )
    size = vision.image_size
    placed = []
    for (start, end), image in zip(runs, images):
        if tuple(image.pixel_values.shape) != (3, size, size):
            raise ValueError(f"image pixel values must be [3, {size}, {size}]")
        placed.append(SeqImage(start, end, image.digest, image.pixel_values))
    return placed


def fit_chunk(seq: Sequence, n: int, limit: int) -> int:
    """The prefill chunk of `n` tokens from seq.num_computed_tokens, cut before an image it
    would end inside, or stretched to that image's end when the chunk starts at (or inside)
    it, if `limit` allows; 0: the chunk must wait for a step with room for the image."""
    start = seq.num_computed_tokens
    end = start + n
    for image in seq.images:
        if image.start < end < image.end:
            if image.start > start:
                return image.start - start
            return image.end - start if image.end - start <= limit else 0
    return n


def block_key(seq: Sequence, index: int, block_size: int) -> bytes:
    """What besides its token ids keys block `index` of `seq` in the prefix cache: the digests
    of the images whose tokens it holds (b"" for a text block)."""
    lo, hi = index * block_size, (index + 1) * block_size
    return b"".join(img.digest for img in seq.images if img.start < hi and lo < img.end)


def image_batch(
    seqs: list[Sequence], num_new_tokens: list[int], encoder: torch.nn.Module, device: torch.device
) -> ImageBatch | None:
    """The images among this step's new tokens, or None when it has none: embeddings for the
    image rows (encoding the images seen for the first time) and each sequence's spans."""
    rows: list[torch.Tensor] = []
    embeds: list[torch.Tensor] = []
    spans: list[list[tuple[int, int]]] = []
    offset = 0
    for seq, n in zip(seqs, num_new_tokens):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        mine: list[tuple[int, int]] = []
        for image in seq.images:
            if image.end <= start or image.start >= end:
                continue
            assert image.end <= end, "a prefill chunk ended inside an image"
            if image.embeds is None:
                image.embeds = encoder(image.pixel_values[None].to(device))[0].float()
                image.pixel_values = None
            lo = max(image.start, start)  # a prefix-cache hit may end inside the image
            rows.append(torch.arange(lo, image.end) - start + offset)
            embeds.append(image.embeds[lo - image.start :])
            mine.append((image.start, image.end))
        spans.append(mine)
        offset += n
    if not rows:
        return None
    return ImageBatch(torch.cat(rows).to(device), torch.cat(embeds).to(device), spans)
