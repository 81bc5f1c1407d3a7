"""The mixture-of-experts block's native call (kernels/moe_experts.py, csrc/moe.c), which runs
every (token, expert) pair of a step in one OpenMP region, gives the per-expert dispatch's floats
bitwise (model/moe.py: two wq_gemm calls and an activation per expert, sums in ascending expert
order): for decode rows and prompt rows, any mix of them, 1..N rows, top-k from 1 to every
expert, experts with no rows; and an engine's greedy generation on a tiny Qwen3-MoE is the same
with either. Every expert row, prompt rows too, takes the int8 kernel (a few rows an expert in a
short prompt: the bf16 panel kernel dequantized the whole weight for them), so a prompt token's
output is the one it would have as a decode row, alone or among any others. Two tiny Qwen3-MoEs: conftest's with experts 64
wide (its 32 are too narrow for the native layout: their down projections stay on torch's int8
kernel), float weights packed as 8-bit groups; and test_moe_gguf's 256-wide Q4_K_M file (4-bit
Q4_K gate/up, Q6_K down in Q6_K's own format)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from moe_gguf_helpers import write_moe_gguf
from test_moe_gguf import Q4_K_M, tiny_qwen3_moe_256

from girandole import LLM, SamplingParams
from girandole.model import kernels
from girandole.model.context import ForwardContext, forward_context
from girandole.model.kernels import moe_experts
from girandole.model.loader import load_model
from girandole.model.moe import SparseMoE

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")


def step(decode_rows: int | None):
    """An engine step's context as the MoE layer reads it (None: outside a step)."""
    if decode_rows is None:
        return contextlib.nullcontext()
    empty = torch.zeros(0, dtype=torch.long)
    return forward_context(ForwardContext(empty, [], [], [], num_decode_rows=decode_rows))


@contextlib.contextmanager
def per_expert(moe: SparseMoE):
    """The layer on its per-expert dispatch (the native call switched off)."""
    saved = moe._native_tables
    moe._native_tables = False
    try:
        yield
    finally:
        moe._native_tables = saved


@contextlib.contextmanager
def top_k(moe: SparseMoE, k: int):
    saved = moe.top_k
    moe.top_k = k
    try:
        yield
    finally:
        moe.top_k = saved


@pytest.fixture(scope="module", params=["float", "q4_k_m"])
def moe(request, tmp_path_factory, tiny_qwen3_moe_dir) -> SparseMoE:
    if request.param == "float":
        path = request.getfixturevalue("tiny_wide_qwen3_moe_dir")
    else:
        path = tmp_path_factory.mktemp("qwen3-moe-gguf") / "tiny-qwen3moe.gguf"
        hf = tiny_qwen3_moe_256(tiny_qwen3_moe_dir)
        write_moe_gguf(hf, "qwen3moe", path, Q4_K_M, tokenizer=tiny_qwen3_moe_dir)
    model, _ = load_model(path, mode="fast", device="cpu", use_cache=False)
    layer = model.layers[0].mlp
    assert isinstance(layer, SparseMoE)
    return layer


