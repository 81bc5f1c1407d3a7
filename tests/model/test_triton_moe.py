"""The fused mixture-of-experts kernel (girandole/model/kernels/triton_moe.py) under Triton's CPU
interpreter: the block alignment, the whole block against a float64 torch reference (SiLU and
gpt-oss's clamped SwiGLU with biases; an expert no token picks and one every token picks; bf16
and float32 weights), the MoE layers' fused path against their torch dispatch and the expert
weights stacked into one copy; and the kernels compiled for sm_90."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
pytest.importorskip("triton")

from model_helpers import compile_for_hopper, write_tiny_gpt_oss, write_tiny_hf  # noqa: E402

from girandole.model.context import ForwardContext, PagedTables, forward_context  # noqa: E402
from girandole.model.kernels import triton_moe  # noqa: E402
from girandole.model.loader import build_model, read_checkpoint  # noqa: E402
from girandole.model.moe import SparseMoE, stack_experts  # noqa: E402

E, K, H, INTER = 8, 2, 48, 40  # H, INTER: not multiples of the kernel's 64-wide tiles (masked)
ALL, NONE = 3, 5  # every token picks expert ALL; no token picks expert NONE


def _ids(t: int, g: torch.Generator) -> torch.Tensor:
    """[t, K]: each token's first choice ALL, its second another expert, never NONE."""
    others = torch.tensor([e for e in range(E) if e not in (ALL, NONE)])
    second = others[torch.randint(len(others), (t,), generator=g)]
    return torch.stack([torch.full((t,), ALL), second], dim=1)


def _reference(x, w_gu, w_down, ids, weights, act, b_gu, b_down, alpha, limit):
    """The MoE block in float64, token by token and choice by choice, on x in the weights'
    dtype (what the kernel multiplies); and a bound of each output's error from storing the
    intermediate in the weights' dtype (one step of it, relative, through the down weights)."""
    step = 2.0**-7 if w_gu.dtype == torch.bfloat16 else 2.0**-23
    x = x.to(w_gu.dtype).double()
    y = torch.zeros(x.shape[0], w_down.shape[1], dtype=torch.float64)
    bound = torch.zeros_like(y)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = w_gu[e].double() @ x[t]
            if b_gu is not None:
                gu = gu + b_gu[e].double()
            gate, up = gu[:INTER], gu[INTER:]
            if act == "silu":
                a = F.silu(gate) * up
            else:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
                a = (up + 1) * gate * torch.sigmoid(alpha * gate)
            out = w_down[e].double() @ a
            if b_down is not None:
                out = out + b_down[e].double()
            y[t] += float(weights[t, j]) * out
            bound[t] += float(weights[t, j]) * (w_down[e].double().abs() @ a.abs()) * step
    return y, bound


