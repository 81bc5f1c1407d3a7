"""A Q6_K weight's one-row (decode) and many-row (prompt) products on the native kernels, in
its own format (wq_gemm.pack_q6k, 6.5625 bits a weight) against the int8 groups of 32 it took
before (quant.quantize_int8_groups packed as 8-bit levels, 10 bits a weight). The two
alternate within each round; the medians of the rounds are reported, and the median of the
rounds' time ratios. `--copies` weights of
each form are called in turn, as a decode step reads a MoE's experts: together far larger
than the caches, so the one-row product reads its weight from memory, as in a real model
(--copies 1: the weight stays in L2/L3 from call to call).

On a shared host each round first waits (up to --max-wait s) until other processes use under
--quiet-below of the CPUs, and a round during which they used more than --retry-above is not
counted (rerun, up to the round count again).

    PYTHONPATH=src python benchmarks/bench_q6k.py [--threads 2] [--rounds 15] [--copies 48]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import CpuMeter

from girandole.model.kernels import wq_gemm
from girandole.model.loader.gguf import Q6_K_BYTES, _dequantize_q6_k, decode_q6_k
from girandole.model.quant import quantize_int8_groups

SHAPES = [(2048, 768), (768, 2048)]  # [out, in]: Qwen3-30B-A3B's experts' gate/up and down


def q6_k_blocks(n: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, size=(n * k // 256, Q6_K_BYTES), dtype=np.uint8)
    b[:, 208:210] = np.array([2e-5], dtype=np.float16).view(np.uint8)
    return b


def forms(n: int, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    blocks = q6_k_blocks(n, k)
    q, scale = quantize_int8_groups(_dequantize_q6_k(blocks).reshape(n, k))
    old = wq_gemm.pack(q.to(torch.int32) + 128, scale, -128.0 * scale, vnni=True)
    new = wq_gemm.pack_q6k(*decode_q6_k(blocks, n, k))
    return {"int8 groups": old, "Q6_K": new}


def time_calls(bound: list, calls: int) -> float:
    """Seconds a call, over `calls` calls cycling through the bound copies."""
    for fn, args in bound:
        fn(*args)
    start = time.perf_counter()
    for i in range(calls):
        fn, args = bound[i % len(bound)]
        fn(*args)
    return (time.perf_counter() - start) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--prompt-rows", type=int, default=128)
    ap.add_argument("--copies", type=int, default=48)
    ap.add_argument("--quiet-below", type=float, default=0.1)
    ap.add_argument("--retry-above", type=float, default=0.25)
    ap.add_argument("--max-wait", type=float, default=20.0)
    args = ap.parse_args()
    meter = CpuMeter()
    torch.set_num_threads(args.threads)
    for n, k in SHAPES:
        weights = forms(n, k)
        copies = {
            name: [(p.clone(), s.clone(), b) for _ in range(args.copies)]
            for name, (p, s, b) in weights.items()
        }
        for rows, decode, calls in ((1, True, 4 * args.copies), (args.prompt_rows, False, 5)):
            x = torch.randn(rows, k).to(torch.bfloat16)
            y = torch.empty(rows, n)
            bound = {
                name: [wq_gemm.bind(x, p, s, b, y, threads=args.threads, decode=decode)
                       for p, s, b in forms_]
                for name, forms_ in copies.items()
            }  # fmt: skip
            times: dict[str, list[float]] = {name: [] for name in bound}
            shares: list[float] = []
            for _ in range(2 * args.rounds):
                if len(shares) == args.rounds:
                    break
                meter.wait_quiet(args.quiet_below, args.max_wait, window=0.5)
                before = meter.snapshot()
                took = {name: time_calls(calls_, calls) for name, calls_ in bound.items()}
                share = meter.foreign(before, meter.snapshot())
                if share > args.retry_above:
                    continue
                shares.append(share)
                for name, t in took.items():
                    times[name].append(t)
            role = "decode" if decode else "prompt"
            if not shares:
                print(f"{n}x{k} {rows:4d} rows ({role}): no round without other work")
                continue
            for name, (p, s, _) in weights.items():
                med = statistics.median(times[name])
                nbytes = p.numel() * p.element_size() + s.numel() * s.element_size()
                print(
                    f"{n}x{k} {rows:4d} rows ({role}) {name:12s} {med * 1e6:9.1f} us  "
                    f"{nbytes * 8 / (n * k):5.2f} bits/weight  {nbytes / med / 1e9:6.1f} GB/s"
                )
            old_t, new_t = times["int8 groups"], times["Q6_K"]
            speedup = statistics.median(o / q for o, q in zip(old_t, new_t))
            print(
                f"{n}x{k} {rows:4d} rows ({role}) Q6_K's speed-up, median of {len(shares)} "
                f"rounds: {speedup:.2f}x (others' CPU share: median "
                f"{100 * statistics.median(shares):.0f} %, max {100 * max(shares):.0f} %)"
            )


if __name__ == "__main__":
    main()
