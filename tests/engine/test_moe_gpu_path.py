"""A mixture-of-experts model (the tiny Qwen3-MoE) on the engine's GPU path (Triton paged
attention, GpuSampler), run on CPU under Triton's interpreter: the MoE block's torch code runs
there as on the CPU path, so greedy tokens and the reported routing equal the CPU path's."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
pytest.importorskip("triton")

from girandole import LLM, SamplingParams  # noqa: E402

PROMPTS = [[5 + (i * 7) % 200 for i in range(7)], [3, 9, 27]]


def test_greedy_and_routing_equal_cpu_path(tiny_qwen3_moe_dir):
    common = dict(mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01)
    cpu = LLM(model=str(tiny_qwen3_moe_dir), **common)
    gpu = LLM(model=str(tiny_qwen3_moe_dir), gpu_path=True, **common)
    assert gpu.engine.runner.gpu_path and gpu.engine.runner.graphs is None
    params = SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, logprobs=0, routing_matrix=True
    )
    want, got = cpu.generate(PROMPTS, params), gpu.generate(PROMPTS, params)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        np.testing.assert_array_equal(
            np.stack([r.routing for r in a.logprobs]), np.stack([r.routing for r in b.logprobs])
        )
