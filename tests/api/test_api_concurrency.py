"""32 streaming requests at once: every one completes with the right usage."""

from __future__ import annotations

import asyncio

import openai
import pytest
from api_helpers import API_KEY, MODEL

pytestmark = pytest.mark.slow

CLIENTS = 32
MAX_TOKENS = 6


def test_32_concurrent_streams(server, tokenizer):
    prompts = [f"Request number {i} says:" for i in range(CLIENTS)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, list]:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return prompt, [chunk async for chunk in stream]

    async def run() -> list:
        client = openai.AsyncOpenAI(
            api_key=API_KEY, base_url=server.url + "/inference/v1", max_retries=0, timeout=300
        )
        async with client:
            return await asyncio.gather(*[one(client, p) for p in prompts])

    results = asyncio.run(run())
    assert len(results) == CLIENTS
    for prompt, chunks in results:
        usage = chunks[-1].usage
        assert chunks[-1].choices == []
        assert usage.completion_tokens == MAX_TOKENS
        assert usage.prompt_tokens == len(tokenizer.encode(prompt))
        finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert [c.choices[0].finish_reason for c in finishes] == ["length"]
        assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert server.wait_idle()["engine"]["kv_blocks_used"] == 0
