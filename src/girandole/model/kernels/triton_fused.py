"""Fused elementwise kernels of the GPU path's decoder layers, in Triton.

Eagerly, a layer's glue between its four matmuls and attention is some 25 small torch kernels
(norms, dtype casts, the rotary's halves, cache writes, the gate's activation); inside a CUDA
graph each still costs the GPU a few microseconds, which at batch 1 is most of a small model's
step. These three kernels do that glue in three launches a layer, with the same arithmetic in
float32 as the torch ops they replace (model/fused_layers.py runs them):

- `add_rms_norm`: the residual stream between blocks. x += post_norm(y) (Gemma's norm after a
  block; plain y without one), then h = pre_norm(x) in the next linear's dtype. x (float32) is
  updated in place.
- `qkv_rope_store`: a layer's fused Q/K/V projection to attention's inputs: an optional RMS
  norm of each q and k head, the rotary (rotate-half) on both, k and v written into the paged
  cache at the step's slots; returns q in the cache's dtype.
- `gated_act`: act(gate) * up (SiLU or tanh-GELU) in the next linear's dtype.

`TRITON_INTERPRET=1` runs them on CPU tensors (the tests do).
"""

from __future__ import annotations

import torch

from girandole.model.kernels.triton_paged_attention import _next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the engine never asks for these kernels there
    triton = None
    tl = None

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _add_norm_kernel(
        x_ptr,
        y_ptr,
        post_w_ptr,
        pre_w_ptr,
        h_ptr,
        n_cols,
        stride_x,
        stride_y,
        stride_h,
        eps,
        HAS_Y: tl.constexpr,
        HAS_POST: tl.constexpr,
        HAS_PRE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_POST:
                w = tl.load(post_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                y = y * tl.rsqrt(tl.sum(y * y, 0) / n_cols + eps) * w
            x = x + y
            tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
        if HAS_PRE:
            w = tl.load(pre_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            h = x * tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps) * w
            tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qkv_kernel(
        qkv_ptr,
        norm_w_ptr,
        cos_ptr,
        sin_ptr,
        slot_ptr,
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        stride_qkv,
        stride_cs,
        stride_q,
        stride_slot,
        eps,
        H: tl.constexpr,
        HKV: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        HAS_NORM: tl.constexpr,
    ):
        """One program per (token, head) of the projection's H q, HKV k and HKV v heads."""
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        d = tl.arange(0, BLOCK_HALF)
        m = d < HALF
        src = qkv_ptr + row * stride_qkv + head * (2 * HALF)
        x1 = tl.load(src + d, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + d, mask=m, other=0.0).to(tl.float32)
        if head < H + HKV:  # a q or k head: normed, then rotated
            if HAS_NORM:
                r = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
                w = norm_w_ptr + head * (2 * HALF)
                x1 = x1 * r * tl.load(w + d, mask=m, other=0.0)
                x2 = x2 * r * tl.load(w + HALF + d, mask=m, other=0.0)
            c = tl.load(cos_ptr + row * stride_cs + d, mask=m, other=0.0)
            s = tl.load(sin_ptr + row * stride_cs + d, mask=m, other=0.0)
            o1 = x1 * c - x2 * s
            o2 = x2 * c + x1 * s
            if head < H:
                dst = q_ptr + row * stride_q + head * (2 * HALF)
                tl.store(dst + d, o1.to(q_ptr.dtype.element_ty), mask=m)
                tl.store(dst + HALF + d, o2.to(q_ptr.dtype.element_ty), mask=m)
            else:
                slot = tl.load(slot_ptr + row).to(tl.int64)
                dst = k_cache_ptr + slot * stride_slot + (head - H) * (2 * HALF)
                tl.store(dst + d, o1.to(k_cache_ptr.dtype.element_ty), mask=m)
                tl.store(dst + HALF + d, o2.to(k_cache_ptr.dtype.element_ty), mask=m)
        else:  # a v head: into the cache as it is
            slot = tl.load(slot_ptr + row).to(tl.int64)
            dst = v_cache_ptr + slot * stride_slot + (head - H - HKV) * (2 * HALF)
            tl.store(dst + d, x1.to(v_cache_ptr.dtype.element_ty), mask=m)
            tl.store(dst + HALF + d, x2.to(v_cache_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gated_act_kernel(
        gu_ptr,
        out_ptr,
        n_inter,
        stride_gu,
        stride_out,
        ACT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_inter
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + n_inter + cols, mask=mask, other=0.0)
        # x / (1 + exp(-z)) with z capped where the quotient is 0 anyway (no inf on the way)
        if ACT == 0:  # silu
            a = g / (1.0 + tl.exp(tl.minimum(-g, 80.0)))
        else:  # tanh-GELU: 0.5 g (1 + tanh(u)) = g / (1 + exp(-2u)), no cancellation
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = g / (1.0 + tl.exp(tl.minimum(-2.0 * inner, 80.0)))
        out = a * u.to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"expected 2-D rows with a unit last stride, got {tuple(x.shape)}")


def add_rms_norm(
    x: torch.Tensor,
    y: torch.Tensor | None,
    post_weight: torch.Tensor | None,
    pre_weight: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor | None:
    """x [T, N] float32, updated in place to x + post_norm(y) (x + y without `post_weight`;
    unchanged without y); returns pre_norm(x) in out_dtype (None without `pre_weight`)."""
    _rows(x)
    t, n = x.shape
    h = None if pre_weight is None else torch.empty(t, n, dtype=out_dtype, device=x.device)
    if y is not None:
        _rows(y)
    if t == 0:
        return h
    _add_norm_kernel[(t,)](
        x,
        x if y is None else y,
        x if post_weight is None else post_weight,
        x if pre_weight is None else pre_weight,
        x if h is None else h,
        n,
        x.stride(0),
        0 if y is None else y.stride(0),
        0 if h is None else h.stride(0),
        eps,
        HAS_Y=y is not None,
        HAS_POST=post_weight is not None,
        HAS_PRE=pre_weight is not None,
        BLOCK=_next_pow2(n),
        num_warps=4 if n <= 4096 else 8,
    )
    return h


def qkv_rope_store(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    norm_weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) D] (q heads, k heads, v heads) -> q [T, H, D] in the cache's dtype,
    normed (`norm_weight` [H + Hkv, D], float32) and rotated (cos, sin [T, D/2] float32); k
    (normed, rotated) and v go to the caches [slots, Hkv, D] at `slot_mapping` [T]."""
    _rows(qkv)
    t = qkv.shape[0]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv of shape {tuple(qkv.shape)} does not hold the heads")
    q = torch.empty(t, num_heads, head_dim, dtype=k_cache.dtype, device=qkv.device)
    if t == 0:
        return q
    cos, sin = cos.contiguous(), sin.contiguous()
    half = head_dim // 2
    _qkv_kernel[(t, num_heads + 2 * num_kv_heads)](
        qkv,
        qkv if norm_weight is None else norm_weight,
        cos,
        sin,
        slot_mapping,
        q,
        k_cache,
        v_cache,
        qkv.stride(0),
        cos.stride(0),
        q.stride(0),
        k_cache.stride(0),
        eps,
        H=num_heads,
        HKV=num_kv_heads,
        HALF=half,
        BLOCK_HALF=_next_pow2(half),
        HAS_NORM=norm_weight is not None,
        num_warps=1 if half <= 64 else 2,
    )
    return q


def gated_act(gu: torch.Tensor, act: str, out_dtype: torch.dtype) -> torch.Tensor:
    """gu [T, 2 I] (gate, up) -> act(gate) * up [T, I] in out_dtype."""
    _rows(gu)
    t, n = gu.shape
    inter = n // 2
    out = torch.empty(t, inter, dtype=out_dtype, device=gu.device)
    if t == 0:
        return out
    block = min(1024, _next_pow2(inter))
    _gated_act_kernel[(t, triton.cdiv(inter, block))](
        gu,
        out,
        inter,
        gu.stride(0),
        out.stride(0),
        ACT=ACTIVATIONS[act],
        BLOCK=block,
        num_warps=4,
    )
    return out


def compile_for_cuda(arch: int, hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """Compile the three kernels for a CUDA target (e.g. 90) without a GPU, for a model shape,
    bf16 activations and cache (what the interpreter does not check); the number compiled.
    Needs a process without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fp32 = {"x_ptr", "post_w_ptr", "pre_w_ptr", "norm_w_ptr", "cos_ptr", "sin_ptr"}
    i64 = {"slot_ptr"}
    configs = [
        (_add_norm_kernel, dict(HAS_Y=True, HAS_POST=True, HAS_PRE=True, BLOCK=_next_pow2(hidden))),
        (
            _qkv_kernel,
            dict(
                H=heads,
                HKV=kv_heads,
                HALF=head_dim // 2,
                BLOCK_HALF=_next_pow2(head_dim // 2),
                HAS_NORM=True,
            ),
        ),
        (_gated_act_kernel, dict(ACT=1, BLOCK=1024)),
    ]
    for kernel, config in configs:
        signature = {}
        for a in kernel.arg_names:
            if a in config:
                signature[a] = "constexpr"
            elif a.endswith("_ptr"):
                signature[a] = "*fp32" if a in fp32 else "*i64" if a in i64 else "*bf16"
            else:
                signature[a] = "fp32" if a == "eps" else "i32"
        compiled = triton.compile(
            ASTSource(kernel, signature, config), target=GPUTarget("cuda", arch, 32)
        )
        assert "cubin" in compiled.asm
    return len(configs)
