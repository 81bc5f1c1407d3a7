"""Native coarse logits from a 4-bit copy of the LM head (csrc/int4_head.c): 4-bit levels with a
float16 scale and minimum per row and group of 32 inputs, against the int8-quantized hidden
state. 5 bits a weight where the int8 copy takes 8; QuantLMHead recomputes its candidates
exactly. From AMX_MIN_ROWS rows on, on the AMX tiles where the CPU has them (csrc/amx.c: the
same int32 group sums and float steps, so bitwise the same logits). Available where the kernels
build (loader.py: x86 with AVX512 or AVX2, and a C compiler)."""

from __future__ import annotations

import torch

from girandole.model.kernels import loader

GROUP = 32
BLOCK = 16  # channels per block
TASK = 4  # blocks per task, as in the C source
FP16_MAX = 60000.0
# Rows from which the AMX kernel is the faster (both give the same bits): 16 rows 9.1 vs
# 10.7 ms, 64 rows 43 vs 53 ms for a 262k x 640 head; 8 rows 7.3 vs 5.7 (bench_kernels.py).
AMX_MIN_ROWS = 16


def supports(n: int, k: int, weight_absmax: float) -> bool:
    return n % BLOCK == 0 and k % GROUP == 0 and weight_absmax < FP16_MAX


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [N, K] -> (levels uint8 [N, K] in 0..15, scale and minimum float16 [N, K/32]):
    w ~ q * scale + minimum, from each group's min and max (rounded to float16 first, so the
    levels fit the stored parameters)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    minimum = lo.half()
    scale = ((hi - minimum.float()) / 15).half()
    s = scale.float().clamp(min=torch.finfo(torch.float16).tiny)
    q = torch.round((wg - minimum.float()[..., None]) / s[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(n, k), scale, minimum


def dequantize(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    w = (
        q.float().reshape(n, k // GROUP, GROUP) * scale.float()[..., None]
        + minimum.float()[..., None]
    )
    return w.reshape(n, k)


def pack(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The kernel's layout (see the C source) of levels q [N, K] with float16 scale and minimum
    [N, K/32]: uint8, 320 bytes per block of 16 channels and group of 32 inputs."""
    n, k = q.shape
    nb, g = n // BLOCK, k // GROUP
    # [block, c, g, j, half, i] -> byte (low | high << 4) at [block, g, j, c, i].
    v = q.reshape(nb, BLOCK, g, 4, 2, 4)
    v = v[..., 0, :] | (v[..., 1, :] << 4)
    levels = v.permute(0, 2, 3, 1, 4).reshape(nb, g, 256)

    def params(p: torch.Tensor) -> torch.Tensor:  # [N, g] float16 -> [nb, g, 32] bytes
        return p.reshape(nb, BLOCK, g).transpose(1, 2).contiguous().view(torch.uint8)

    blocks = torch.cat([levels, params(scale), params(minimum)], dim=-1)  # [nb, g, 320]
    # Tasks of TASK blocks, each group-major: [task][g][block][320].
    parts = [blocks[b0 : b0 + TASK].transpose(0, 1).reshape(-1) for b0 in range(0, nb, TASK)]
    return torch.cat(parts)


def gemm(
    xq: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor, n: int, amx: bool | None = None
) -> torch.Tensor:
    """float32 [M, N] coarse logits: int8 rows xq [M, K] with row scales xs [M] (or [M, 1]).
    `amx`: force the AMX (True) or VNNI (False) kernel; None: by rows, where AMX runs."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    xq = xq.contiguous()
    xs = xs.float().reshape(-1).contiguous()
    m, k = xq.shape
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return y
    fn = lib.int4_head_gemm_amx if loader.use_amx(amx, m, AMX_MIN_ROWS) else lib.int4_head_gemm
    fn(
        xq.data_ptr(), m, k, packed.data_ptr(), xs.data_ptr(), n, y.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return y
