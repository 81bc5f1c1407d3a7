"""Native weight-quantized GEMM for decode rows (csrc/wq_gemm.c), built on first use.

The C source is compiled with the system's C compiler into the cache folder (about a second)
and called through ctypes, which releases the GIL. It needs an x86 CPU with AVX512-BF16 and a
C compiler; without either (or with GIRANDOLE_NATIVE_KERNELS=0) `available()` is False and the
quantized linears fall back to torch's int4 kernels.

`pack` turns integer levels q [N, K] with (scale, offset) per row and group of 32 inputs into
the kernel's layout; `gemm` runs it. Rows are computed independently (batch invariant).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "wq_gemm.c"
FLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mfma",
    "-ffp-contract=off",  # q * scale + offset rounds as the dense copy's does
    "-fopenmp",  # resolves to the libgomp torch has loaded: one thread pool
    "-shared",
    "-fPIC",
]
GROUP = 32
BLOCK_N = 16
CHUNK = 4  # blocks per chunk, as in the C source


def _cpu_supported() -> bool:
    if sys.platform != "linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}.so")
    subprocess.run(
        [compiler, *FLAGS, str(SOURCE), "-o", str(tmp)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    os.replace(tmp, target)  # atomic: concurrent builders each write their own temp file


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("GIRANDOLE_NATIVE_KERNELS", "1") == "0" or not _cpu_supported():
        return None
    from girandole.model.default import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"wq_gemm-{key}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("native decode kernel unavailable, using torch's: %s", detail)
        return None
    fn = lib.wq_gemm
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr, i64, ptr, ctypes.c_int]
    fn.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def supports(n: int, k: int) -> bool:
    return n % BLOCK_N == 0 and k % GROUP == 0


def pack(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Levels q [N, K] (0..15 or 0..255), scale and offset [N, K/32] (w = q * scale + offset)
    -> (packed uint8 weights, float32 params, bits) in the kernel's layout (see the C source)."""
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
    return torch.cat(packed_parts), torch.cat(param_parts).contiguous(), bits


def gemm(
    x: torch.Tensor, packed: torch.Tensor, params: torch.Tensor, bits: int, out_features: int
) -> torch.Tensor:
    """float32 [M, N] = x [M, K] (cast to bf16) times the packed weight's transpose."""
    lib = _library()
    assert lib is not None, "native kernel not available"
    x = x.to(torch.bfloat16).contiguous()
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.float32)
    lib.wq_gemm(
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
