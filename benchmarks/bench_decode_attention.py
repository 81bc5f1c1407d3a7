"""Decode attention reading the KV cache from memory: one query row per layer against its
sequence's keys in a paged float16 cache (blocks of 16 slots, scattered), the layers' caches
too big together for the CPU's caches, as in a decode step of a model whose weights and cache
stream from memory. bench_kernels.py's attention cell reads one layer's cache again and again
(it stays in cache); this is the cold case a decode step sees.

    .venv/bin/python benchmarks/bench_decode_attention.py [--contexts 128,512,2048] [--threads 2]

Prints, per model's attention shape (query heads / KV heads / head dim) and context, the
median microseconds per layer and the KV bytes read per second: girandole's native paged
attention (csrc/paged_attention.c) against the torch path it replaces (the sequence's keys and
values gathered, then torch's scaled_dot_product_attention: model/attention.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

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


def bench_shape(
    heads: int, kv_heads: int, dim: int, layers: int, context: int, repeats: int
) -> tuple[float, float, int]:
    """(native, torch) median microseconds per layer, and the KV bytes a layer reads."""
    g = torch.Generator().manual_seed(0)
    kv_bytes = context * kv_heads * dim * 2 * 2  # keys and values, float16
    # As many layers' caches as make CACHE_BYTES (at least the model's), each twice the context
    n = max(layers, CACHE_BYTES // (2 * kv_bytes))
    slots = 2 * context // BLOCK * BLOCK + BLOCK
    caches = [
        (
            torch.randn(slots, kv_heads, dim, generator=g).half(),
            torch.randn(slots, kv_heads, dim, generator=g).half(),
        )
        for _ in range(n)
    ]
    blocks = torch.randperm(slots // BLOCK, generator=g)[: -(-context // BLOCK)]
    seq = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:context].contiguous()
    q = torch.randn(1, heads, dim, generator=g)
    out = torch.empty(1, heads, dim)
    starts, lens = torch.zeros(1, dtype=torch.long), torch.tensor([context])
    layer = Attention(heads, kv_heads, dim, dim**-0.5)
    calls = [
        paged_attention.bind(q, k, v, seq, starts, lens, None, layer.scale, out) for k, v in caches
    ]

    def native() -> None:
        for fn, args in calls:
            fn(*args)

    def gathered() -> None:
        for k, v in caches:
            layer._attend_sequence(
                q, k.index_select(0, seq).float(), v.index_select(0, seq).float()
            )

    results = []
    for fn in (native, gathered):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) / n)
        results.append(statistics.median(times) * 1e6)
    return results[0], results[1], kv_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", default="128,512,2048", help="keys per query row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("native kernels unavailable here (x86 with AVX512 VNNI and BF16 or AVX2)")
    contexts = [int(c) for c in args.contexts.split(",")]
    print("\n".join(machine_lines()))
    print(
        f"threads: {args.threads}; median us per layer (GB/s of KV read), one decode row, "
        f"float16 cache, caches of {CACHE_BYTES >> 20} MiB in all"
    )
    print("| attention (heads / KV heads / dim) | context | native paged | gather + SDPA | ratio |")
    print("|---|---|---|---|---|")
    for name, (heads, kv_heads, dim, layers) in SHAPES.items():
        for context in contexts:
            nat, tor, kv = bench_shape(heads, kv_heads, dim, layers, context, args.repeats)
            print(
                f"| {name} ({heads} / {kv_heads} / {dim}) | {context} | "
                f"{nat:.1f} ({kv / nat / 1e3:.1f}) | {tor:.1f} ({kv / tor / 1e3:.1f}) | "
                f"{tor / nat:.2f}x |"
            )


if __name__ == "__main__":
    main()
