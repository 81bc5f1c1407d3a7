"""The native paged attention kernel (csrc/paged_attention.c) on one prompt's prefill, timed in
process CPU time on one thread, so other jobs sharing the machine do not inflate it.

    .venv/bin/python benchmarks/bench_attention_cpu_time.py [--reps 5]

One sequence's prompt attended in one call (every row its own causal keys), as the engine's
prefill does a layer: the default model's shapes (Gemma-3-270M: 4 query heads, 1 KV head,
head_dim 256, a 512-key sliding window; 512 tokens) and a Llama-like one (8 query heads, 2 KV
heads, head_dim 64, no window; 1024 tokens), over float32 and float16 caches, paged like the
engine's (blocks of 16 consecutive slots, scattered). Then a decode step at the same shapes:
16 sequences of --decode-context keys, one row each (a tile of one row: no sharing). Median of
--reps calls each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_ms, machine_lines  # noqa: E402

from girandole.model.kernels import loader, paged_attention  # noqa: E402

BLOCK = 16
# (name, query heads, KV heads, head_dim, window, prompt tokens)
SHAPES = [
    ("Gemma-3-270M", 4, 1, 256, 512, 512),
    ("Llama-like", 8, 2, 64, None, 1024),
]


def attention_call(heads, kv_heads, dim, window, tokens, dtype, g, decode_rows=0):
    """One prompt of `tokens` rows attended in one call; decode_rows > 0: that many sequences of
    `tokens` keys instead, one (decode) row each."""
    seqs = max(decode_rows, 1)
    num_blocks = 4 * seqs * tokens // BLOCK
    caches = [torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=g).to(dtype) for _ in "kv"]
    blocks = torch.randperm(num_blocks, generator=g)[: seqs * tokens // BLOCK]
    slots = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
    if decode_rows:
        lens = torch.full((decode_rows,), tokens)
        starts = torch.arange(decode_rows) * tokens
    else:
        lens = torch.arange(1, tokens + 1)
        starts = torch.zeros_like(lens)
    q = torch.randn(len(lens), heads, dim, generator=g)
    out = torch.empty_like(q)
    fn, args = paged_attention.bind(
        q, *caches, slots, starts, lens, window, dim**-0.5, out, threads=1
    )
    tensors = (caches, slots, q, lens, starts, out)  # alive while the call's pointers are used
    return lambda: (fn(*args), tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode-context", type=int, default=512)
    args = ap.parse_args()
    if not loader.available():
        raise SystemExit("native kernels unavailable here")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("\n".join(machine_lines()))
    print("| shape | call | float32 cache, ms | float16 cache, ms |")
    print("|---|---|---|---|")
    for name, heads, kv_heads, dim, window, tokens in SHAPES:
        shape = f"{name} ({heads}/{kv_heads} heads, head_dim {dim}, window {window})"
        calls = [
            (f"prefill, {tokens} tokens", tokens, 0),
            (f"decode, 16 x 1 row at {args.decode_context}", args.decode_context, 16),
        ]
        for call, tokens_, decode_rows in calls:
            times = [
                cpu_ms(
                    attention_call(heads, kv_heads, dim, window, tokens_, dtype, g, decode_rows),
                    args.reps,
                )
                for dtype in paged_attention.CACHE_DTYPES
            ]
            print(f"| {shape} | {call} | {times[0]:.2f} | {times[1]:.2f} |")


if __name__ == "__main__":
    main()
