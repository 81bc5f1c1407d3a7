"""Decode-step CUDA graphs (girandole/engine/cuda_graphs.py) without CUDA: the bucket choice,
and the padded static buffers run through the eager model on CPU (the GPU path under Triton's
interpreter) giving what the unpadded step gives, touching no cache slot but the step's own
and the scratch block's."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
pytest.importorskip("triton")

from girandole import LLM, SamplingParams  # noqa: E402
from girandole.engine.cuda_graphs import batch_buckets, bucket_for  # noqa: E402
from girandole.model.context import forward_context  # noqa: E402


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(1) == [1]
    buckets = batch_buckets(64)
    assert [bucket_for(n, buckets) for n in (1, 3, 5, 9, 17, 64)] == [1, 4, 8, 16, 24, 64]
    assert bucket_for(65, buckets) is None


def _engine(model_dir, **kwargs):
    return LLM(
        model=str(model_dir),
        mode="reference",
        device="cpu",
        block_size=4,
        kv_cache_gb=0.01,
        gpu_path=True,
        max_num_seqs=8,
        **kwargs,
    )


PROMPTS = [[3, 9, 27, 81, 50], [5 + i for i in range(11)], [7, 7, 8]]


def test_padded_step_equals_the_unpadded_step(tinier_llama_dir):
    """Three decoding sequences (a bucket of 4: one padding row): the static buffers' run
    gives the eager forward's hidden states; only the step's slots and the scratch block
    change in the cache."""
    llm = _engine(tinier_llama_dir)
    engine, runner = llm.engine, llm.engine.runner
    assert runner.graphs is not None and runner.graphs.buckets == [1, 2, 4, 8]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    engine.step()  # the prompts and their first tokens
    batch = engine.scheduler.schedule()
    assert batch.num_new_tokens == [1, 1, 1]
    ids, pos, ctx = runner.prepare(batch.seqs, batch.num_new_tokens)
    assert runner.graphs.can_run(ctx)

    layer = runner.attn_layers[0]
    scratch = runner.graphs.buffers.scratch_slot
    layer.k_cache[scratch] = 123.0  # a mark the padding row's keys overwrite
    before = layer.k_cache.clone()
    with torch.inference_mode():
        with forward_context(ctx):
            eager = runner.model(ids, pos)
        after_eager = layer.k_cache.clone()
        padded = runner.graphs.run(ids, pos, ctx)
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)

    changed = (layer.k_cache != before).any(dim=(1, 2)).nonzero()[:, 0].tolist()
    assert set(changed) <= set(ctx.slot_mapping.tolist()) | {scratch}
    assert scratch in changed  # the padding row wrote there, and only there
    assert torch.equal(layer.k_cache[:scratch], after_eager[:scratch])


def test_generate_with_graphs_equals_eager_and_cpu_path(tinier_llama_dir):
    """Batches of 3 and 5 decoding sequences (padded to 4 and 8) and of 1, end to end."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = PROMPTS + [[11, 12, 13, 14], [2, 4, 6, 8, 10, 12]]
    cpu = LLM(
        model=str(tinier_llama_dir), mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01
    )
    graphs = _engine(tinier_llama_dir)
    eager = _engine(tinier_llama_dir, enforce_eager=True)
    assert eager.engine.runner.graphs is None
    for batch in (prompts[:3], prompts, prompts[:1]):
        want = [o.token_ids for o in cpu.generate(batch, params)]
        assert [o.token_ids for o in graphs.generate(batch, params)] == want
        assert [o.token_ids for o in eager.generate(batch, params)] == want


def test_generate_with_split_decode(tinier_llama_dir, monkeypatch):
    """Split-K decode (forced: a pretend 16-SM device, 4-token partitions) in the graphs'
    padded steps (their full-width block tables, padding rows) and in eager steps: the CPU
    path's tokens."""
    from girandole.model.kernels import triton_paged_attention as kernels

    # 8 SMs: 4 partitions for the graphs' bucket of 4 rows of the one KV head (64 SMs gave 32,
    # eight times the programs the interpreter runs one by one); 3 or 4 for the eager steps
    # (their short tables)
    monkeypatch.setattr(kernels, "sm_count", lambda device: 8)
    monkeypatch.setattr(kernels, "MIN_PARTITION_TOKENS", 4)
    counts = []
    split = kernels._split_decode

    def spy(*args):
        counts.append(args[10])  # num_partitions
        return split(*args)

    monkeypatch.setattr(kernels, "_split_decode", spy)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    cpu = LLM(
        model=str(tinier_llama_dir), mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01
    )
    want = [o.token_ids for o in cpu.generate(PROMPTS, params)]
    for kwargs in ({}, {"enforce_eager": True}):
        counts.clear()
        assert [
            o.token_ids for o in _engine(tinier_llama_dir, **kwargs).generate(PROMPTS, params)
        ] == want
        assert counts and min(counts) > 1, counts


def test_serve_enforce_eager_flag():
    import argparse

    from girandole.api.server import add_serve_parser, settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    assert not settings_from_args(parser.parse_args(["serve"])).enforce_eager
    assert settings_from_args(parser.parse_args(["serve", "--enforce-eager"])).enforce_eager
