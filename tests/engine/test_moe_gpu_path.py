"""Mixture-of-experts models (the tiny Qwen3-MoE and Mixtral) on the engine's GPU path (Triton
paged attention, the fused MoE kernel, GpuSampler, decode graphs), run on CPU under Triton's
interpreter: greedy tokens and the reported routing equal the CPU path's, whose MoE block is the
torch dispatch. Each test counts the fused kernel's calls, so the equality is the kernel's."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
pytest.importorskip("triton")

from girandole import LLM, SamplingParams  # noqa: E402
from girandole.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from girandole.model.kernels import triton_moe  # noqa: E402
from girandole.model.moe import SparseMoE  # noqa: E402

PROMPTS = [[5 + (i * 7) % 200 for i in range(7)], [3, 9, 27]]
COMMON = dict(mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01)


@pytest.fixture
def fused_calls(monkeypatch):
    """The fused MoE kernel's calls: their token counts, in order."""
    calls = []
    fused = triton_moe.fused_moe

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return fused(x, *args, **kwargs)

    monkeypatch.setattr(triton_moe, "fused_moe", spy)
    return calls


@pytest.fixture
def graph_runs(monkeypatch):
    """The decode steps that ran through the graphs' static buffers: their row counts."""
    runs = []
    run = DecodeGraphs.run

    def spy(self, ids, positions, ctx):
        runs.append(ids.shape[0])
        return run(self, ids, positions, ctx)

    monkeypatch.setattr(DecodeGraphs, "run", spy)
    return runs


def _moe_layers(llm) -> list[SparseMoE]:
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, SparseMoE)]


def test_greedy_and_routing_equal_cpu_path(tiny_qwen3_moe_dir, fused_calls, graph_runs):
    """Router replay: the steps that record routing run eagerly (a graph appends no ids), and
    their MoE layers run the fused kernel."""
    cpu = LLM(model=str(tiny_qwen3_moe_dir), **COMMON)
    gpu = LLM(model=str(tiny_qwen3_moe_dir), gpu_path=True, **COMMON)
    assert gpu.engine.runner.gpu_path and gpu.engine.runner.graphs is not None
    assert all(m.stacked is not None for m in _moe_layers(gpu))
    assert all(m.stacked is None for m in _moe_layers(cpu))
    params = SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, logprobs=0, routing_matrix=True
    )
    want, got = cpu.generate(PROMPTS, params), gpu.generate(PROMPTS, params)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        np.testing.assert_array_equal(
            np.stack([r.routing for r in a.logprobs]), np.stack([r.routing for r in b.logprobs])
        )
    assert fused_calls and not graph_runs


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_decode_graphs_equal_cpu_path(
    family, tiny_qwen3_moe_dir, tiny_mixtral_dir, fused_calls, graph_runs
):
    """MoE models decode through the graphs (their padded static buffers off CUDA), the fused
    kernel inside; the CPU path's tokens, with graphs and with --enforce-eager."""
    folder = {"qwen3_moe": tiny_qwen3_moe_dir, "mixtral": tiny_mixtral_dir}[family]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [*PROMPTS, [11, 12, 13, 14, 15]]  # 3 rows: a graph bucket of 4, one padding row
    want = [o.token_ids for o in LLM(model=str(folder), **COMMON).generate(prompts, params)]
    graphs = LLM(model=str(folder), gpu_path=True, max_num_seqs=4, **COMMON)
    assert [o.token_ids for o in graphs.generate(prompts, params)] == want
    # the decode steps of 3 rows ran as graphs: 3 steps after the prompts' step
    assert graph_runs == [3, 3, 3]
    assert 4 in fused_calls  # the padded bucket's rows, through the fused kernel
    fused_calls.clear()
    eager = LLM(model=str(folder), gpu_path=True, enforce_eager=True, **COMMON)
    assert eager.engine.runner.graphs is None
    assert [o.token_ids for o in eager.generate(prompts, params)] == want
    assert fused_calls and 4 not in fused_calls and graph_runs == [3, 3, 3]
