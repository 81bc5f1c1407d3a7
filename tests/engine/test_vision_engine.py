"""A vision model in the engine (Gemma 3 with images, engine/images.py), on the tiny random
Gemma3ForConditionalGeneration of tests/conftest.py: greedy tokens as transformers generates
them, an image never split across prefill chunks, and a prefix cache keyed by the image."""

from __future__ import annotations

import pytest
import torch

from girandole import SamplingParams
from girandole.engine.engine import EngineConfig, LLMEngine
from girandole.engine.images import MAX_IMAGES_PER_REQUEST, PromptImage


def _pixels(seed: int) -> torch.Tensor:
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _engine(folder, **overrides) -> LLMEngine:
    config = dict(model=str(folder), mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01)
    return LLMEngine(EngineConfig(**(config | overrides)))


def _prompt(engine: LLMEngine, before: int = 3, images: int = 1) -> list[int]:
    """`before` text tokens, then each image as boi, its image tokens and eoi, then text."""
    v = engine.model_config.vision
    ids = [engine.model_config.bos_token_id, *range(40, 40 + before - 1)]
    for i in range(images):
        ids += [v.boi_token_id, *[v.image_token_id] * v.mm_tokens_per_image, v.eoi_token_id]
        ids += [60 + i, 61 + i]
    return ids


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], list[torch.Tensor]]], **params):
    """request id -> (tokens, first token's logprob, cached prompt tokens)."""
    sampling = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0, **params)
    for rid, (ids, pixels) in requests.items():
        images = [PromptImage.from_pixels(p) for p in pixels]
        engine.add_request(rid, ids, sampling, images=images)
    out: dict[str, list] = {rid: [[], None, 0] for rid in requests}
    while engine.has_unfinished_requests():
        for o in engine.step():
            got = out[o.request_id]
            if got[1] is None and o.logprobs:
                got[1] = o.logprobs[0].logprob
            got[0] += o.new_token_ids
            got[2] = o.num_cached_tokens
    return {rid: tuple(v) for rid, v in out.items()}


@pytest.mark.parametrize("budget", [512, 6])
def test_greedy_tokens_match_transformers(tiny_vision, budget):
    """Budget 6: the first chunk would end inside the image (its tokens are 4..7): it ends
    before the image, whose tokens all go in the next chunk."""
    folder, hf = tiny_vision
    engine = _engine(folder, max_num_batched_tokens=budget)
    ids = _prompt(engine)
    pixels = _pixels(1)
    tokens, _, _ = _run(engine, {"a": (ids, [pixels])})["a"]
    image_id = engine.model_config.vision.image_token_id
    with torch.no_grad():
        want = hf.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels[None],
            token_type_ids=torch.tensor([[int(t == image_id) for t in ids]]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
        )[0, len(ids) :].tolist()
    assert tokens == want


def test_the_prefix_cache_is_keyed_by_the_image(tiny_vision):
    folder, _ = tiny_vision
    engine = _engine(folder)
    ids = _prompt(engine)  # block 0: bos, 2 text tokens, boi; the image's tokens: block 1
    first = _run(engine, {"a": (ids, [_pixels(1)])})["a"]
    other = _run(engine, {"b": (ids, [_pixels(2)])})["b"]
    again = _run(engine, {"c": (ids, [_pixels(1)])})["c"]
    fresh = _run(_engine(folder), {"d": (ids, [_pixels(2)])})["d"]
    # another image: only the text block before it is reused, and its answer is its own
    assert other[2] == 4
    assert other[0] == fresh[0] and other[1] == pytest.approx(fresh[1], abs=1e-5)
    assert other[1] != pytest.approx(first[1], abs=1e-4)
    # the same image: its blocks are reused, and the answer is the same
    assert again[2] >= 8
    # (rounding aside: the rows after a cached image take the native attention kernel)
    assert again[0] == first[0] and again[1] == pytest.approx(first[1], abs=1e-5)


def test_images_in_one_batch_keep_to_their_own_requests(tiny_vision):
    folder, _ = tiny_vision
    engine = _engine(folder)
    ids = _prompt(engine, images=2)
    alone = {
        rid: _run(_engine(folder), {rid: (ids, pixels)})[rid]
        for rid, pixels in (("x", [_pixels(3), _pixels(4)]), ("y", [_pixels(4), _pixels(3)]))
    }
    together = _run(
        engine, {"x": (ids, [_pixels(3), _pixels(4)]), "y": (ids, [_pixels(4), _pixels(3)])}
    )
    for rid in "xy":
        assert together[rid][0] == alone[rid][0]
        assert together[rid][1] == pytest.approx(alone[rid][1], abs=1e-5)
    assert alone["x"][1] != pytest.approx(alone["y"][1], abs=1e-4)


def test_images_that_do_not_pair_with_the_prompt_are_refused(tiny_vision, tiny_llama_dir):
    folder, _ = tiny_vision
    engine = _engine(folder)
    one = [PromptImage.from_pixels(_pixels(1))]
    params = SamplingParams(max_tokens=1)
    with pytest.raises(ValueError, match="1 image placeholders but the request has 2 images"):
        engine.check_images(_prompt(engine), one * 2)
    with pytest.raises(ValueError, match="0 image placeholders"):
        engine.check_images([1, 40, 41], one)
    with pytest.raises(ValueError, match=f"at most {MAX_IMAGES_PER_REQUEST}"):
        engine.check_images(_prompt(engine, images=9), one * 9)
    with pytest.raises(ValueError, match="more than a step's token budget"):
        _engine(folder, max_num_batched_tokens=3, max_num_seqs=3).check_images(_prompt(engine), one)
    text_only = _engine(tiny_llama_dir)
    with pytest.raises(ValueError, match="this model takes text only"):
        text_only.add_request("t", [1, 2, 3], params, images=one)
    assert not engine.has_unfinished_requests()
