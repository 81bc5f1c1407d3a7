"""The native CPU kernels' loader: csrc/*.c compiled on first use and loaded with ctypes.

The C sources are compiled with the system's C compiler into one shared library in the cache
folder (about two seconds, once per source version) and called through ctypes, which releases
the GIL. They are written for AVX512 (x86 with AVX512-BF16 and VNNI: Intel Xeon from Cooper
Lake, AMD Zen 4); on an x86 CPU with only AVX2, FMA and F16C (laptops, AMD Zen 2/3, Intel
before Ice Lake) the same sources are built a second way, each 512-bit operation as two
256-bit ones (csrc/avx2_compat.h): `isa()` says which. Without either, or a C compiler, or
with GIRANDOLE_NATIVE_KERNELS=0, `library()` is None and callers use torch's kernels instead.
GIRANDOLE_NATIVE_ISA=avx2 builds the AVX2 library on an AVX512 CPU too (to test it there).

On a CPU with AMX (Intel Xeon, Sapphire Rapids and later) whose kernel grants the tile state,
`amx()` is true and the linears and the LM head run on the matrix units (csrc/amx.c);
GIRANDOLE_AMX=0 keeps them on the AVX512 kernels. A compiler without AMX support builds the
rest alone. Without AMX the linears' decode rows take int8 activations (csrc/wq_vnni.c;
GIRANDOLE_VNNI=0: bf16 as prompt rows do, kernels/wq_gemm.py).
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
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from girandole.env_switches import env_switch, native_isa_setting

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))
HEADERS = sorted(CSRC.glob("*.h"))
AMX_SOURCES = [CSRC / "amx.c"]
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16", "-mamx-int8"]
COMMON_FLAGS = [
    "-O3",
    "-ffp-contract=off",  # rounding exactly as written (see wq_gemm.c)
    "-fopenmp",  # resolves to the libgomp torch has loaded: one thread pool
    "-shared",
    "-fPIC",
]
# Per instruction set: the compiler's flags and the /proc/cpuinfo flags the CPU needs.
ISA_FLAGS = {
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx512bf16",
        "-mavx512vnni",
        "-mfma",
    ],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
ISA_CPU_FLAGS = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"),
    "avx2": ("avx2", "fma", "f16c"),
}
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")

i64, ptr, f32, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    # x, M, K, q, bits, params, N, y, ldy, nthreads
    "wq_gemm": [ptr, i64, i64, ptr, c_int, ptr, i64, ptr, i64, c_int],
    "wq_gemm_vnni": [ptr, i64, i64, ptr, c_int, ptr, i64, ptr, i64, c_int],
    # x, M, K, w, wsum, xs, ws, N, y, nthreads
    "int8_gemm": [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, c_int],
    # q, k_cache, v_cache, slots, starts, lens, S, H, Hkv, D, window, scale, sinks, out, nthreads
    "paged_attention": [*[ptr] * 6, i64, i64, i64, i64, i64, f32, ptr, ptr, c_int],
    "paged_attention_f16": [*[ptr] * 6, i64, i64, i64, i64, i64, f32, ptr, ptr, c_int],
    # x, M, K, w, xs, N, y, nthreads
    "int4_head_gemm": [ptr, i64, i64, ptr, ptr, i64, ptr, c_int],
    # logits, M, V, x, H, table_q, table_scale, margin, top, nthreads
    "lm_head_refine": [ptr, i64, i64, ptr, i64, ptr, ptr, f32, i64, c_int],
    # logits, M, V, out, nthreads
    "argmax_rows": [ptr, i64, i64, ptr, c_int],
    # x, temps, M, V, nthreads
    "sampling_weights_rows": [ptr, ptr, i64, i64, c_int],
    # x, M, V, n, out_values, out_ids, nthreads
    "top_rows": [ptr, i64, i64, i64, ptr, ptr, c_int],
    # gu, T, I, act, out, nthreads
    "gated_act": [ptr, i64, i64, c_int, ptr, c_int],
    # x, T, H, I, E, ids, weights, k, decode, dense_min_rows, gate_up, down, act, y, nthreads
    "moe_experts": [ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr, ptr, c_int, ptr, c_int],
    # x, T, H, w, E, logits, nthreads
    "moe_router": [ptr, i64, i64, ptr, i64, ptr, c_int],
    "moe_route": [ptr, i64, i64, i64, c_int, ptr, ptr],
    "wq_vnni_set_prefetch": [c_int],
    "int4_head_set_prefetch": [c_int],
    # k, v, k_stride, v_stride, slots, rows, width, k_cache, v_cache
    "kv_cache_write": [ptr, ptr, i64, i64, ptr, i64, i64, ptr, ptr],
    "kv_cache_write_f16": [ptr, ptr, i64, i64, ptr, i64, i64, ptr, ptr],
    # x, T, P, D, stride, w, eps, cos, sin, out, nthreads
    "rms_norm": [ptr, i64, i64, i64, i64, ptr, f32, ptr, ptr, ptr, c_int],
    # x, T, K, slot, a, bt, rank, N, y, nthreads
    "lora_apply": [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, c_int],
}
AMX_SIGNATURES = {
    "amx_init": [],
    # x, M, K, q, bits, params, N, y, ldy, nthreads
    "wq_gemm_amx": [ptr, i64, i64, ptr, c_int, ptr, i64, ptr, i64, c_int],
    # x, M, K, w, xs, ws, N, y, nthreads
    "int8_gemm_amx": [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, c_int],
    # x, M, K, w, xs, N, y, nthreads
    "int4_head_gemm_amx": [ptr, i64, i64, ptr, ptr, i64, ptr, c_int],
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty off Linux)."""
    if sys.platform != "linux":
        return frozenset()
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


