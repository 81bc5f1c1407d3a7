"""The GPU path's mixture-of-experts block in Triton (vLLM's fused_moe, ours): every expert of a
layer in two grouped-GEMM launches, with no host sync, so a CUDA graph captures it.

1. `align_block_size`: the T x k (token, expert) pairs sorted by expert, each expert's run padded
   to a multiple of BLOCK_M rows (pair id `T * k` marks a padding row), and each block of BLOCK_M
   rows' expert (`num_experts` past the last block in use). On the device, into buffers whose
   sizes follow from host-known shapes only (T, k, the number of experts, BLOCK_M): sized for
   the worst routing, never for the step's counts, so nothing is read back. A decode step's few
   pairs take one single-program kernel (`_align_kernel`); more take torch's ops (a stable
   argsort, scans, a scatter), which parallelize.
2. `_gate_up_kernel`: one program per (block of rows, block of intermediate columns) reads its
   block's expert, gathers its tokens' rows of x, and computes the gate and up columns of that
   expert's [2I, H] weight (gate rows first, then up) in two float32 accumulators; then the
   biases (gpt-oss) and the activation, SiLU or tanh-GELU times up, or gpt-oss's clamped SwiGLU
   (up clamped to +-limit, gate clamped above at limit: (up + 1) * gate * sigmoid(alpha gate)),
   stored per pair in the weights' dtype (the input the down projection casts to anyway).
3. `_down_kernel`: the same grouped GEMM over each expert's [H, I] down weight, plus its bias,
   times the pair's routing weight, into a float32 row per pair; torch then sums each token's k
   rows in its choice order (one reduction, deterministic: no atomics).

A row's result depends on its own token and expert only, never on which rows share its block.
Block sizes come from host shapes (BLOCK_K is fixed, so a row's sums run in one order whatever
the batch). Tokens go in chunks of `CHUNK_TOKENS`, which bounds the per-pair buffers.

`TRITON_INTERPRET=1` runs it on CPU tensors (the tests do); there bf16 tiles are upcast to
float32 before tl.dot, as the paged attention kernels do (the interpreter has no bf16 matmul).
"""

from __future__ import annotations

import torch

from girandole.model.kernels.triton_paged_attention import _interpreted, _next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the engine never asks for these kernels there
    triton = None
    tl = None

