"""Decode attention reading the KV cache from memory: one query row per layer against its
sequence's keys (--rows sequences together, a batched step's) in a paged float16 cache (blocks
of 16 slots, scattered), the layers' caches too big together for the CPU's caches, as in a
decode step of a model whose weights and cache stream from memory. bench_kernels.py's attention
cell reads one layer's cache again and again (it stays in cache); this is the cold case a decode
step sees.

    .venv/bin/python benchmarks/bench_decode_attention.py [--contexts 128,512,2048] [--threads 2]
        [--rows 1]

Prints, per model's attention shape (query heads / KV heads / head dim) and context, the
median microseconds per layer and the KV bytes read per second: girandole's native paged
attention (csrc/paged_attention.c) over caches allocated as the engine's are
(kv_groups.cache_zeros: 2 MiB pages where Linux has transparent huge pages) and over the same
caches in 4 KiB pages, and the torch path it replaces (the sequence's keys and values gathered,
then torch's scaled_dot_product_attention: model/attention.py). The three alternate within each
repeat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from girandole.engine.kv_groups import cache_zeros
from girandole.model import kernels
from girandole.model.attention import Attention
from girandole.model.kernels import paged_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_lines  # noqa: E402

BLOCK = 16  # KV cache block size, slots
# query heads, KV heads, head dim, layers: the benchmark models' attention
SHAPES = {
    "Gemma 3 270M": (4, 1, 256, 18),
    "Qwen3-0.6B": (16, 8, 128, 28),
    "Llama-3.2-1B": (32, 8, 64, 16),
    "Qwen3-30B-A3B": (32, 4, 128, 48),
}
CACHE_BYTES = 256 << 20  # every layer's cache together: well beyond the CPU's last-level cache


def random_cache(
    shape: tuple[int, ...], huge_pages: bool | None = None, g: torch.Generator | None = None
) -> torch.Tensor:
    """Random float16 keys or values in a cache tensor allocated as the engine's (None: its
    pages as GIRANDOLE_KV_HUGE_PAGES says; also bench_native_ab.py's)."""
    t = cache_zeros(shape, torch.float16, "cpu", huge_pages=huge_pages)
    return t.copy_(torch.randn(shape, generator=g))


def bench_shape(
    heads: int, kv_heads: int, dim: int, layers: int, context: int, rows: int, repeats: int
) -> tuple[float, float, float | None, int]:
    """(native in 2 MiB pages, native in 4 KiB pages, torch) median microseconds per layer, and
    the KV bytes a layer reads."""
    g = torch.Generator().manual_seed(0)
    kv_bytes = rows * context * kv_heads * dim * 2 * 2  # keys and values, float16
    # As many layers' caches as make CACHE_BYTES (at least the model's, or 2 where each is
    # larger than a CPU's caches), each a pool of twice the sequences' blocks, theirs scattered
    n = max(layers if 2 * kv_bytes * layers <= CACHE_BYTES else 2, CACHE_BYTES // (2 * kv_bytes))
    per_row = -(-context // BLOCK)
    slots = 2 * rows * per_row * BLOCK
    caches = {
        huge: [tuple(random_cache((slots, kv_heads, dim), huge, g) for _ in "kv") for _ in range(n)]
        for huge in (True, False)
    }
    blocks = torch.randperm(slots // BLOCK, generator=g)[: rows * per_row].view(rows, per_row)
    seqs = [(b[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:context] for b in blocks]
    seq = torch.cat(seqs)
    q = torch.randn(rows, heads, dim, generator=g)
    out = torch.empty(rows, heads, dim)
    starts, lens = torch.arange(rows) * context, torch.full((rows,), context)
    layer = Attention(heads, kv_heads, dim, dim**-0.5)
    calls = {
        huge: [
            paged_attention.bind(q, k, v, seq, starts, lens, None, layer.scale, out)
            for k, v in caches[huge]
        ]
        for huge in (True, False)
    }

    def native(huge: bool) -> None:
        for fn, args in calls[huge]:
            fn(*args)

    def gathered() -> None:
        for k, v in caches[True]:
            for i, s in enumerate(seqs):
                layer._attend_sequence(
                    q[i : i + 1], k.index_select(0, s).float(), v.index_select(0, s).float()
                )

    # torch's path for one row (for 16 it takes minutes)
    fns = (lambda: native(True), lambda: native(False), gathered)[: 3 if rows == 1 else 2]
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(repeats + 1):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            if rep:  # the first: warm-up
                ts.append((time.perf_counter() - start) / n)
    huge, small, *gather = (statistics.median(ts) * 1e6 for ts in times)
    return huge, small, gather[0] if gather else None, kv_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", default="128,512,2048", help="keys per query row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rows", type=int, default=1, help="sequences decoding together")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("native kernels unavailable here (x86 with AVX512 VNNI and BF16 or AVX2)")
    contexts = [int(c) for c in args.contexts.split(",")]
    print("\n".join(machine_lines()))
    print(
        f"threads: {args.threads}; median us per layer (GB/s of KV read), {args.rows} decode "
        f"row(s), float16 cache, caches of {CACHE_BYTES >> 20} MiB in all"
    )
    print(
        "| attention (heads / KV heads / dim) | context | native paged, 2 MiB pages"
        " | native paged, 4 KiB pages | 4 KiB / 2 MiB | gather + SDPA | gather / native |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (heads, kv_heads, dim, layers) in SHAPES.items():
        for context in contexts:
            nat, small, tor, kv = bench_shape(
                heads, kv_heads, dim, layers, context, args.rows, args.repeats
            )
            torch_cells = "– | –"  # not run for several rows
            if tor:
                torch_cells = f"{tor:.1f} ({kv / tor / 1e3:.1f}) | {tor / nat:.2f}x"
            print(
                f"| {name} ({heads} / {kv_heads} / {dim}) | {context} | "
                f"{nat:.1f} ({kv / nat / 1e3:.1f}) | {small:.1f} ({kv / small / 1e3:.1f}) | "
                f"{small / nat:.2f}x | {torch_cells} |"
            )


if __name__ == "__main__":
    main()
