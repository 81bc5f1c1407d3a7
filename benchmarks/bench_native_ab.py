"""Two builds of the native kernels' library, the same calls alternating in one process: whether
their results are the same bits, and each build's time. For a kernel change that must not change
the numbers (register allocation, loop order, prefetch), where this host's drift of 10-20 %
between processes hides a few per cent.

    GIRANDOLE_CACHE_DIR=/tmp/old PYTHONPATH=/path/to/old/checkout/src \\
        .venv/bin/python -c "from girandole.model.kernels import loader; print(loader.library())"
    .venv/bin/python benchmarks/bench_native_ab.py OLD.so NEW.so [--kernel vnni|head|attention]
        [--rows 1,4,16,64] [--calls 15]
    .venv/bin/python benchmarks/bench_native_ab.py OLD.so NEW.so --kernel decode --rows 2048,8192

The first command builds the old checkout's library (the loader prints its path; the current
checkout's is in ~/.cache/girandole/kernels). `vnni`: wq_gemm_vnni (csrc/wq_vnni.c, the linears'
int8 kernel without AMX) on 4-bit levels in the linears' shapes; `head`: int4_head_gemm (the LM
head's coarse pass) on the benchmark models' heads; `attention`: paged_attention_f16 (a float16
KV cache) on a prompt's last 512 rows (--rows are prompt lengths, each one sequence: the engine's
steps take 512 prompt rows at most) and a decode batch of 16 rows with --rows keys each, in
Qwen3-0.6B's and the default model's head shapes. The weights are the same tensors for both
builds and stay in the caches they fit in: a kernel's compute, not the host's memory, is timed.
`decode`: paged_attention_f16 on decode rows (1 and 16 sequences of --rows keys each) as an
engine's step meets them, out of the CPU's caches: each call sweeps the caches of as many
layers as make 160 MB (a step's attention reads every layer's), in the shapes of Qwen3-0.6B,
Llama-3.2-1B and the default model's global layers; the time is the sweep's. The caches are
allocated as the engine's (kv_groups.cache_zeros: 2 MiB pages where Linux has them).
Prints the median microseconds of each build's calls (the first three left out), their ratio and
whether the outputs are equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from girandole.model.kernels import int4_head, loader, wq_gemm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_attention import random_cache  # noqa: E402
from common import machine_lines, markdown_table  # noqa: E402

# (outputs, inputs, largest level): the default model's qkv and o, its gate_up and down (5-bit),
# Llama-3.2-1B's gate_up and down shapes
LINEARS = [(1536, 640, 15), (640, 1024, 15), (4096, 640, 31), (640, 2048, 31), (8192, 2048, 15),
           (2048, 8192, 15)]  # fmt: skip
# (vocabulary, hidden): the default model's head, the MoE file's, Qwen3-0.6B's
HEADS = [(262144, 640), (16384, 2048), (151936, 1024)]


def vnni_call(lib, x, packed, params, bits: int, out: int) -> torch.Tensor:
    m, inp = x.shape
    y = torch.empty(m, out)
    lib.wq_gemm_vnni(x.data_ptr(), m, inp, packed.data_ptr(), bits, params.data_ptr(), out,
                     y.data_ptr(), out, torch.get_num_threads())  # fmt: skip
    return y


def head_call(lib, x, xs, packed, vocab: int) -> torch.Tensor:
    m, hidden = x.shape
    y = torch.empty(m, vocab)
    lib.int4_head_gemm(x.data_ptr(), m, hidden, packed.data_ptr(), xs.data_ptr(), vocab,
                       y.data_ptr(), torch.get_num_threads())  # fmt: skip
    return y


# (query heads, KV heads, head dim, sliding window): Qwen3-0.6B's; the default model's global and
# sliding-window layers
ATTENTION = [(16, 8, 128, 0), (4, 1, 256, 0), (4, 1, 256, 512)]
DECODE_ROWS = 16
PROMPT_ROWS = 512  # the engine's default step budget (max_num_batched_tokens)


def attention_call(lib, q, k, v, slots, starts, lens, window: int) -> torch.Tensor:
    s, h, d = q.shape
    out = torch.empty_like(q)
    lib.paged_attention_f16(q.data_ptr(), k.data_ptr(), v.data_ptr(), slots.data_ptr(),
                            starts.data_ptr(), lens.data_ptr(), s, h, k.shape[1], d, window,
                            d**-0.5, None, out.data_ptr(), torch.get_num_threads())  # fmt: skip
    return out


def attention_rows(libs, rows: list[int], n: int) -> list[list[str]]:
    """A prompt of each length (one sequence, its last PROMPT_ROWS rows), then DECODE_ROWS
    sequences of that many keys decoding one row each; the cache's slots shuffled as a paged cache's pages lie."""
    table = []
    for h, hkv, d, window in ATTENTION:
        for ctx in rows:
            for decode in (False, True):
                seqs = DECODE_ROWS if decode else 1
                k = torch.randn(seqs * ctx, hkv, d).half()
                v = torch.randn(seqs * ctx, hkv, d).half()
                pages = torch.randperm(seqs * ctx // 16) if ctx % 16 == 0 else None
                slots = (
                    (pages[:, None] * 16 + torch.arange(16)).reshape(-1)
                    if pages is not None
                    else torch.randperm(seqs * ctx)
                )
                if decode:
                    starts = torch.arange(seqs) * ctx
                    lens = torch.full((seqs,), ctx)
                else:
                    lens = torch.arange(max(ctx - PROMPT_ROWS, 0) + 1, ctx + 1)
                    starts = torch.zeros(len(lens), dtype=torch.long)
                q = torch.randn(len(lens), h, d)
                call = partial(attention_call, q=q, k=k, v=v, slots=slots, starts=starts,
                               lens=lens, window=window)  # fmt: skip
                what = f"{h}/{hkv} x {d}" + (f", window {window}" if window else "")
                kind = f"{seqs} x {ctx} keys" if decode else f"prompt {ctx}, last {len(lens)}"
                table.append(alternate(libs, call, n, f"{what}: {kind}", len(lens)))
    return table


# (query heads, KV heads, head dim): Qwen3-0.6B's, Llama-3.2-1B's, the default model's global layers
DECODE_SHAPES = [(16, 8, 128), (32, 8, 64), (4, 1, 256)]
SWEEP_BYTES = 160_000_000  # several times an L3: each layer's cache comes from memory


def sweep_call(lib, q, layers, starts, lens) -> torch.Tensor:
    for slots, k, v in layers:
        out = attention_call(lib, q, k, v, slots, starts, lens, 0)
    return out


def decode_rows(libs, rows: list[int], n: int) -> list[list[str]]:
    """Decode rows out of the caches: 1 and 16 sequences of each length, over as many layers'
    caches (each a pool of twice the sequences' pages, theirs shuffled in it) as SWEEP_BYTES."""
    table = []
    for h, hkv, d in DECODE_SHAPES:
        for seqs in (1, 16):
            for ctx in rows:
                pages = seqs * ctx // 16
                nbytes = seqs * ctx * hkv * d * 2 * 2  # keys and values, float16
                layers = []
                for _ in range(max(1, -(-SWEEP_BYTES // nbytes))):
                    slots = torch.randperm(2 * pages)[:pages, None] * 16 + torch.arange(16)
                    k, v = (random_cache((2 * pages * 16, hkv, d)) for _ in "kv")
                    layers.append((slots.reshape(-1), k, v))
                q = torch.randn(seqs, h, d)
                call = partial(sweep_call, q=q, layers=layers, starts=torch.arange(seqs) * ctx,
                               lens=torch.full((seqs,), ctx))  # fmt: skip
                what = f"{h}/{hkv} x {d}: {seqs} x {ctx} keys, {len(layers)} layers"
                table.append(alternate(libs, call, n, what, seqs))
                del layers
    return table


def alternate(libs, call, n: int, weight: str, m: int) -> list[str]:
    """A table row: each build's median microseconds over n calls of call(lib), alternating,
    their ratio and whether the first outputs are the same bits."""
    times: list[list[float]] = [[] for _ in libs]
    outs = []
    for rep in range(n):
        for i, lib in enumerate(libs):
            t = time.perf_counter()
            y = call(lib)
            times[i].append(time.perf_counter() - t)
            if rep == 0:
                outs.append(y)
    a, b = (statistics.median(t[3:]) for t in times)
    same = "yes" if torch.equal(outs[0], outs[1]) else "NO"
    return [weight, str(m), f"{a * 1e6:.1f}", f"{b * 1e6:.1f}", f"{a / b:.2f}x", same]


def vnni_rows(libs, rows: list[int], n: int) -> list[list[str]]:
    table = []
    for out, inp, top in LINEARS:
        q = torch.randint(0, top + 1, (out, inp), dtype=torch.uint8)
        scale = (torch.rand(out, inp // 32) * 1e-2).half().float()
        offset = (-torch.rand(out, inp // 32) * 1e-1).half().float()
        packed, params, bits = wq_gemm.pack(q, scale, offset, vnni=True)
        for m in rows:
            x = torch.randn(m, inp).bfloat16()
            call = partial(vnni_call, x=x, packed=packed, params=params, bits=bits, out=out)
            table.append(alternate(libs, call, n, f"{out:,} x {inp:,}", m))
    return table


def head_rows(libs, rows: list[int], n: int) -> list[list[str]]:
    table = []
    for vocab, hidden in HEADS:
        packed = int4_head.pack(*int4_head.quantize(torch.randn(vocab, hidden) * 0.05))
        for m in rows:
            x = torch.randint(-127, 127, (m, hidden), dtype=torch.int8)
            call = partial(head_call, x=x, xs=torch.rand(m), packed=packed, vocab=vocab)
            table.append(alternate(libs, call, n, f"{vocab:,} x {hidden:,}", m))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--kernel", choices=["vnni", "head", "attention", "decode"], default="vnni")
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # each as the loader opens it: signatures set, prefetch tuned for this CPU (both alike)
    libs = [loader.open_library(Path(args.old)), loader.open_library(Path(args.new))]
    rows = [int(r) for r in args.rows.split(",")]
    kernels = {"vnni": vnni_rows, "head": head_rows, "attention": attention_rows,
               "decode": decode_rows}  # fmt: skip
    table = kernels[args.kernel](libs, rows, args.calls)
    print("\n".join(machine_lines()))
    print(f"kernel: {args.kernel}; threads {args.threads}; {args.calls} calls each, alternating\n")
    print(markdown_table(["weight", "rows", "old us", "new us", "old / new", "same bits"], table))


if __name__ == "__main__":
    main()
