"""Gemma 3 vision (Gemma3ForConditionalGeneration): the SigLIP tower and projector, and the text
model's logits over a prompt with an image (its tokens attending to each other both ways),
against transformers on the tiny random checkpoint of tests/conftest.py."""

from __future__ import annotations

import io

import pytest
import torch

from girandole.model.context import ImageBatch
from girandole.model.image_input import ImageError, decode_image, pixel_values
from girandole.model.loader import load_model

TOKENS_PER_IMAGE = 4  # the tiny checkpoint's (tests/conftest.py: write_tiny_gemma3_vision)


@pytest.fixture(scope="module")
def loaded(tiny_vision):
    folder, hf = tiny_vision
    model, config = load_model(folder, mode="reference", device="cpu", use_cache=False)
    return hf, model, config


def test_config_names_the_image_tokens(loaded):
    hf, model, config = loaded
    vision = config.vision
    assert vision is not None
    ids = (vision.boi_token_id, vision.eoi_token_id, vision.image_token_id)
    assert ids == (hf.config.boi_token_id, hf.config.eoi_token_id, hf.config.image_token_id)
    assert vision.mm_tokens_per_image == TOKENS_PER_IMAGE and vision.image_size == 32
    assert hasattr(model, "vision")


def test_image_features_match_transformers(loaded):
    hf, model, _ = loaded
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf.model.get_image_features(pixels, return_dict=True).pooler_output
    got = model.vision(pixels)
    assert got.shape == (2, TOKENS_PER_IMAGE, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _prompt(config) -> tuple[list[int], int]:
    """Token ids with one image (boi, 4 image tokens, eoi) and the first image token's index."""
    v = config.vision
    image = [v.boi_token_id, *[v.image_token_id] * TOKENS_PER_IMAGE, v.eoi_token_id]
    ids = [1, 50, 60, 70, *image, 80, 90, 100, 110, 120]
    return ids, ids.index(v.image_token_id)


def test_logits_with_an_image_match_transformers(loaded):
    hf, model, config = loaded
    ids, start = _prompt(config)
    image_id = config.vision.image_token_id
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    token_types = torch.tensor([[int(i == image_id) for i in ids]])
    with torch.no_grad():
        want = hf(
            input_ids=torch.tensor([ids]), pixel_values=pixels, token_type_ids=token_types
        ).logits[0]
    end = start + TOKENS_PER_IMAGE
    images = ImageBatch(
        rows=torch.arange(start, end), embeds=model.vision(pixels)[0], spans=[[(start, end)]]
    )
    positions = torch.arange(len(ids))
    hidden = model(torch.tensor(ids), positions, images)
    got = model.compute_logits(hidden)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The test can fail: causal attention over the image's tokens gives other logits.
    causal = ImageBatch(images.rows, images.embeds, spans=[[]])
    other = model.compute_logits(model(torch.tensor(ids), positions, causal))
    assert not torch.allclose(other[start:end], want[start:end], atol=1e-3)


def _png(rgb: torch.Tensor, fmt: str = "PNG") -> bytes:
    from PIL import Image

    img = Image.fromarray(rgb.permute(1, 2, 0).numpy())
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def test_pixel_values_match_the_gemma3_image_processor(loaded):
    from PIL import Image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    _, _, config = loaded
    rgb = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8, generator=torch.Generator())
    data = _png(rgb)
    assert torch.equal(decode_image(data), rgb)
    processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    want = processor(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    got = pixel_values(decode_image(data), config.vision)
    assert got.shape == want.shape == (3, 32, 32)
    # PIL's and torch's antialiased bilinear filters round differently: a level or two.
    assert (got - want).abs().max() <= 3 / 255 / 0.5


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_bytes_that_are_not_an_image_are_refused(data):
    with pytest.raises(ImageError):
        decode_image(data)
