"""The GPU path's fused layer kernels (girandole/model/kernels/triton_fused.py) under Triton's
CPU interpreter against the torch ops they replace, and the fused forward
(girandole/model/fused_layers.py) against the modules' own forward on the GPU path, for every
architecture, in float32 (reference mode) and in the bf16 dense form that fast mode takes on
CUDA. The interpreter rounds float32 -> bf16 towards zero where CUDA rounds to nearest: bf16
results are compared within one bf16 step. Plus: the kernels compile for sm_90."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
pytest.importorskip("triton")

from model_helpers import compile_for_hopper, write_tiny_gpt_oss, write_tiny_hf  # noqa: E402

from girandole.model import fused_layers  # noqa: E402
from girandole.model.attention import Attention  # noqa: E402
from girandole.model.context import ForwardContext, PagedTables, forward_context  # noqa: E402
from girandole.model.kernels import triton_fused  # noqa: E402
from girandole.model.layers import apply_rope  # noqa: E402
from girandole.model.loader import build_model, read_checkpoint  # noqa: E402
from girandole.model.moe import SparseMoE, stack_experts  # noqa: E402

BF16_STEP = 2.0**-7  # one bf16 step, relative


def _close_bf16(got: torch.Tensor, want_fp32: torch.Tensor, atol: float = 1e-30) -> None:
    """got (bf16) is want rounded to bf16 either way: within one bf16 step of it."""
    tol = want_fp32.abs() * BF16_STEP + atol
    assert ((got.float() - want_fp32).abs() <= tol).all()


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "has_y, has_post, has_pre",
    [(False, False, True), (True, False, True), (True, True, True), (True, True, False)],
)
def test_add_rms_norm(out_dtype, has_y, has_post, has_pre):
    g = torch.Generator().manual_seed(0)
    t, n = 5, 80  # n not a power of two: masked columns
    x = torch.randn(t, n, generator=g) * 3
    y = (torch.randn(t, n, generator=g) * 2).to(out_dtype) if has_y else None
    post = torch.rand(n, generator=g) + 0.5 if has_post else None
    pre = torch.rand(n, generator=g) + 0.5 if has_pre else None
    want_x = x.clone()
    if has_y:
        y32 = y.float()
        want_x += F.rms_norm(y32, (n,), post, 1e-6) if has_post else y32
    got_x = x.clone()
    h = triton_fused.add_rms_norm(got_x, y, post, pre, 1e-6, out_dtype)
    torch.testing.assert_close(got_x, want_x, rtol=1e-6, atol=1e-6)
    if not has_pre:
        assert h is None
        return
    want_h = F.rms_norm(want_x, (n,), pre, 1e-6)
    assert h.dtype == out_dtype
    if out_dtype == torch.bfloat16:
        _close_bf16(h, want_h)
    else:
        torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads, head_dim, norm", [(4, 2, 16, True), (4, 1, 40, False)])
def test_qkv_rope_store(cache_dtype, heads, kv_heads, head_dim, norm):
    """q comes back normed and rotated; k (normed, rotated) and v land in their slots of the
    cache, and no other slot changes."""
    g = torch.Generator().manual_seed(1)
    t = 6
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(cache_dtype)
    weight = torch.rand(heads + kv_heads, head_dim, generator=g) + 0.5 if norm else None
    pos = torch.tensor([0, 1, 2, 7, 30, 31]).float()
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = pos[:, None] * inv[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    k_cache = torch.full((40, kv_heads, head_dim), 7.0, dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, 7.0)
    slots = torch.tensor([3, 17, 18, 39, 0, 22])
    q = triton_fused.qkv_rope_store(
        qkv, heads, kv_heads, head_dim, weight, 1e-6, cos, sin, k_cache, v_cache, slots
    )

    x = qkv.float()
    qk = x[:, : (heads + kv_heads) * head_dim].view(t, heads + kv_heads, head_dim)
    if norm:
        qk = F.rms_norm(qk, (head_dim,), None, 1e-6) * weight
    qk = apply_rope(qk, cos, sin)
    v = x[:, (heads + kv_heads) * head_dim :].view(t, kv_heads, head_dim)
    assert q.dtype == cache_dtype and q.shape == (t, heads, head_dim)
    if cache_dtype == torch.bfloat16:
        _close_bf16(q, qk[:, :heads])
        _close_bf16(k_cache[slots], qk[:, heads:])
    else:
        torch.testing.assert_close(q, qk[:, :heads], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k_cache[slots], qk[:, heads:], rtol=1e-5, atol=1e-5)
    assert torch.equal(v_cache[slots].float(), v)  # v: copied as it is
    others = torch.ones(40, dtype=torch.bool)
    others[slots] = False
    assert (k_cache[others] == 7.0).all() and (v_cache[others] == 7.0).all()


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gated_act(act, dtype):
    g = torch.Generator().manual_seed(2)
    inter = 1500  # two column blocks, the second partly masked
    gu = (torch.randn(3, 2 * inter, generator=g) * 3).to(dtype)
    fn = F.silu if act == "silu" else (lambda v: F.gelu(v, approximate="tanh"))
    want = fn(gu.float()[:, :inter]) * gu.float()[:, inter:]
    got = triton_fused.gated_act(gu, act, dtype)
    assert got.shape == (3, inter) and got.dtype == dtype
    # atol: torch's 0.5 x (1 + tanh(u)) loses the tiny values of GELU's far negative side to
    # cancellation (~1e-7 off); the kernel's x / (1 + exp(-2u)) keeps them.
    if dtype == torch.bfloat16:
        _close_bf16(got, want.bfloat16().float(), atol=1e-6)  # torch rounds once, at the end
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_empty_steps():
    x = torch.zeros(0, 8)
    assert triton_fused.add_rms_norm(x, x, None, torch.ones(8), 1e-6, torch.float32).shape == (0, 8)
    assert triton_fused.gated_act(torch.zeros(0, 8), "silu", torch.float32).shape == (0, 4)


# -- the fused forward against the modules' forward ---------------------------------------------


BLOCK = 4


def _bind(model, dtype, num_blocks=48):
    for layer in model.modules():
        if isinstance(layer, Attention):
            shape = (num_blocks * BLOCK, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=dtype)
            layer.v_cache = torch.zeros(shape, dtype=dtype)


def _caches(model):
    return [
        (m.k_cache.clone(), m.v_cache.clone()) for m in model.modules() if isinstance(m, Attention)
    ]


def _run(model, steps, fused: bool):
    """The model's hidden states for each step of new tokens per sequence, over scattered
    blocks, on the GPU path's context (paged block tables); and the caches after."""
    g = torch.Generator().manual_seed(3)
    free = torch.randperm(48, generator=g).tolist()
    tables: dict[int, list[int]] = {}
    lens: dict[int, int] = {}
    outs = []
    fused_layers.ENABLED = fused
    try:
        for new in steps:
            ids, pos, slots, qlens, ctxs = [], [], [], [], []
            for seq, toks in new.items():
                start = lens.get(seq, 0)
                for j, tok in enumerate(toks):
                    p = start + j
                    table = tables.setdefault(seq, [])
                    while len(table) * BLOCK <= p:
                        table.append(free.pop())
                    ids.append(tok)
                    pos.append(p)
                    slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
                lens[seq] = start + len(toks)
                qlens.append(len(toks))
                ctxs.append(lens[seq])
            paged = PagedTables.build(
                [tables[s] for s in new], qlens, ctxs, BLOCK, torch.device("cpu")
            )
            ctx = ForwardContext(
                slot_mapping=torch.tensor(slots),
                query_lens=qlens,
                context_lens=ctxs,
                context_slots=[],
                paged=paged,
            )
            with torch.inference_mode(), forward_context(ctx):
                outs.append(model(torch.tensor(ids), torch.tensor(pos)))
    finally:
        fused_layers.ENABLED = True
    return outs, _caches(model)


