"""One-row products of cold matrices on the int8 VNNI kernel (csrc/wq_vnni.c) at several
distances of its software prefetch, alternating in one process, so that the host's drift falls
on every distance alike.

    .venv/bin/python benchmarks/bench_prefetch.py [--distances 0,4096,8192] [--rounds 80]

Each shape is packed as 4-bit K-quant levels (the linears' format), copied enough times to leave
the CPU's caches (each call reads from memory), into anonymous memory in 2 MiB pages, as the
loader maps the packed model (model/loader/page_cache.py). Prints the median microseconds per
matrix and the bytes read per second for each distance (0: no software prefetch; the kernels'
loader sets 8,192 on AMD CPUs, 0 elsewhere). --head: the 4-bit LM head's one-row products
(kernels/int4_head.py) with its next-task prefetch on and off instead.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import statistics
import sys
import time
from pathlib import Path

import torch

from girandole.model.kernels import int4_head, loader, wq_gemm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_lines, markdown_table  # noqa: E402

HUGE_PAGE = 2 << 20
# (outputs, inputs, copies): an expert's gate_up and down (Qwen3-30B-A3B), Qwen3-0.6B's QKV-sized
# and Llama-3.2-1B's down-sized matrices
SHAPES = [(1536, 2048, 60), (2048, 768, 100), (4096, 2048, 20), (2048, 8192, 8)]
# (vocabulary, hidden, copies): the LM heads of the default model, the MoE file, Llama-3.2-1B
HEADS = [(262144, 640, 3), (16384, 2048, 8), (128256, 2048, 1)]


def huge_copy(t: torch.Tensor, keep: list) -> torch.Tensor:
    """t copied into anonymous memory advised MADV_HUGEPAGE, 2 MiB-aligned."""
    n = t.numel() * t.element_size()
    mm = mmap.mmap(-1, n + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    anchor = ctypes.c_char.from_buffer(mm)
    offset = (-ctypes.addressof(anchor)) % HUGE_PAGE
    del anchor
    keep.append(mm)
    out = torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=offset)
    out.copy_(t.contiguous().view(torch.uint8).reshape(-1))
    return out.view(t.dtype).view(t.shape)


def k_quant(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random Q4_K-like levels and per-32 scales and offsets (float16-exact superblock factors)."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    d = (torch.rand(n, k // 256, 1) * 1e-3).half().float()
    dmin = (torch.rand(n, k // 256, 1) * 1e-3).half().float()
    sc = torch.randint(0, 64, (n, k // 256, 8)).float()
    m = torch.randint(0, 64, (n, k // 256, 8)).float()
    return q, (d * sc).reshape(n, -1), (-(dmin * m)).reshape(n, -1)


def bench_head(lib, rounds: int) -> list[list[str]]:
    """The 4-bit LM head at one row, its next-task prefetch on and off, alternating."""
    rows = []
    for vocab, hidden, copies in HEADS:
        keep: list = []
        packed = int4_head.pack(*int4_head.quantize(torch.randn(vocab, hidden) * 0.05))
        heads = [huge_copy(packed, keep) for _ in range(copies)]
        x = torch.randint(-127, 127, (1, hidden), dtype=torch.int8)
        sx = torch.rand(1, 1)
        times: dict[int, list[float]] = {1: [], 0: []}
        try:
            for _ in range(rounds):
                for on in times:
                    lib.int4_head_set_prefetch(on)
                    t0 = time.perf_counter()
                    for w in heads:
                        int4_head.gemm(x, sx, w, vocab)
                    times[on].append((time.perf_counter() - t0) / copies)
        finally:
            loader.tune_prefetch(lib)
        nbytes = packed.numel() * packed.element_size()
        row = [f"{vocab:,} x {hidden:,} ({nbytes / 1e6:.1f} MB)"]
        for on in times:
            med = statistics.median(times[on][2:])
            row.append(f"{med * 1e3:.3f} ms, {nbytes / med / 1e9:.1f} GB/s")
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--distances", default="0,4096,8192")
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--head", action="store_true", help="the 4-bit LM head instead")
    args = p.parse_args()
    lib = loader.library()
    if lib is None or not wq_gemm.vnni_default():
        sys.exit("the native int8 VNNI kernel does not run here")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.head:
        rows = bench_head(lib, min(args.rounds, 30))
        print(markdown_table(["LM head", "next task prefetched", "no prefetch"], rows))
        for line in machine_lines():
            print(line)
        return
    distances = [int(d) for d in args.distances.split(",")]
    rows = []
    for n, k, copies in SHAPES:
        keep: list = []
        packed, params, bits = wq_gemm.pack(*k_quant(n, k), vnni=True)
        mats = [(huge_copy(packed, keep), huge_copy(params, keep)) for _ in range(copies)]
        x, y = torch.randn(1, k).bfloat16(), torch.empty(1, n)
        calls = [wq_gemm.bind(x, a, b, bits, y, decode=True) for a, b in mats]
        nbytes = packed.numel() * packed.element_size() + params.numel() * params.element_size()
        times: dict[int, list[float]] = {d: [] for d in distances}
        try:
            for _ in range(args.rounds):
                for d in distances:
                    lib.wq_vnni_set_prefetch(d)
                    t0 = time.perf_counter()
                    for fn, call_args in calls:
                        fn(*call_args)
                    times[d].append((time.perf_counter() - t0) / len(calls))
        finally:
            loader.tune_prefetch(lib)
        row = [f"{n:,} x {k:,} ({nbytes / 1e6:.2f} MB)"]
        for d in distances:
            med = statistics.median(times[d][3:])
            row.append(f"{med * 1e6:.1f} us, {nbytes / med / 1e9:.1f} GB/s")
        rows.append(row)
    print(f"{args.rounds} rounds, distances alternating, {args.threads} threads")
    print(markdown_table(["matrix"] + [f"{d:,} bytes ahead" for d in distances], rows))
    for line in machine_lines():
        print(line)


if __name__ == "__main__":
    main()
