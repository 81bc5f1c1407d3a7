"""A vision request's images cross the ingress-replica wire (girandole.deploy.replica_wire)
unchanged: the "add" frame's kwargs pickle PromptImage's pixels and digest as they are, so a
Ray replica gets what an embedded engine gets."""

from __future__ import annotations

import asyncio

import torch

from girandole.deploy.replica_wire import encode, read_frame
from girandole.engine.images import PromptImage
from girandole.sampling.params import SamplingParams


def test_images_cross_the_wire_unchanged():
    g = torch.Generator().manual_seed(0)
    images = [PromptImage.from_pixels(torch.randn(3, 32, 32, generator=g)) for _ in range(2)]
    message = ("add", "req-1", [2, 5, 7], SamplingParams(max_tokens=3), {"images": images})

    async def round_trip():
        reader = asyncio.StreamReader()
        reader.feed_data(encode(message))
        reader.feed_eof()
        return await read_frame(reader)

    kind, request_id, prompt, params, kwargs = asyncio.run(round_trip())
    assert (kind, request_id, prompt, params.max_tokens) == ("add", "req-1", [2, 5, 7], 3)
    for got, sent in zip(kwargs["images"], images, strict=True):
        assert got.digest == sent.digest
        assert torch.equal(got.pixel_values, sent.pixel_values)
