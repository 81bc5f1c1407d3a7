"""Images for a vision model (the tiny random Gemma 3 4B-shaped checkpoint of tests/conftest.py)
through a real server and the openai SDK, in chat's image_url parts and /completions' `images`:
data: URLs and fetched URLs, the prompt as transformers' Gemma3Processor writes it, determinism,
the image changing the answer, usage, and a 400 naming the field for every bad image."""

from __future__ import annotations

import base64
import io

import openai
import pytest
import torch
from api_helpers import API_KEY
from conftest import VISION_MODEL as MODEL

QUESTION = "What is in the quick brown fox picture?"


def _png(seed: int, size: tuple[int, int] = (40, 56), fmt: str = "PNG") -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (size[0], size[1], 3), dtype=torch.uint8, generator=g)
    out = io.BytesIO()
    Image.fromarray(rgb.numpy()).save(out, format=fmt)
    return out.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _user(*urls: str, text: str = QUESTION) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def client(vision_server):
    return openai.OpenAI(
        api_key=API_KEY, base_url=vision_server.url + "/inference/v1", max_retries=0
    )


def _processor_ids(folder, messages: list[dict], images: list[bytes]) -> list[int]:
    """The prompt as transformers writes it: the chat template, then Gemma3Processor."""
    from PIL import Image
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = AutoTokenizer.from_pretrained(folder)
    processor = Gemma3Processor(
        Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tok, image_seq_length=4
    )
    hf_messages = [
        m if isinstance(m["content"], str) else {**m, "content": [
            {"type": "image"} if p["type"] == "image_url" else p for p in m["content"]
        ]}
        for m in messages
    ]  # fmt: skip
    text = tok.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    pictures = [Image.open(io.BytesIO(d)) for d in images]
    return list(processor(text=text, images=pictures, add_special_tokens=False)["input_ids"][0])


def test_the_prompt_is_what_gemma3_processor_writes(tiny_vision):
    from girandole.api.chat.prompt import build_prompt
    from girandole.api.chat.schema import ChatCompletionRequest
    from girandole.api.serving.images import ImageMarkers
    from girandole.model.loader.safetensors import read_safetensors
    from girandole.tokenizer import load_tokenizer

    folder, _ = tiny_vision
    _, config, _ = read_safetensors(folder)
    tok = load_tokenizer(folder)
    a, b = _data_url(_png(1)), _data_url(_png(2))
    messages = [
        {"role": "system", "content": "Answer briefly."},
        _user(a, text="Compare\nthis one"),
        {"role": "assistant", "content": "A fox."},
        _user(b, a, text="and these two"),
    ]
    req = ChatCompletionRequest(model=MODEL, messages=messages)
    prompt = build_prompt(
        tok, req, config.chat_template, images=ImageMarkers.of(tok, config.vision)
    )
    want = _processor_ids(folder, messages, [_png(1), _png(2), _png(1)])
    assert prompt.token_ids == want
    assert want.count(config.vision.image_token_id) == 3 * 4


def test_an_image_is_seen_deterministically_and_counted(client, tiny_vision):
    folder, hf = tiny_vision
    kw = dict(model=MODEL, max_tokens=5, temperature=0, logprobs=True)
    a, b = _data_url(_png(1)), _data_url(_png(2))
    first = client.chat.completions.create(messages=[_user(a)], **kw)
    again = client.chat.completions.create(messages=[_user(a)], **kw)
    other = client.chat.completions.create(messages=[_user(b)], **kw)
    lp = [[t.logprob for t in r.choices[0].logprobs.content] for r in (first, again, other)]
    assert first.choices[0].message.content == again.choices[0].message.content
    assert lp[0] == pytest.approx(lp[1], abs=1e-5)
    assert lp[0][0] != pytest.approx(lp[2][0], abs=1e-4)  # another image, another answer
    # usage counts the image's tokens (boi, 4 image tokens, eoi, the blank lines) as prompt
    want = _processor_ids(folder, [_user(a)], [_png(1)])
    assert first.usage.prompt_tokens == len(want)
    # the same image again came from the prefix cache, its blocks included
    image_end = want.index(hf.config.image_token_id) + 4
    assert again.usage.prompt_tokens_details.cached_tokens >= image_end


