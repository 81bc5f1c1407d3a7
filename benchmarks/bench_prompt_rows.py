"""Prompt rows on the int8 kernel or the bf16 one (CPUs without AMX; `--int8-prompts`).

    .venv/bin/python benchmarks/bench_prompt_rows.py [--models llama-3.2-1b,...] [--rows 64,512]
    GIRANDOLE_NATIVE_ISA=avx2 .venv/bin/python benchmarks/bench_prompt_rows.py   # the AVX2 build

Without AMX the linears are packed for the VNNI kernel; a decode row runs on its int8 kernel
(the row quantized per 32 inputs, as llama.cpp's Q8_0) and a prompt row on the bf16 kernel
reading the same packed weight, unless the engine runs with --int8-prompts. This times one
decoder layer's linears (fused qkv, o, fused gate/up, down; random 4-bit levels in groups of 32)
each way at prompt-sized row counts, alternating, and prints the median ms and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from girandole.model.kernels import loader, wq_gemm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_lines, markdown_table  # noqa: E402
from model_shapes import SHAPES  # noqa: E402


def layer_shapes(name: str) -> list[tuple[str, int, int]]:
    """One decoder layer's linears of `name`'s shapes: (what, out features, in features)."""
    c = SHAPES[name]
    hidden, inter = c["hidden_size"], c.get("moe_intermediate_size") or c["intermediate_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    dim = c.get("head_dim") or hidden // heads
    return [
        ("qkv", (heads + 2 * kv) * dim, hidden),
        ("o", hidden, heads * dim),
        ("gate_up", 2 * inter, hidden),
        ("down", hidden, inter),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="gemma-3-270m,qwen3-0.6b,llama-3.2-1b")
    ap.add_argument("--rows", default="64,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not loader.available():
        raise SystemExit("no native kernels here")
    for line in machine_lines():
        print(line)
    print(f"native build: {loader.isa()}; AMX {loader.amx()} (with AMX neither kernel is used)")
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in args.models.split(","):
        packed = []
        for what, n, k in layer_shapes(name):
            if not wq_gemm.supports(n, k):
                print(f"{name} {what} [{n}, {k}]: not a native shape, left out")
                continue
            q = torch.randint(0, 16, (n, k), generator=g)
            scale = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3).half().float()
            packed.append((n, k, wq_gemm.pack(q, scale, -8 * scale, vnni=True)))
        for m in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(m, k, generator=g).to(torch.bfloat16) for _, k, _ in packed}
            times: dict[bool, list[float]] = {True: [], False: []}
            for rep in range(args.repeats + 1):
                for int8 in (True, False):
                    start = time.perf_counter()
                    for n, k, (w, params, bits) in packed:
                        wq_gemm.gemm(xs[k], w, params, bits, n, decode_rows=m if int8 else 0)
                    if rep:  # the first round warms up
                        times[int8].append(time.perf_counter() - start)
            a, b = (statistics.median(times[x]) * 1e3 for x in (True, False))
            rows.append([name, str(m), f"{b:.2f}", f"{a:.2f}", f"{b / a:.2f}x"])
    print()
    header = ["model's shapes", "prompt rows", "bf16 kernel, ms", "int8 kernel, ms", "gain"]
    print(markdown_table(header, rows))
    print("one decoder layer's linears (fused qkv, o, fused gate/up, down), 4-bit levels")


if __name__ == "__main__":
    main()
