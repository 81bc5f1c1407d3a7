"""The KV cache's element type (engine/kv_groups.kv_cache_dtype): float16 on CPU in fast mode
where the native attention reads every layer (half the bytes, twice the tokens), float32 in
reference mode and on request; the same tokens from either cache on a model whose logits are
not decided by rounding."""

from __future__ import annotations

import pytest
import torch

from girandole import LLM, SamplingParams
from girandole.engine.kv_groups import kv_cache_dtype
from girandole.model import kernels

native = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")


def _llm(folder, **kwargs) -> LLM:
    return LLM(model=str(folder), device="cpu", kv_cache_gb=0.01, **kwargs)


@native
def test_float16_cache_by_default_in_fast_mode(tiny_llama_dir):
    fast = _llm(tiny_llama_dir)
    wide = _llm(tiny_llama_dir, kv_cache_dtype="float32")
    reference = _llm(tiny_llama_dir, mode="reference")
    assert fast.engine.runner.kv_dtype == torch.float16
    assert all(a.k_cache.dtype == torch.float16 for a in fast.engine.runner.attn_layers)
    assert wide.engine.runner.kv_dtype == torch.float32
    assert reference.engine.runner.kv_dtype == torch.float32
    # the same memory holds twice the blocks
    assert fast.engine.runner.num_blocks // 2 == wide.engine.runner.num_blocks
    assert fast.engine.kv_cache.max_tokens(64) > wide.engine.kv_cache.max_tokens(64)

    prompts = [[1, 5, 9, 14, 20, 33] * k for k in (1, 3, 7)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    half, full = fast.generate(prompts, params), wide.generate(prompts, params)
    for a, b in zip(half, full):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.logprob == pytest.approx(lb.logprob, abs=2e-2)
    # a seeded sampled request: the same tokens alone and beside others on the float16 cache
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    alone = fast.generate([prompts[1]], seeded)[0].token_ids
    crowd = fast.generate(prompts, [params, seeded, params])[1].token_ids
    assert alone == crowd


def test_kv_cache_dtype_choice_and_refusals():
    from girandole.model.attention import Attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    layers = [Attention(4, 2, 64, 0.125), Attention(4, 2, 64, 0.125, sliding_window=8)]
    capped = [Attention(4, 2, 64, 0.125, logit_softcap=50.0)]
    odd = [Attention(4, 2, 40, 0.125)]
    expected = torch.float16 if kernels.available() else torch.float32
    assert kv_cache_dtype("auto", cpu, "fast", layers, False) == expected
    # a layer the native kernel cannot read (soft-cap, head_dim not a multiple of 16): float32
    assert kv_cache_dtype("auto", cpu, "fast", capped, False) == torch.float32
    assert kv_cache_dtype("auto", cpu, "fast", odd, False) == torch.float32
    assert kv_cache_dtype("auto", cpu, "reference", layers, False) == torch.float32
    assert kv_cache_dtype("auto", cpu, "fast", layers, True) == torch.float32  # gpu_path on CPU
    assert kv_cache_dtype("float16", cpu, "reference", layers, False) == torch.float16
    assert kv_cache_dtype("float32", cpu, "fast", layers, False) == torch.float32
    assert kv_cache_dtype("auto", cuda, "fast", layers, True) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, float16"):
        kv_cache_dtype("fp8", cpu, "fast", layers, False)
    with pytest.raises(ValueError, match="is for a CPU cache"):
        kv_cache_dtype("float16", cuda, "fast", layers, True)
    with pytest.raises(ValueError, match="not gpu_path"):
        kv_cache_dtype("float16", cpu, "fast", layers, True)


@native
def test_float16_cache_without_native_attention_reads_in_float32(tiny_llama_dir, monkeypatch):
    """Asked for on a layer the native kernel does not read (here: forced off), the torch path
    widens the gathered keys and values: the tokens of the native path."""
    from girandole.model.kernels import paged_attention

    prompts = [[1, 5, 9, 14, 20, 33] * 3]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = _llm(tiny_llama_dir, kv_cache_dtype="float16", enforce_eager=True)
    native_tokens = llm.generate(prompts, params)[0].token_ids
    monkeypatch.setattr(paged_attention, "supported", lambda *a: False)
    assert llm.generate(prompts, params)[0].token_ids == native_tokens
