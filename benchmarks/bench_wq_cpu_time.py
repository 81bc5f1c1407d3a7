"""The quantized linears' two native kernels (bf16 prompt rows, int8 decode rows) on one layer's
shapes of the default model, timed in process CPU time on one thread, so other jobs sharing the
machine do not inflate it (wall-clock tables: bench_kernels.py).

    .venv/bin/python benchmarks/bench_wq_cpu_time.py [--rows 1,16,128]

Random 5-bit levels (as the GGUF's Q5_0) with float16 scales; the four linears of a layer
(qkv 1536x640, o 640x1024, gate_up 4096x640, down 640x2048); median of 5 calls each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_ms, machine_lines  # noqa: E402

from girandole.model.kernels import loader, wq_gemm  # noqa: E402

SHAPES = [(1536, 640), (640, 1024), (4096, 640), (640, 2048)]  # (out, in) per linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default="1,16,128")
    args = ap.parse_args()
    if not loader.available():
        raise SystemExit("native kernels unavailable here")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    layers = []
    for n, k in SHAPES:
        q = torch.randint(0, 32, (n, k), generator=g)
        scale = (torch.rand(n, k // 32, generator=g) * 0.01).half().float()
        offset = -16 * scale
        panel = wq_gemm.pack(q, scale, offset)
        vnni = wq_gemm.pack(q, scale, offset, vnni=True)
        layers.append((n, k, panel, vnni))
    print("\n".join(machine_lines()))
    print("| rows | bf16 kernel (prompt rows), ms | int8 kernel (decode rows), ms |")
    print("|---|---|---|")
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {k: torch.randn(m, k).to(torch.bfloat16) for k in (640, 1024, 2048)}

        def run(vnni_layout: bool, xs=xs) -> None:
            for n, k, panel, vnni in layers:
                wq_gemm.gemm(xs[k], *(vnni if vnni_layout else panel), n, amx=False)

        print(f"| {m} | {cpu_ms(lambda: run(False)):.2f} | {cpu_ms(lambda: run(True)):.2f} |")


if __name__ == "__main__":
    main()