def test_models_says_the_model_takes_images(client):
    (entry,) = [m for m in client.models.list().data if m.id == MODEL]
    assert entry.supports_image_input is True and entry.supports_chat is True


def test_jpeg_and_webp_images_are_read(client):
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        url = _data_url(_png(3, fmt=fmt), mime)
        r = client.chat.completions.create(
            model=MODEL, messages=[_user(url)], max_tokens=2, temperature=0
        )
        assert r.choices[0].finish_reason == "length"


def _bad(client, messages: list[dict]) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    return info.value


def test_bad_images_are_a_400_naming_the_part(client, vision_server):
    where = "messages.1.content.0.image_url.url"
    cases = {
        "data:image/png;base64,%%%not-base64": "not valid base64",
        _data_url(b"plain text, not a picture"): "not a PNG, JPEG, WebP or GIF image",
        "data:image/png,rawbytes": "must be base64",
        "ftp://example.com/cat.png": "must be a base64 data: URL or an http(s):// URL",
        vision_server.url + "/health": "not a PNG, JPEG, WebP or GIF image",  # fetched: JSON
        vision_server.url + "/no-such-image.png": "HTTP 404",
    }
    for url, message in cases.items():
        err = _bad(client, [{"role": "system", "content": "Be brief."}, _user(url)])
        assert message in err.message and where in err.message, (url, err.message)
        assert err.body["param"] == where


def test_too_many_images_or_images_outside_user_messages_are_a_400(client):
    url = _data_url(_png(1))
    err = _bad(client, [_user(*[url] * 9)])
    assert "at most 8" in err.message
    system = {"role": "system", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    err = _bad(client, [system, _user(url)])
    assert "user messages only" in err.message and "messages.0.content.0" in err.message
    video = {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}
    err = _bad(client, [{"role": "user", "content": [video]}])
    assert "video_url" in err.message


def test_completions_images_go_where_the_prompt_marks_them(client, tiny_vision):
    from PIL import Image
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    folder, hf = tiny_vision
    prompt = "The quick brown fox <start_of_image> jumps over"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    a, b = _data_url(_png(1)), _data_url(_png(2))
    first = client.completions.create(**kw, extra_body={"images": [a]})
    other = client.completions.create(**kw, extra_body={"images": [b]})
    assert first.choices[0].logprobs.token_logprobs[0] != pytest.approx(
        other.choices[0].logprobs.token_logprobs[0], abs=1e-4
    )
    tok = AutoTokenizer.from_pretrained(folder)
    processor = Gemma3Processor(
        Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tok, image_seq_length=4
    )
    want = list(processor(text=prompt, images=[Image.open(io.BytesIO(_png(1)))])["input_ids"][0])
    assert first.usage.prompt_tokens == len(want)
    # the same prompt as token ids, one boi token where the image goes
    ids = tok(prompt)["input_ids"]
    assert ids.count(hf.config.boi_token_id) == 1
    tokens = client.completions.create(**{**kw, "prompt": ids}, extra_body={"images": [a]})
    assert tokens.choices[0].text == first.choices[0].text
    assert tokens.choices[0].logprobs.token_logprobs == pytest.approx(
        first.choices[0].logprobs.token_logprobs, abs=1e-5
    )


def test_completions_images_that_do_not_pair_up_are_a_400(client):
    url = _data_url(_png(1))
    for prompt, images, message in (
        ("no marker here", [url], "the prompt has 0 image markers"),
        ("<start_of_image> and <start_of_image>", [url], "has 1 images but the prompt has 2"),
        (["<start_of_image>", "<start_of_image>"], [url], "a single prompt"),
        ("<start_of_image>", "not-a-list", "must be an array"),
        ("<start_of_image>", ["data:image/png;base64,AAAA"], "not a PNG, JPEG, WebP or GIF"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=1, extra_body={"images": images}
            )
        assert message in info.value.message, (prompt, info.value.message)
        assert info.value.body["param"].split(".")[0] == "images"