STEPS = [
    {0: [5, 9, 14, 22, 31, 40, 41], 1: [7, 8, 9]},  # prefill, two sequences
    {0: [50], 1: [60, 61, 62, 63, 64, 65]},  # a decode row beside a prompt chunk
    {0: [70], 1: [71]},  # decode only
    {0: [72], 1: [73]},
]


@pytest.mark.parametrize(
    "kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "qwen3_moe", "gpt_oss"]
)
@pytest.mark.parametrize("form", ["reference", "bf16"])
def test_fused_forward_equals_module_forward(tmp_path, kind, form):
    """Same hidden states and caches through prefill, mixed and decode steps (Mistral and
    Gemma 3: sliding windows shorter than the sequences; Qwen 2: QKV bias; Qwen 3 and
    Gemma 3: QK norm; Gemma 3: post norms, GELU, two rotary tables; Qwen3-MoE: an MoE layer
    then a dense one; gpt-oss: MoE layers with the clamped SwiGLU, sinks, biases, windows).
    Both forwards run an MoE layer's experts in the fused MoE kernel."""
    # Two layers (Gemma 3: local, global, local): the interpreter's time goes with layers, and
    # more of the same layer check no more
    layers = {"num_hidden_layers": 2}
    if kind == "gemma3":
        local, full = "sliding_attention", "full_attention"
        layers = {"num_hidden_layers": 3, "layer_types": [local, full, local]}
    if kind == "gpt_oss":
        write_tiny_gpt_oss(tmp_path)  # 3 layers: sliding, full, sliding
    else:
        write_tiny_hf(kind, tmp_path, **layers)
    spec, _, weights = read_checkpoint(tmp_path)
    # "fast" for a device other than the CPU: the bf16 dense layers CUDA runs
    mode, device = ("reference", "cpu") if form == "reference" else ("fast", "cuda")
    model = build_model(spec, weights, mode, torch.device(device))
    moe = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert len(moe) == {"qwen3_moe": 1, "gpt_oss": 3}.get(kind, 0)
    assert not moe or not fused_layers.fusable(model)  # the experts are not stacked yet
    for m in moe:  # routers sharpened: bf16's rounding then never flips a near tie of experts
        m.router.mul_(8.0)
    assert stack_experts(model)  # what the ModelRunner does on the GPU path
    assert fused_layers.fusable(model)
    windows = [m.sliding_window for m in model.modules() if isinstance(m, Attention)]
    want_windows = {"gemma3": [5, None, 5], "mistral": [5, 5], "gpt_oss": [4, None, 4]}
    assert windows == want_windows.get(kind, [None, None])
    dtype = torch.float32 if form == "reference" else torch.bfloat16
    _bind(model, dtype)
    want, want_caches = _run(model, STEPS, fused=False)
    _bind(model, dtype)
    got, got_caches = _run(model, STEPS, fused=True)
    pairs = [(h, w) for h, w in zip(got, want)]
    for (gk, gv), (wk, wv) in zip(got_caches, want_caches):
        pairs += [(gk.float(), wk.float()), (gv.float(), wv.float())]
    for h, w in pairs:
        if form == "reference":
            torch.testing.assert_close(h, w, rtol=1e-4, atol=1e-4)
        else:  # bf16 activations, rounded differently here (see the module docstring)
            rel = (h - w).norm() / w.norm()
            assert rel < 2e-2, rel