# The activation between the two GEMMs, by name: GatedMLP's act_name, or gpt-oss's.
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "swiglu_clamped": 2}
CHUNK_TOKENS = 2048  # tokens a launch pair takes: [chunk * k, H] float32 rows at most
# align_block_size's one-program kernel up to this many pairs (decode steps; untuned), torch's
# ops (sort, scans, scatter: some twenty launches, each parallel) above
ALIGN_KERNEL_MAX_PAIRS = 1024
ALIGN_KERNEL_MAX_EXPERTS = 512
BLOCK_N = 64
BLOCK_K = 64  # fixed: a row's dot products add up in the same order at every batch size


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _align_kernel(
        ids_ptr,
        pairs_ptr,
        block_expert_ptr,
        num_pairs,
        num_experts,
        num_blocks,
        BLOCK_M: tl.constexpr,
        BLOCK_E: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        """align_block_size in one program (a decode step's few pairs: one launch where the
        torch ops take some twenty). Pairs go CHUNK at a time against every expert: a pair's
        place in its expert's run is the count of that expert's pairs before it."""
        e = tl.arange(0, BLOCK_E)
        j = tl.arange(0, CHUNK)
        counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for start in range(0, num_pairs, CHUNK):
            ids = tl.load(ids_ptr + start + j, mask=start + j < num_pairs, other=-1)
            counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
        blocks = (counts + BLOCK_M - 1) // BLOCK_M
        block_end = tl.cumsum(blocks, axis=0)  # each expert's run ends before this block
        run_start = (block_end - blocks) * BLOCK_M
        rows = num_blocks * BLOCK_M
        for start in range(0, rows, CHUNK):  # every row padding, then the pairs over it
            r = start + j
            tl.store(pairs_ptr + r, tl.zeros((CHUNK,), dtype=tl.int32) + num_pairs, mask=r < rows)
        tl.debug_barrier()
        seen = tl.zeros((BLOCK_E,), dtype=tl.int32)  # each expert's pairs placed so far
        for start in range(0, num_pairs, CHUNK):
            pj = start + j
            ok = pj < num_pairs
            ids = tl.load(ids_ptr + pj, mask=ok, other=-1)
            hit = (ids[:, None] == e[None, :]).to(tl.int32)
            before = tl.cumsum(hit, axis=0) - hit + seen[None, :]
            dest = tl.sum(hit * (run_start[None, :] + before), axis=1)
            tl.store(pairs_ptr + dest, pj, mask=ok)
            seen += tl.sum(hit, axis=0)
        for start in range(0, num_blocks, CHUNK):  # a block's expert: the runs ended before it
            b = start + j
            ended = (block_end[None, :] <= b[:, None]) & (e < num_experts)[None, :]
            tl.store(block_expert_ptr + b, tl.sum(ended.to(tl.int32), axis=1), mask=b < num_blocks)

    @triton.jit
    def _gate_up_kernel(
        x_ptr,
        w_ptr,
        bias_ptr,
        out_ptr,
        pairs_ptr,
        block_expert_ptr,
        num_pairs,
        num_experts,
        hidden,
        inter,
        stride_x,
        stride_we,
        stride_wn,
        stride_be,
        stride_out,
        alpha,
        limit,
        TOP_K: tl.constexpr,
        ACT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """act(x @ gate.T, x @ up.T) for one block of one expert's pairs and BLOCK_N columns."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert >= num_experts:  # past the last expert's padded run
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(pairs_ptr + rows)
        valid = pair < num_pairs
        token = (pair // TOP_K).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < inter
        kk = tl.arange(0, BLOCK_K)
        w = w_ptr + expert.to(tl.int64) * stride_we
        gate_ptrs = w + cols[None, :].to(tl.int64) * stride_wn + kk[:, None]  # [BLOCK_K, BLOCK_N]
        up_ptrs = gate_ptrs + inter * stride_wn
        x_ptrs = x_ptr + token[:, None] * stride_x + kk[None, :]  # [BLOCK_M, BLOCK_K]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_ok = k0 + kk < hidden
            w_mask = k_ok[:, None] & col_ok[None, :]
            a = tl.load(x_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
            a = a.to(w_ptr.dtype.element_ty)  # x in the weights' dtype, as a dense linear's
            g = tl.load(gate_ptrs + k0, mask=w_mask, other=0.0)
            u = tl.load(up_ptrs + k0, mask=w_mask, other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                g = g.to(tl.float32)
                u = u.to(tl.float32)
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        if HAS_BIAS:
            b = bias_ptr + expert.to(tl.int64) * stride_be
            acc_g += tl.load(b + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b + inter + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # z / (1 + exp(-y)) with -y capped where the quotient is 0 anyway (no inf on the way)
        if ACT == 0:  # SiLU(gate) * up
            out = acc_g / (1.0 + tl.exp(tl.minimum(-acc_g, 80.0))) * acc_u
        elif ACT == 1:  # tanh-GELU(gate) * up: 0.5 g (1 + tanh(y)) = g / (1 + exp(-2y))
            inner = 0.7978845608028654 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
            out = acc_g / (1.0 + tl.exp(tl.minimum(-2.0 * inner, 80.0))) * acc_u
        else:  # gpt-oss: (clamp(up, -limit, limit) + 1) * gate * sigmoid(alpha * gate)
            g = tl.minimum(acc_g, limit)
            u = tl.minimum(tl.maximum(acc_u, -limit), limit)
            out = (u + 1.0) * (g / (1.0 + tl.exp(tl.minimum(-alpha * g, 80.0))))
        dst = out_ptr + pair[:, None].to(tl.int64) * stride_out + cols[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])

    @triton.jit
    def _down_kernel(
        a_ptr,
        w_ptr,
        bias_ptr,
        route_w_ptr,
        out_ptr,
        pairs_ptr,
        block_expert_ptr,
        num_pairs,
        num_experts,
        n_out,
        inter,
        stride_a,
        stride_we,
        stride_wn,
        stride_be,
        stride_out,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """(a @ down.T + bias) * routing weight for one block of one expert's pairs and
        BLOCK_N output columns, float32, into each pair's row."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert >= num_experts:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(pairs_ptr + rows)
        valid = pair < num_pairs
        pair64 = pair.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        kk = tl.arange(0, BLOCK_K)
        w = w_ptr + expert.to(tl.int64) * stride_we
        w_ptrs = w + cols[None, :].to(tl.int64) * stride_wn + kk[:, None]  # [BLOCK_K, BLOCK_N]
        a_ptrs = a_ptr + pair64[:, None] * stride_a + kk[None, :]  # [BLOCK_M, BLOCK_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k_ok = k0 + kk < inter
            a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs + k0, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        if HAS_BIAS:
            b = bias_ptr + expert.to(tl.int64) * stride_be
            acc += tl.load(b + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc *= tl.load(route_w_ptr + pair64, mask=valid, other=0.0)[:, None]
        dst = out_ptr + pair64[:, None] * stride_out + cols[None, :]
        tl.store(dst, acc, mask=valid[:, None] & col_ok[None, :])


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Rows a program takes: 16 where an expert has a few rows on average (decode), else 64
    (a prompt's tiles reuse each weight tile over more rows)."""
    return 16 if num_pairs <= 16 * num_experts else 64


def _align_config(num_experts: int, block_m: int) -> dict[str, int]:
    """_align_kernel's tiles: every expert at once, pairs in chunks of some 4K comparisons."""
    block_e = _next_pow2(max(num_experts, 16))
    return dict(BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=max(16, min(256, 4096 // block_e)))


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most blocks `num_pairs` pairs can take: each active expert's run is padded by at
    most block_m - 1 rows, and at most min(num_experts, num_pairs) experts are active."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m


def align_block_size(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] expert ids -> (pairs, block_expert): pairs [B * block_m] int32, the pair ids
    (token * k + choice) sorted by expert, each expert's run padded with `T * k` to a multiple
    of block_m (stable: an expert's pairs in token order); block_expert [B] int32, each block's
    expert, `num_experts` for the blocks past the last run. B = max_blocks(...), from shapes
    alone; nothing is read back to the host."""
    flat = ids.reshape(-1).to(torch.long)
    p = flat.numel()
    dev = flat.device
    nb = max_blocks(p, num_experts, block_m)
    if p <= ALIGN_KERNEL_MAX_PAIRS and num_experts <= ALIGN_KERNEL_MAX_EXPERTS:
        pairs = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
        block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
        _align_kernel[(1,)](
            flat.contiguous(),
            pairs,
            block_expert,
            p,
            num_experts,
            nb,
            **_align_config(num_experts, block_m),
            num_warps=4,
        )
        return pairs, block_expert
    # counts by scatter_add_: torch.bincount reads its input's max back to the host on CUDA
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)  # each expert's run ends before this block
    run_start = (block_end - blocks) * block_m  # each expert's first row
    order = torch.argsort(flat, stable=True)  # sorted position -> pair
    expert = flat.index_select(0, order)
    first = torch.cumsum(counts, 0) - counts  # each expert's first sorted position
    rank = torch.arange(p, device=dev) - first.index_select(0, expert)
    dest = run_start.index_select(0, expert) + rank
    pairs = torch.full((nb * block_m,), p, dtype=torch.int32, device=dev)
    pairs.scatter_(0, dest, order.to(torch.int32))
    block_expert = torch.searchsorted(
        block_end, torch.arange(nb, device=dev), right=True, out_int32=True
    )
    return pairs, block_expert


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    act: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    alpha: float = 1.0,
    limit: float = float("inf"),
) -> torch.Tensor:
    """The MoE block's output [T, H] float32: for each token, the sum over its k choices of
    weights[t, j] * down_e(act(gate_up_e(x[t]))) with e = ids[t, j].

    x [T, H] (any float dtype; cast to the weights' dtype as a dense linear does); w_gate_up
    [E, 2I, H] (gate rows, then up rows) and w_down [E, H, I], bf16 or float32; ids [T, k]
    integer; weights [T, k] float32; `act` one of ACTIVATIONS ("swiglu_clamped" reads `alpha`
    and `limit`); biases [E, 2I] and [E, H] or None."""
    if x.dim() != 2 or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"x {tuple(x.shape)}, ids {tuple(ids.shape)}, weights mismatch")
    num_experts, two_inter, hidden = w_gate_up.shape
    if w_down.shape != (num_experts, hidden, two_inter // 2) or x.shape[1] != hidden:
        raise ValueError(f"expert weights {tuple(w_gate_up.shape)} / {tuple(w_down.shape)}")
    t = x.shape[0]
    args = (w_gate_up, w_down)
    opts = (act, gate_up_bias, down_bias, alpha, limit)
    if t <= CHUNK_TOKENS:  # a decode step: no copy into a larger output
        return _fused_chunk(x, *args, ids, weights, *opts)
    y = torch.empty(t, hidden, dtype=torch.float32, device=x.device)
    for start in range(0, t, CHUNK_TOKENS):
        stop = min(start + CHUNK_TOKENS, t)
        y[start:stop] = _fused_chunk(
            x[start:stop], *args, ids[start:stop], weights[start:stop], *opts
        )
    return y


def _fused_chunk(x, w_gate_up, w_down, ids, weights, act, gate_up_bias, down_bias, alpha, limit):
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_gate_up, w_down = w_gate_up.contiguous(), w_down.contiguous()
    num_experts, two_inter, hidden = w_gate_up.shape
    inter = two_inter // 2
    t, top_k = ids.shape
    p = t * top_k
    if t == 0:
        return torch.zeros(0, hidden, dtype=torch.float32, device=x.device)
    block_m = block_m_for(p, num_experts)
    pairs, block_expert = align_block_size(ids, num_experts, block_m)
    nb = block_expert.shape[0]
    route_w = weights.reshape(-1).to(torch.float32).contiguous()
    mid = torch.empty(p, inter, dtype=w_gate_up.dtype, device=x.device)
    out = torch.empty(p, hidden, dtype=torch.float32, device=x.device)
    dot_f32 = _interpreted()
    _gate_up_kernel[(nb, triton.cdiv(inter, BLOCK_N))](
        x,
        w_gate_up,
        w_gate_up if gate_up_bias is None else gate_up_bias,
        mid,
        pairs,
        block_expert,
        p,
        num_experts,
        hidden,
        inter,
        x.stride(0),
        w_gate_up.stride(0),
        w_gate_up.stride(1),
        0 if gate_up_bias is None else gate_up_bias.stride(0),
        mid.stride(0),
        float(alpha),
        float(limit),
        TOP_K=top_k,
        ACT=ACTIVATIONS[act],
        HAS_BIAS=gate_up_bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        DOT_F32=dot_f32,
        num_warps=4,
    )
    _down_kernel[(nb, triton.cdiv(hidden, BLOCK_N))](
        mid,
        w_down,
        w_down if down_bias is None else down_bias,
        route_w,
        out,
        pairs,
        block_expert,
        p,
        num_experts,
        hidden,
        inter,
        mid.stride(0),
        w_down.stride(0),
        w_down.stride(1),
        0 if down_bias is None else down_bias.stride(0),
        out.stride(0),
        HAS_BIAS=down_bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        DOT_F32=dot_f32,
        num_warps=4,
    )
    return out.view(t, top_k, hidden).sum(dim=1)


def compile_for_cuda(arch: int, num_experts: int, top_k: int, act: str = "silu") -> dict[str, int]:
    """Compile the three kernels for a CUDA target (e.g. 90: H100/H200) without a GPU, with bf16
    weights, at both block heights (decode and prompt), with biases where the activation is
    gpt-oss's: what the interpreter does not check (tile shapes, shared memory). A model's
    hidden and intermediate sizes are runtime arguments (one binary serves them all); its
    expert count (the alignment's tile), top-k and activation are compiled in. Returns each
    variant's shared memory in bytes. Needs a process without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bias = act == "swiglu_clamped"
    types = {"x_ptr": "*fp32", "route_w_ptr": "*fp32", "out_ptr": "*bf16", "ids_ptr": "*i64"}
    types |= {"pairs_ptr": "*i32", "block_expert_ptr": "*i32", "alpha": "fp32", "limit": "fp32"}
    shared = {}
    for block_m in (16, 64):
        common = dict(
            HAS_BIAS=bias, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_F32=False
        )
        gate_up = dict(common, TOP_K=top_k, ACT=ACTIVATIONS[act])
        for name, kernel, config, out in (
            ("align", _align_kernel, _align_config(num_experts, block_m), None),
            ("gate_up", _gate_up_kernel, gate_up, "*bf16"),
            ("down", _down_kernel, common, "*fp32"),
        ):
            signature = {}
            for a in kernel.arg_names:
                if a in config:
                    signature[a] = "constexpr"
                elif a == "out_ptr":
                    signature[a] = out
                else:
                    signature[a] = types.get(a, "*bf16" if a.endswith("_ptr") else "i32")
            compiled = triton.compile(
                ASTSource(kernel, signature, config),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": 4},
            )
            assert "cubin" in compiled.asm
            shared[f"{name}_m{block_m}"] = compiled.metadata.shared
    return shared
