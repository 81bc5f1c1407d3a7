"""girandole's native CPU kernels against the torch kernels they replace, at the default
model's shapes (Gemma 3 270M: 18 layers, hidden 640, 4 query heads / 1 KV head of 256, 262k
vocabulary), with random weights of the same formats.

    .venv/bin/python benchmarks/bench_kernels.py [--rows 1,4,16,64] [--threads 2]

Prints median milliseconds per decode step's worth of each operation:
- linears: the 18 layers' qkv, o, gate_up, down (Q5_0-like 5-bit and Q4_K-like 4-bit groups of
  32): native wq_gemm on AMX tiles (where the CPU has them) and on AVX512-BF16 (or the AVX2
  build: loader.isa) vs torch's
  int4pack kernel (two int4 matmuls for 5-bit weights) vs a bf16 F.linear on dense weights
  (oneDNN: AMX where the CPU has it);
- LM head coarse logits: the native 4-bit kernel QuantLMHead uses (int4_head, 5 bits a weight)
  vs native int8_gemm on AMX and on VNNI vs torch._int_mm (the same integers);
- LM head refinement (candidates recomputed exactly) and the greedy argmax: native vs torch ops;
- MLP activation (gelu_tanh(gate) * up to bf16): native gated_act vs torch ops;
- attention: native paged attention reading the cache in place vs gather + torch SDPA (the
  GQA heads folded into query rows), one query per sequence at 304 keys in 16-slot blocks, 18 layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from girandole.model import kernels, quant
from girandole.model.attention import Attention
from girandole.model.kernels import (
    gated_act,
    int4_head,
    int8_gemm,
    loader,
    paged_attention,
    wq_gemm,
)
from girandole.model.kernels.logits import argmax_rows, refine
from girandole.model.layers import Int8Embedding, QuantLMHead

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_lines  # noqa: E402

LAYERS = 18
SHAPES = {"qkv": (1536, 640, 32), "o": (640, 1024, 16), "gate_up": (4096, 640, 32)}
SHAPES["down"] = (640, 2048, 16)
VOCAB, HIDDEN = 262144, 640
BLOCK = 16  # KV cache block size, tokens


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def linears(rows: list[int]) -> list[tuple[str, list[float]]]:
    g = torch.Generator().manual_seed(0)
    layers = []  # (layer with torch's forms, its levels in the panel layout, in the VNNI one)
    for _ in range(LAYERS):
        for n, k, levels in SHAPES.values():
            q = torch.randint(0, levels, (n, k), generator=g, dtype=torch.int32)
            # fp16 scales, as GGUF stores them (so q * scale + offset is exact, as in the file)
            scale = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3).half().float()
            offset = -scale * levels / 2
            if levels == 16:
                layer = quant.Int4Linear(
                    None, groups=(q, scale, offset + 8 * scale), torch_forms=True
                )
            else:
                layer = quant.Int4x2Linear((q, scale, offset), torch_forms=True)
            panel = wq_gemm.pack(q, scale, offset)
            vnni = wq_gemm.pack(q, scale, offset, vnni=True)
            layers.append((layer, panel, vnni))
    paths = {"native AMX, bf16": ("panel", True)} if loader.amx() else {}
    build = "AVX2 build" if loader.isa() == "avx2" else "AVX512"
    paths[f"native bf16, {build} (prompt rows without AMX)"] = ("panel", False)
    paths[f"native int8 rows, {build} (decode rows without AMX)"] = ("vnni", None)
    used = next(iter(paths)) if loader.amx() else list(paths)[-1]  # by decode rows
    out: dict[str, list[float]] = {name: [] for name in paths}
    out.update({"torch int4pack": [], "bf16 F.linear": []})
    for m in rows:
        xs = {k: torch.randn(m, k).to(torch.bfloat16) for k in (640, 1024, 2048)}
        for name, (layout, amx) in paths.items():

            def run(xs=xs, layout=layout, amx=amx):
                for t, panel, vnni in layers:
                    packed = vnni if layout == "vnni" else panel
                    wq_gemm.gemm(xs[t.in_features], *packed, t.out_features, amx=amx)

            out[name].append(median_ms(run))
        out["torch int4pack"].append(
            median_ms(lambda xs=xs: [t._packed(xs[t.in_features]) for t, _, _ in layers])
        )
        out["bf16 F.linear"].append(
            median_ms(lambda xs=xs: [F.linear(xs[t.in_features], t.dense) for t, _, _ in layers])
        )
    return [
        (f"linears, {name}" + (" (used)" if name == used else ""), v) for name, v in out.items()
    ]


def lm_head(rows: list[int]) -> list[tuple[str, list[float]]]:
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (VOCAB, HIDDEN), generator=g, dtype=torch.int8)
    ws = torch.rand(VOCAB, generator=g) * 0.01
    packed, wsum = int8_gemm.pack(w)
    paths = {"native int8 AMX": True} if loader.amx() else {}
    paths["native int8 VNNI"] = False
    out: dict[str, list[float]] = {name: [] for name in paths}
    out["native int4 g32 (used)"] = []
    out["torch._int_mm"] = []
    w4 = int4_head.pack(*int4_head.quantize(w.float() * 0.01))
    for m in rows:
        xq = torch.randint(-127, 128, (m, HIDDEN), generator=g, dtype=torch.int8)
        sx = torch.rand(m, 1, generator=g)
        for name, amx in paths.items():
            out[name].append(
                median_ms(
                    lambda xq=xq, sx=sx, amx=amx: int8_gemm.int8_gemm(
                        xq, sx, packed, wsum, ws, amx=amx
                    )
                )
            )
        out["native int4 g32 (used)"].append(
            median_ms(lambda xq=xq, sx=sx: int4_head.gemm(xq, sx, w4, VOCAB))
        )
        out["torch._int_mm"].append(
            median_ms(lambda xq=xq, sx=sx: torch._int_mm(xq, w.t()).float().mul_(sx).mul_(ws))
        )
    return [(f"LM head, {name}", v) for name, v in out.items()]


def lm_head_refine(rows: list[int]) -> list[tuple[str, list[float]]]:
    """The refinement after the coarse logits: candidates within the margin (at most
    REFINE_TOP per row) recomputed from the group-int8 table; also the greedy argmax over the
    vocabulary. Coarse logits with the default model's spread (std 6: about 1,500 tokens within
    the margin of 12, as on real text)."""
    g = torch.Generator().manual_seed(3)
    table = Int8Embedding(torch.randn(VOCAB, HIDDEN, generator=g) * 0.05)
    margin, top = QuantLMHead.REFINE_MARGIN, QuantLMHead.REFINE_TOP
    native, torch_ops, arg_native, arg_torch = [], [], [], []
    for m in rows:
        x = torch.randn(m, HIDDEN, generator=g)
        coarse = torch.randn(m, VOCAB, generator=g) * 6

        def run_torch(coarse=coarse, x=x):
            out = coarse.clone()
            vals, idx = out.topk(top, dim=-1)
            keep = vals >= vals[:, :1] - margin
            r = torch.arange(out.shape[0]).unsqueeze(1).expand_as(idx)[keep]
            c = idx[keep]
            out[r, c] = (table.rows(c) * x[r]).sum(dim=-1)

        def run_native(coarse=coarse, x=x):
            refine(coarse.clone(), x, table.qweight, table.scale, margin, top)

        native.append(median_ms(run_native))
        torch_ops.append(median_ms(run_torch))
        arg_native.append(median_ms(lambda coarse=coarse: argmax_rows(coarse)))
        arg_torch.append(median_ms(lambda coarse=coarse: coarse.argmax(dim=-1)))
    return [
        ("LM head refinement, native (`logits.c`)", native),
        ("LM head refinement, torch topk + gather", torch_ops),
        ("greedy argmax, native (`logits.c`)", arg_native),
        ("greedy argmax, torch", arg_torch),
    ]


def mlp_activation(rows: list[int]) -> list[tuple[str, list[float]]]:
    """gelu_tanh(gate) * up to the down projection's bf16 input, 18 layers."""
    native, torch_ops = [], []
    for m in rows:
        gu = torch.randn(m, 4096)

        def run_torch(gu=gu):
            for _ in range(LAYERS):
                (F.gelu(gu[:, :2048], approximate="tanh") * gu[:, 2048:]).to(torch.bfloat16)

        def run_native(gu=gu):
            for _ in range(LAYERS):
                gated_act.gated_act(gu, "gelu_tanh")

        native.append(median_ms(run_native))
        torch_ops.append(median_ms(run_torch))
    return [
        ("MLP activation, native (`gated_act.c`)", native),
        ("MLP activation, torch", torch_ops),
    ]


