"""The tiny gpt-oss checkpoint through the real engine: on the CPU path (the native paged
attention kernel, with the sinks) and on the GPU path (the Triton kernels with the sinks), run
on CPU under Triton's interpreter, with the fused MoE kernel and decode graphs; greedy tokens
equal transformers' generate."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import write_tiny_gpt_oss  # noqa: E402

from girandole import LLM, SamplingParams  # noqa: E402

PROMPTS = [[5 + (i * 7) % 200 for i in range(11)], [3, 9, 27]]
MAX_NEW = 6


def _root_conftest():
    import importlib.util

    name = "_girandole_root_conftest"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt-oss")
    hf = write_tiny_gpt_oss(folder)
    _root_conftest().write_tiny_tokenizer(folder, vocab_size=hf.config.vocab_size)
    want = []
    for ids in PROMPTS:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None
            )
        want.append(out[0, len(ids) :].tolist())
    return folder, want


@pytest.mark.parametrize("gpu_path", [False, True])
def test_engine_greedy_matches_transformers(tiny, gpu_path, monkeypatch):
    """On the GPU path the experts run in the fused MoE kernel (its clamped SwiGLU, both
    biases) and decode steps through the graphs' padded buffers: both counted."""
    fused_calls, graph_runs = [], []
    if gpu_path:
        pytest.importorskip("triton")
        from girandole.engine.cuda_graphs import DecodeGraphs
        from girandole.model.kernels import triton_moe

        fused, run = triton_moe.fused_moe, DecodeGraphs.run

        def fused_spy(x, *args, **kwargs):
            fused_calls.append(kwargs["act"])
            return fused(x, *args, **kwargs)

        def run_spy(self, ids, positions, ctx):
            graph_runs.append(ids.shape[0])
            return run(self, ids, positions, ctx)

        monkeypatch.setattr(triton_moe, "fused_moe", fused_spy)
        monkeypatch.setattr(DecodeGraphs, "run", run_spy)
    folder, want = tiny
    llm = LLM(
        model=str(folder), mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01,
        gpu_path=gpu_path,
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert got == want
    if gpu_path:
        # 3 MoE layers a forward: the prompts' step, then MAX_NEW - 1 decode steps as graphs
        assert fused_calls == ["swiglu_clamped"] * 3 * MAX_NEW
        assert graph_runs == [2] * (MAX_NEW - 1)


def test_routing_matrix_is_the_routers_choice(tiny):
    """include_routing_matrix's expert ids: each layer's top-2 of the biased router, as
    transformers' router picks them for the same positions."""
    import transformers as tf

    folder, _want = tiny
    llm = LLM(model=str(folder), mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01)
    params = SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, logprobs=0, routing_matrix=True
    )
    out = llm.generate([PROMPTS[0]], params)[0]
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    picks = []
    hooks = [
        layer.mlp.router.register_forward_hook(lambda _m, _i, o: picks.append(o[2]))
        for layer in hf.model.layers
    ]
    try:
        with torch.no_grad():
            hf(torch.tensor([PROMPTS[0] + out.token_ids[:-1]]))
    finally:
        for h in hooks:
            h.remove()
    theirs = torch.stack(picks, dim=1)  # [positions, layers, k]
    # the entry of generated token i: the routing of the position that predicted it
    for i, entry in enumerate(out.logprobs):
        pos = len(PROMPTS[0]) - 1 + i
        ours = torch.as_tensor(entry.routing)
        assert torch.equal(ours.sort(-1).values, theirs[pos].sort(-1).values)
