"""girandole's native CPU kernels: the C sources in csrc/, compiled on first use by `loader`,
and one Python face per C file (rms_norm, gated_act, paged_attention, wq_gemm, int8_gemm,
logits). Each face has a `supported`/`supports` check; callers fall back to torch's kernels
where the kernels are not built (not x86 with AVX512-BF16/VNNI or AVX2/FMA/F16C, no C
compiler, or GIRANDOLE_NATIVE_KERNELS=0)."""

from girandole.model.kernels.loader import available, library

__all__ = ["available", "library"]
