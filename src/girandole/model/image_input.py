"""Images into pixel values: decode PNG/JPEG/WebP/GIF bytes (Pillow; a GIF's first frame) to
RGB, then what the Gemma 3 image processor does (transformers' Gemma3ImageProcessor without
pan-and-scan): resize to the vision tower's square size (bilinear, antialiased), rescale to
[0, 1], normalise per channel."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F

from girandole.model.gemma3_vision import VisionConfig

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# Decoding a huge image takes memory and time: no side longer than this (Pillow's own
# decompression-bomb check is a warning below 2x its limit).
MAX_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """Bytes that are not an image girandole can read; the message says why."""


def decode_image(data: bytes) -> torch.Tensor:
    """PNG/JPEG/WebP/GIF bytes -> uint8 RGB [3, H, W] (alpha dropped, palettes expanded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"the image is {img.width}x{img.height} pixels, too large")
            rgb = img.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ImageError("not a PNG, JPEG, WebP or GIF image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"the image cannot be decoded ({exc})") from None
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def pixel_values(rgb: torch.Tensor, config: VisionConfig) -> torch.Tensor:
    """uint8 RGB [3, H, W] -> float32 [3, S, S] as the vision tower takes it."""
    size = config.image_size
    x = rgb.float()[None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(0, 255)
        x = x.round()  # the processor resizes uint8 pixels, which stay uint8
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    return ((x * config.rescale_factor - mean) / std)[0]
