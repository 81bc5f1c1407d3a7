"""Gemma 3 vision (Gemma3ForConditionalGeneration): the SigLIP tower and projector, and the text
model's logits over a prompt with an image (its tokens attending to each other both ways),
against transformers on a tiny random checkpoint written here."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from girandole.model.context import ImageBatch
from girandole.model.image_input import ImageError, decode_image, pixel_values
from girandole.model.loader import load_model

BOI, EOI, IMAGE = 297, 298, 299
TOKENS_PER_IMAGE = 4


def write_tiny_gemma3_vision(folder: Path, seed: int = 0):
    """A random Gemma3ForConditionalGeneration: 2 text layers (sliding window 5, shorter than
    the test prompt) and a 2-layer SigLIP over 32x32 images in 8x8 patches, 4 tokens an image."""
    import transformers as tf

    text = tf.Gemma3TextConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=BOI,
        eoi_token_index=EOI,
        image_token_index=IMAGE,
    )
    torch.manual_seed(seed)
    model = tf.Gemma3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # random init leaves norms and the projector at 0/identity
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif "mm_input_projection" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gemma3-vision")
    hf = write_tiny_gemma3_vision(folder)
    model, config = load_model(folder, mode="reference", device="cpu", use_cache=False)
    return hf, model, config


def test_config_names_the_image_tokens(tiny_vision):
    _, model, config = tiny_vision
    vision = config.vision
    assert vision is not None
    assert (vision.boi_token_id, vision.eoi_token_id, vision.image_token_id) == (BOI, EOI, IMAGE)
    assert vision.mm_tokens_per_image == TOKENS_PER_IMAGE and vision.image_size == 32
    assert hasattr(model, "vision")


def test_image_features_match_transformers(tiny_vision):
    hf, model, _ = tiny_vision
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf.model.get_image_features(pixels, return_dict=True).pooler_output
    got = model.vision(pixels)
    assert got.shape == (2, TOKENS_PER_IMAGE, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _prompt() -> tuple[list[int], int]:
    """Token ids with one image (boi, 4 image tokens, eoi) and the first image token's index."""
    ids = [1, 5, 6, 7, BOI, *[IMAGE] * TOKENS_PER_IMAGE, EOI, 8, 9, 10, 11, 12]
    return ids, ids.index(IMAGE)


def test_logits_with_an_image_match_transformers(tiny_vision):
    hf, model, _ = tiny_vision
    ids, start = _prompt()
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    token_types = torch.tensor([[int(i == IMAGE) for i in ids]])
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


def test_pixel_values_match_the_gemma3_image_processor(tiny_vision):
    from PIL import Image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    _, _, config = tiny_vision
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
