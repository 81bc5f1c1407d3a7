"""Native weight-quantized GEMM (csrc/wq_gemm.c) for the group-quantized linears.

`pack` turns integer levels q [N, K] with (scale, offset) per row and group of 32 inputs into
the kernel's layout; `gemm` runs it: on the AMX tiles where the CPU has them (csrc/amx.c, for
every row count: one kernel keeps rows batch-invariant), else on AVX512-BF16. Rows are computed
independently (batch invariant). Available where the kernels build (x86 with AVX512-BF16 and a
C compiler).
"""

from __future__ import annotations

import torch

from girandole.model.kernels import loader

GROUP = 32
BLOCK_N = 16
CHUNK = 4  # blocks per chunk, as in the C source
FUSED = 16  # or'ed into bits where q * scale + offset is exact in float32 (WQ_FUSED in C)


def supports(n: int, k: int) -> bool:
    return n % BLOCK_N == 0 and k % GROUP == 0


def exact_in_float32(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> bool:
    """Whether q * scale + offset, per group of 32, is the same computed in float32 (a multiply
    and an add, each rounded) as exactly (float64 holds these products and sums exactly)."""
    n, k = q.shape
    levels = q.reshape(n, k // GROUP, GROUP)
    rounded = levels.float() * scale.float()[..., None] + offset.float()[..., None]
    exact = levels.double() * scale.double()[..., None] + offset.double()[..., None]
    return bool(torch.equal(rounded.double(), exact))


def pack(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Levels q [N, K] (0..15 or 0..255), scale and offset [N, K/32] (w = q * scale + offset)
    -> (packed uint8 weights, float32 params, bits) in the kernel's layout (see the C source).
    `bits`: 4 or 8, with FUSED or'ed in where no weight's q * scale + offset rounds in float32
    (then the kernel's one FMA gives the same floats as a multiply and an add)."""
    n, k = q.shape
    nb, g = n // BLOCK_N, k // GROUP
    bits = 4 if int(q.max()) <= 15 else 8
    # [block, c, g, pair, e] -> [block, g, pair, c, e]: a pair's 32 values are (channel, input).
    v = q.to(torch.uint8).reshape(nb, BLOCK_N, g, GROUP // 2, 2).permute(0, 2, 3, 1, 4)
    v = v.reshape(nb, g, GROUP // 2, 32)
    if bits == 4:
        v = v[..., :16] | (v[..., 16:] << 4)
    # [block, c, g] scale and offset -> [block, g, 2, c].
    params = torch.stack([scale.float(), offset.float()], dim=1)  # [N, 2, g]
    params = params.reshape(nb, BLOCK_N, 2, g).permute(0, 3, 2, 1)
    # Chunks of CHUNK blocks, each stored group-major: [chunk][g][block]...
    packed_parts, param_parts = [], []
    for c0 in range(0, nb, CHUNK):
        packed_parts.append(v[c0 : c0 + CHUNK].transpose(0, 1).reshape(-1))
        param_parts.append(params[c0 : c0 + CHUNK].transpose(0, 1).reshape(-1))
    if exact_in_float32(q, scale, offset):
        bits |= FUSED
    return torch.cat(packed_parts), torch.cat(param_parts).contiguous(), bits


def gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    params: torch.Tensor,
    bits: int,
    out_features: int,
    amx: bool | None = None,
) -> torch.Tensor:
    """float32 [M, N] = x [M, K] (cast to bf16) times the packed weight's transpose. `amx`:
    force the AMX (True) or AVX512 (False) kernel; None: AMX where it runs."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    x = x.to(torch.bfloat16).contiguous()
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.float32)
    if m == 0:
        return y
    fn = lib.wq_gemm_amx if loader.use_amx(amx, m) else lib.wq_gemm
    fn(
        x.data_ptr(),
        m,
        k,
        packed.data_ptr(),
        bits,
        params.data_ptr(),
        out_features,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y