def attention(rows: list[int], context: int = 304) -> list[tuple[str, list[float]]]:
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, dim = 4, 1, 256
    slots_total = max(rows) * context * 2
    caches = [
        (torch.randn(slots_total, kv_heads, dim), torch.randn(slots_total, kv_heads, dim))
        for _ in range(LAYERS)
    ]
    layer = Attention(heads, kv_heads, dim, dim**-0.5, 512)
    native, torch_path = [], []
    for m in rows:
        # Paged like the engine's cache: blocks of 16 consecutive slots, scattered.
        blocks = torch.randperm(slots_total // BLOCK, generator=g)[: m * context // BLOCK]
        perm = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
        per_seq = list(perm.split(context))
        q = torch.randn(m, heads, dim, generator=g)
        starts = torch.arange(m) * context
        lens = torch.full((m,), context)

        def run_native(q=q, perm=perm, starts=starts, lens=lens):
            for k, v in caches:
                paged_attention.paged_attention(q, k, v, perm, starts, lens, 512, layer.scale)

        def run_torch(q=q, per_seq=per_seq):
            for k, v in caches:
                for i, s in enumerate(per_seq):
                    layer._attend_sequence(q[i : i + 1], k.index_select(0, s), v.index_select(0, s))

        native.append(median_ms(run_native))
        torch_path.append(median_ms(run_torch))
    return [("attention, native paged", native), ("attention, gather + SDPA", torch_path)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default="1,4,16,64", help="rows (sequences) per call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--only", default=None, help="comma-separated: linears,lm_head,refine,mlp,attention"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(
            "native kernels unavailable here (x86 with AVX512 VNNI and BF16 or AVX2, C compiler)"
        )
    rows = [int(r) for r in args.rows.split(",")]
    parts = {
        "linears": linears,
        "lm_head": lm_head,
        "refine": lm_head_refine,
        "mlp": mlp_activation,
        "attention": attention,
    }
    chosen = args.only.split(",") if args.only else list(parts)
    table = [row for name in chosen for row in parts[name](rows)]
    print("\n".join(machine_lines()))
    print(f"threads: {args.threads}; median ms per decode step's worth (18 layers)")
    print("| operation | " + " | ".join(f"{m} rows" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name, values in table:
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