def test_the_tiny_moe_runs_on_the_native_call(moe):
    assert moe.native_experts() is not None  # VNNI-layout experts: the CPU without AMX


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("rows, decode", [(1, 1), (1, 0), (3, 3), (7, 0), (9, 4), (24, 2)])
def test_native_call_equals_the_per_expert_dispatch(moe, k, rows, decode):
    g = torch.Generator().manual_seed(100 * k + rows + decode)
    x = torch.randn(rows, moe.router.shape[1], generator=g)
    with top_k(moe, k), step(decode):
        ids, _ = moe.route(x)
        if k < 3 and rows == 1:  # most experts have no rows
            assert ids.unique().numel() < moe.num_experts
        native = moe(x)
        with per_expert(moe):
            reference = moe(x)
    assert torch.equal(native, reference)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_outside_a_step_every_expert_row_takes_the_int8_kernel(moe, rows):
    """Without an engine step too, at any row count (40 rows at top-8 give each of the 8
    experts 40, above DENSE_MIN_ROWS, where a linear's rows go to the bf16 kernel): a row's
    output is its own alone, in the native call as in the per-expert dispatch."""
    x = torch.randn(rows, moe.router.shape[1], generator=torch.Generator().manual_seed(rows))
    with top_k(moe, 8):
        native = moe(x)
        with per_expert(moe):
            reference = moe(x)
        assert torch.equal(native, reference)
        for t in {0, rows // 2, rows - 1}:
            assert torch.equal(moe(x[t : t + 1]), native[t : t + 1])


@pytest.mark.parametrize("native", [True, False])
def test_a_prompt_rows_output_is_its_output_as_a_decode_row(moe, native):
    """A prompt token's experts take the int8 kernel as a decode token's do: its output is the
    same as a prompt row among 40 (each expert with 40 rows), among decode rows, and alone as
    a decode row, in the native call and in the per-expert dispatch."""
    x = torch.randn(41, moe.router.shape[1], generator=torch.Generator().manual_seed(11))
    dispatch = contextlib.nullcontext() if native else per_expert(moe)
    with top_k(moe, 8), dispatch:
        with step(0):
            prompt = moe(x[1:])
        with step(1):
            mixed = moe(x)
            alone = [moe(x[t : t + 1]) for t in (1, 20, 40)]
    assert torch.equal(mixed[1:], prompt)
    for t, y in zip((1, 20, 40), alone):
        assert torch.equal(y, prompt[t - 1 : t])


def test_kernel_with_ids_and_weights_given(moe):
    """moe_experts itself on chosen ids (repeated experts across tokens, unused ones, uneven
    weights) against the experts' own modules summed in ascending expert order."""
    h = moe.router.shape[1]
    x = torch.randn(4, h, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    ids = torch.tensor([[3, 1, 6], [6, 3, 0], [1, 3, 6], [7, 2, 5]])
    weights = torch.rand(4, 3, generator=torch.Generator().manual_seed(8))
    expert = moe.experts[0]
    with step(4):
        y = moe_experts.moe_experts(
            x, ids, weights, *moe.native_experts(), expert.intermediate, expert.native_act
        )
        for t in range(4):
            want = torch.zeros(1, h)
            for j in sorted(range(3), key=lambda j: int(ids[t, j])):
                want.add_(moe.experts[int(ids[t, j])](x[t : t + 1]).float().mul_(weights[t, j]))
            assert torch.equal(y[t : t + 1], want)


@pytest.mark.parametrize("decode", [1, 3])
def test_a_tokens_output_does_not_depend_on_the_others_in_its_step(moe, decode):
    x = torch.randn(20, moe.router.shape[1], generator=torch.Generator().manual_seed(decode))
    with top_k(moe, 8):
        with step(decode):
            mixed = moe(x)
        with step(0):
            prompt_alone = moe(x[decode:])
        assert torch.equal(mixed[decode:], prompt_alone)
        with step(1):
            for t in range(decode):
                assert torch.equal(moe(x[t : t + 1]), mixed[t : t + 1])


def _generate(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["Once upon a time", "The quick brown fox", "a b c d e f g h i j k"]
    return [o.token_ids for o in llm.generate(prompts, params)]


def test_engine_generation_is_the_per_expert_dispatchs(tiny_wide_qwen3_moe_dir):
    llm = LLM(model=str(tiny_wide_qwen3_moe_dir), mode="fast", device="cpu", kv_cache_gb=0.02)
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, SparseMoE)]
    assert layers and all(m.native_experts() is not None for m in layers)
    native = _generate(llm)
    for m in layers:
        m._native_tables = False
    llm.engine.runner.cpu_graphs.graphs.clear()  # recorded with the native calls
    assert _generate(llm) == native


def test_router_logits_are_a_rows_own_and_float32_close(moe):
    """CPU fast mode's router logits (the native kernel) are the same for a row alone as among
    others, within float32 rounding of the exact product; route() ranks them as torch's softmax
    and top-k do, its weights theirs within float32 rounding, a row's the same alone."""
    x = torch.randn(9, moe.router.shape[1], generator=torch.Generator().manual_seed(3))
    logits = moe_experts.router_logits(x, moe.router)
    ids, weights = moe.route(x)
    for t in (0, 4, 8):
        assert torch.equal(moe_experts.router_logits(x[t : t + 1], moe.router), logits[t : t + 1])
        alone = moe.route(x[t : t + 1])
        assert torch.equal(alone[0], ids[t : t + 1]) and torch.equal(alone[1], weights[t : t + 1])
    exact = x.double() @ moe.router.double().T
    torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-4)
    probs = torch.softmax(logits, dim=-1)
    want_weights, want_ids = torch.topk(probs, moe.top_k, dim=-1)
    assert torch.equal(ids, want_ids)
    want = want_weights / want_weights.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(weights, want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("experts, k", [(128, 8), (8, 2), (5, 5), (60, 1)])
def test_route_is_softmax_top_k_and_renormalisation(experts, k, norm):
    """The native route (csrc/moe_router.c): each row's k largest logits, largest first, and
    their softmax probabilities (renormalised over the k where `norm`), as torch computes them
    within float32 rounding; a row's result its own; ties to the lower expert."""
    g = torch.Generator().manual_seed(experts + k)
    logits = torch.randn(33, experts, generator=g) * 4
    logits[5] = 0.25  # every expert tied
    logits[6, 2:4] = logits[6].max() + 1  # the two largest tied
    ids, weights = moe_experts.route(logits, k, norm)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (33, k)
    probs = torch.softmax(logits.double(), dim=-1)
    for t in range(33):
        row = logits[t].tolist()
        want = sorted(range(experts), key=lambda e: (-row[e], e))[:k]
        assert ids[t].tolist() == want, t
        p = probs[t, want]
        torch.testing.assert_close(
            weights[t].double(), p / p.sum() if norm else p, rtol=2e-6, atol=1e-8
        )
        alone = moe_experts.route(logits[t : t + 1], k, norm)
        assert torch.equal(alone[0], ids[t : t + 1]) and torch.equal(alone[1], weights[t : t + 1])
    assert ids[5].tolist() == list(range(k)) and ids[6, :2].tolist() == [2, 3][:k]


def test_weight_tables_follow_the_experts_buffers(moe):
    """The tables hold the experts' addresses: where the weights move (a copy of the layer),
    they are made again, never read at the old place."""
    import copy

    x = torch.randn(3, moe.router.shape[1], generator=torch.Generator().manual_seed(5))
    with step(3):
        want = moe(x)
        moved = copy.deepcopy(moe)
        old = moe.native_experts()[0]
        assert int(moved.native_experts()[0][0, 0]) != int(old[0, 0])
        assert torch.equal(moved(x), want)