def test_not_used_off_the_gpu_path_or_with_lora(tmp_path):
    """The CPU path (no paged tables) and LoRA steps take the modules' forward; quantized
    (CPU fast-mode) layers are not fusable."""
    write_tiny_hf("llama", tmp_path)
    spec, _, weights = read_checkpoint(tmp_path)
    model = build_model(spec, weights, "reference", torch.device("cpu"))
    _bind(model, torch.float32)
    paged = PagedTables.build([[0]], [1], [1], BLOCK, torch.device("cpu"))
    ctx = ForwardContext(torch.tensor([0]), [1], [1], [], paged=paged)
    assert fused_layers.applies(model, ctx)
    assert not fused_layers.applies(model, ForwardContext(torch.tensor([0]), [1], [1], []))
    ctx.lora = object()
    assert not fused_layers.applies(model, ctx)
    quantized = build_model(spec, weights, "fast", torch.device("cpu"))
    assert not fused_layers.fusable(quantized)


def test_kernels_compile_for_hopper():
    """What the interpreter does not check: the three kernels compile to sm_90 cubins for the
    shapes of Gemma-3-270M, Qwen2.5-0.5B and Llama-3.2-1B, in a process without
    TRITON_INTERPRET."""
    shapes = [(640, 4, 1, 256), (896, 14, 2, 64), (2048, 32, 8, 64)]
    assert (
        compile_for_hopper("triton_fused", f"sum(t.compile_for_cuda(90, *s) for s in {shapes!r})")
        == 9
    )