@functools.cache
def isa() -> str | None:
    """The instruction set the native kernels are built for here: "avx512" where the CPU has
    AVX512-BF16 and VNNI, else "avx2" where it has AVX2, FMA and F16C, else None (not x86, or
    older). GIRANDOLE_NATIVE_ISA=avx2 asks for the AVX2 build on an AVX512 CPU."""
    forced = native_isa_setting()
    for name in ISA_FLAGS:
        if forced and name != forced:
            continue
        if all(f in cpu_flags() for f in ISA_CPU_FLAGS[name]):
            return name
    return None


def flags(name: str) -> list[str]:
    return COMMON_FLAGS + ISA_FLAGS[name]


def _compile(compiler: str, flags: list[str], sources: list[Path], out: Path) -> None:
    """Compile every source to an object at once, then link them: a first start waited for one
    compiler run over the sources in turn (~13 s on two cores, paged_attention.c alone ~5 s)."""
    object_flags = [f for f in flags if f != "-shared"]
    with tempfile.TemporaryDirectory(prefix=f"{out.name}.", dir=out.parent) as folder:
        objects = [Path(folder) / f"{source.stem}.o" for source in sources]
        with ThreadPoolExecutor(max_workers=min(len(sources), os.cpu_count() or 1)) as pool:
            runs = [
                pool.submit(_run, [compiler, *object_flags, "-c", str(src), "-o", str(obj)])
                for src, obj in zip(sources, objects)
            ]
            for run in runs:
                run.result()  # a compiler error, raised as the sequential build raised it
        _run([compiler, *flags, *map(str, objects), "-lm", "-o", str(out)])  # moe_router's expf


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)


def _build(target: Path, name: str) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}.so")
    rest = [s for s in SOURCES if s not in AMX_SOURCES]
    if name != "avx512":  # the AMX kernels need AVX512 around them
        _compile(compiler, flags(name), rest, tmp)
    else:
        try:
            _compile(compiler, flags(name) + AMX_FLAGS, SOURCES, tmp)
        except subprocess.CalledProcessError as exc:
            log.info("building the native kernels without AMX: %s", exc.stderr)
            _compile(compiler, flags(name), rest, tmp)
    os.replace(tmp, target)  # atomic: concurrent builders each write their own temp file


@functools.cache
def library() -> ctypes.CDLL | None:
    name = isa()
    if not env_switch("NATIVE_KERNELS") or name is None:
        return None
    from girandole.model.default import cache_dir

    h = hashlib.sha256(" ".join(flags(name) + AMX_FLAGS).encode())
    for source in SOURCES + HEADERS:
        h.update(source.read_bytes())
    target = cache_dir() / "kernels" / f"girandole-native-{name}-{h.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(target, name)
        return open_library(target)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("native CPU kernels unavailable, using torch's: %s", detail)
        return None


def open_library(path: Path) -> ctypes.CDLL:
    """A built library loaded, its functions' signatures set and its prefetch tuned (library();
    benchmarks/bench_native_ab.py opens two builds side by side)."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    for name, argtypes in AMX_SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is not None:  # absent where the compiler could not build amx.c
            fn.argtypes = argtypes
            fn.restype = c_int if name == "amx_init" else None
    tune_prefetch(lib)
    return lib


WQ_PREFETCH_BYTES = 8192  # the int8 kernel's software prefetch distance on AMD CPUs


def tune_prefetch(lib: ctypes.CDLL) -> None:
    """The kernels' software prefetch as measured per CPU vendor (docs/benchmarks.md, "The int8
    kernel's software prefetch"): on AMD (Zen 4) the int8 linears read 8 KiB ahead and the 4-bit
    LM head prefetches nothing; elsewhere the int8 linears prefetch nothing and the head
    prefetches its next task, as on the Intel host it was tuned on. Numbers never change."""
    amd = "AuthenticAMD" in cpu_flags()
    lib.wq_vnni_set_prefetch(WQ_PREFETCH_BYTES if amd else 0)
    lib.int4_head_set_prefetch(0 if amd else 1)


@functools.cache
def amx() -> bool:
    """Whether the AMX kernels run here: built, on a CPU with AMX tiles for bf16 and int8,
    granted the tile state by the OS (requested once per process), and not switched off by
    GIRANDOLE_AMX=0."""
    lib = library()
    if lib is None or not env_switch("AMX"):
        return False
    if not hasattr(lib, "amx_init") or not all(f in cpu_flags() for f in AMX_CPU_FLAGS):
        return False
    if not lib.amx_init():
        log.warning("the OS refused AMX tile state: using the AVX512 kernels")
        return False
    return True


def available() -> bool:
    """Whether the native kernels are built and loadable here."""
    return library() is not None


def use_amx(force: bool | None, rows: int, min_rows: int = 0) -> bool:
    """Whether a kernel call takes its AMX twin: `force` where given (True only where AMX
    runs), else from `min_rows` rows on where AMX runs."""
    if force is None:
        return rows >= min_rows and amx()
    assert not force or amx(), "AMX kernels not available"
    return force