@pytest.mark.parametrize("t", [1, 5, 37])
@pytest.mark.parametrize("act", ["silu", "swiglu_clamped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_m", [16, 64])
def test_fused_moe_equals_float64_reference(t, act, dtype, block_m, monkeypatch):
    """block_m: the decode and the prompt block heights, whatever the token count."""
    monkeypatch.setattr(triton_moe, "block_m_for", lambda pairs, experts: block_m)
    g = torch.Generator().manual_seed(t)
    # x bf16-exact: the interpreter rounds float32 -> bf16 towards zero, torch to nearest
    x = torch.randn(t, H, generator=g).bfloat16().float()
    w_gu = (torch.randn(E, 2 * INTER, H, generator=g) * 0.4).to(dtype)
    w_down = (torch.randn(E, H, INTER, generator=g) * 0.2).to(dtype)
    ids = _ids(t, g)
    weights = torch.softmax(torch.randn(t, K, generator=g), dim=-1)
    b_gu = b_down = None
    alpha, limit = 1.702, 1.5
    if act == "swiglu_clamped":
        b_gu = (torch.randn(E, 2 * INTER, generator=g) * 0.3).to(dtype)
        b_down = (torch.randn(E, H, generator=g) * 0.3).to(dtype)
    want, bound = _reference(x, w_gu, w_down, ids, weights, act, b_gu, b_down, alpha, limit)
    got = triton_moe.fused_moe(
        x, w_gu, w_down, ids, weights, act, b_gu, b_down, alpha=alpha, limit=limit
    )
    assert got.dtype == torch.float32 and got.shape == (t, H)
    # float32 sums, and the intermediate stored in the weights' dtype (the down input)
    err = (got.double() - want).abs()
    assert (err <= bound + 1e-5 * (1 + want.abs())).all(), (err - bound).max()
    if act == "swiglu_clamped" and t > 1:  # the clamps cut: the test would see them missing
        gu = torch.einsum("th,eih->tei", x.to(dtype).double(), w_gu.double())[:, ALL]
        gu = gu + b_gu[ALL].double()
        assert (gu[:, :INTER] > limit).any() and (gu[:, INTER:].abs() > limit).any()


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("routing", ["random", "spread"])
def test_align_block_size(routing, path, monkeypatch):
    """Every pair once, sorted by expert (in token order within one), each expert's run padded
    to whole blocks with the pair count; the blocks' experts, past the last run the expert
    count; the sizes from shapes alone. "spread": every pair on its own expert, the most
    blocks a routing can take (each a block of one row), exactly the buffers' size. `path`:
    the one-program kernel (a decode step's pairs) or torch's ops (more pairs)."""
    if path == "torch":
        monkeypatch.setattr(triton_moe, "ALIGN_KERNEL_MAX_PAIRS", 0)
    g = torch.Generator().manual_seed(0)
    block_m = 16
    ids = _ids(37, g) if routing == "random" else torch.randperm(E, generator=g).view(4, K)
    pairs, block_expert = triton_moe.align_block_size(ids, E, block_m)
    p = ids.numel()
    nb = triton_moe.max_blocks(p, E, block_m)
    assert pairs.dtype == block_expert.dtype == torch.int32
    assert pairs.shape == (nb * block_m,) and block_expert.shape == (nb,)
    flat = ids.flatten()
    start = 0
    for e in range(E):
        mine = (flat == e).nonzero()[:, 0].tolist()  # the expert's pairs, in token order
        blocks = -(-len(mine) // block_m)
        run = pairs[start * block_m : (start + blocks) * block_m].tolist()
        assert run == mine + [p] * (blocks * block_m - len(mine))
        assert block_expert[start : start + blocks].tolist() == [e] * blocks
        start += blocks
    if routing == "spread":
        assert start == nb == E
    else:  # blocks left unused: marked past the last expert, their rows padding
        assert start < nb
        assert (block_expert[start:] == E).all() and (pairs[start * block_m :] == p).all()


@pytest.mark.parametrize("t, k, e, block_m", [(40, 8, 128, 16), (100, 4, 32, 64), (3, 2, 5, 16)])
def test_align_kernel_equals_torch_ops(t, k, e, block_m, monkeypatch):
    """The one-program kernel and torch's ops give the same buffers: many chunks of pairs, an
    expert count that is no power of two, skewed routing (a few experts take most pairs)."""
    g = torch.Generator().manual_seed(t)
    skew = torch.rand(e, generator=g) ** 4
    ids = torch.stack([torch.multinomial(skew, k, generator=g) for _ in range(t)])
    kernel = triton_moe.align_block_size(ids, e, block_m)
    monkeypatch.setattr(triton_moe, "ALIGN_KERNEL_MAX_PAIRS", 0)
    ops = triton_moe.align_block_size(ids, e, block_m)
    assert torch.equal(kernel[0], ops[0]) and torch.equal(kernel[1], ops[1])


def test_empty_step():
    w_gu, w_down = torch.zeros(E, 2 * INTER, H), torch.zeros(E, H, INTER)
    ids, weights = torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K)
    assert triton_moe.fused_moe(torch.zeros(0, H), w_gu, w_down, ids, weights).shape == (0, H)


# -- the MoE layers: fused path against the torch dispatch ---------------------------------


def _paged_context() -> ForwardContext:
    """A forward context of the GPU path (paged tables): what makes a layer take the kernel."""
    paged = PagedTables.build([[0]], [1], [1], 4, torch.device("cpu"))
    return ForwardContext(torch.tensor([0]), [1], [1], [], paged=paged)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("form", ["reference", "bf16"])
def test_moe_layers_fused_equal_torch_dispatch(tmp_path, kind, form, monkeypatch):
    """Each MoE layer of a tiny Qwen3-MoE (SiLU) and gpt-oss (clamped SwiGLU, biases, biased
    router) on 9 tokens: the fused kernel on the GPU path's context gives the torch dispatch's
    output (no context); the stacked weights are the experts' only copy."""
    if kind == "gpt_oss":
        write_tiny_gpt_oss(tmp_path)
    else:
        write_tiny_hf(kind, tmp_path, num_hidden_layers=2)
    spec, _, weights = read_checkpoint(tmp_path)
    # "fast" for a device other than the CPU: the bf16 dense experts CUDA runs
    mode, device = ("reference", "cpu") if form == "reference" else ("fast", "cuda")
    model = build_model(spec, weights, mode, torch.device(device))
    layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert layers and stack_experts(model)
    calls = []
    fused = triton_moe.fused_moe
    monkeypatch.setattr(triton_moe, "fused_moe", lambda *a, **k: calls.append(1) or fused(*a, **k))
    g = torch.Generator().manual_seed(1)
    for layer in layers:
        s = layer.stacked
        dtype = torch.float32 if form == "reference" else torch.bfloat16
        assert s.gate_up.dtype == s.down.dtype == dtype
        assert s.gate_up.shape == (
            spec.num_experts,
            2 * spec.moe_intermediate_size,
            spec.hidden_size,
        )
        assert (s.gate_up_bias is not None) == (kind == "gpt_oss")
        for e, expert in enumerate(layer.experts):  # views of the stack: one copy
            assert expert.gate_up.weight.data_ptr() == s.gate_up[e].data_ptr()
            assert expert.down.weight.data_ptr() == s.down[e].data_ptr()
        x = torch.randn(9, spec.hidden_size, generator=g)
        with torch.inference_mode():
            want = layer(x)  # no context: the torch dispatch
            with forward_context(_paged_context()):
                got = layer(x)
        if form == "reference":
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # the torch dispatch rounds gate/up to bf16 before the activation; the kernel not
            rel = (got - want).norm() / want.norm()
            assert rel < 2e-2, rel
    assert len(calls) == len(layers)


def test_quantized_experts_keep_the_torch_dispatch(tmp_path):
    """CPU fast mode's packed experts are no stack: the layer keeps the torch dispatch, and
    stack_experts says so (the ModelRunner then keeps decode graphs off)."""
    write_tiny_hf("qwen3_moe", tmp_path, num_hidden_layers=2)
    spec, _, weights = read_checkpoint(tmp_path)
    model = build_model(spec, weights, "fast", torch.device("cpu"))
    assert not stack_experts(model)
    assert all(m.stacked is None for m in model.modules() if isinstance(m, SparseMoE))


# -- compiled for Hopper ----------------------------------------------------------------------

# (model, hidden, intermediate, experts, top-k, activation); the hidden and intermediate sizes
# are runtime arguments of the kernels, the rest compiled in.
CUDA_SHAPES = [
    ("Qwen3-30B-A3B", 2048, 768, 128, 8, "silu"),
    ("gpt-oss-20b", 2880, 2880, 32, 4, "swiglu_clamped"),
]


def test_kernels_compile_for_hopper():
    """What the interpreter does not check (tile shapes, shared memory, constexpr branches):
    the three kernels at both block heights compile to sm_90 cubins for each model, within shared
    memory, in a process without TRITON_INTERPRET."""
    configs = [(e, k, act) for _, _, _, e, k, act in CUDA_SHAPES]
    compiled = compile_for_hopper(
        "triton_moe", f"[t.compile_for_cuda(90, *c) for c in {configs!r}]"
    )
    for shared in compiled:
        kernels = {f"{n}_m{m}" for n in ("align", "gate_up", "down") for m in (16, 64)}
        assert set(shared) == kernels
        assert all(0 < b <= 227 * 1024 for b in shared.values())
