"""KV cache capacity of Gemma 3 270M's shapes (18 layers, 1 KV head of 256, 15 of them sliding
with a window of 512) with every layer keeping every position, and with sliding-window layers
keeping only their window (engine/kv_groups.py, engine/kv_cache.py).

No model is loaded: the engine's own layer grouping sizes the blocks from the layers' shapes, and
its KVCacheManager is driven as the scheduler drives it. Per cache size it prints
- the longest single sequence the cache holds (the engine's max_model_len bound; the model's
  own limit is 32,768),
- how many 4,096-token sequences run at once: each prefilled in 512-token chunks, then decoding,
  admitted one after another until a block allocation fails (measured on the manager),
- the tokens those sequences hold in the cache together.

    .venv/bin/python benchmarks/bench_kv_capacity.py
"""

from __future__ import annotations

import argparse

import torch
from common import markdown_table

from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.kv_groups import bytes_per_block, group_layers
from girandole.engine.sequence import Sequence
from girandole.model.attention import Attention
from girandole.model.gemma3 import default_sliding_windows
from girandole.sampling.params import SamplingParams

LAYERS, KV_HEADS, HEAD_DIM, WINDOW = 18, 1, 256, 512


def gemma3_270m_layers() -> list[Attention]:
    return [
        Attention(4, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5, window)
        for window in default_sliding_windows(LAYERS, WINDOW)
    ]


def concurrent(kv: KVCacheManager, seq_len: int, chunk: int) -> int:
    """Sequences of `seq_len` tokens admitted one by one (prefill in `chunk`-token steps, then a
    decode token) until one cannot get its blocks."""
    running = 0
    while True:
        seq = Sequence(f"s{running}", [running] * seq_len, SamplingParams())
        seq.cache_salt = str(running)  # no prefix sharing between them
        while seq.num_computed_tokens < seq_len + 1:
            n = min(chunk, seq_len - seq.num_computed_tokens) or 1
            if not kv.allocate(seq, n):
                return running
            seq.num_computed_tokens += n
            kv.register_full_blocks(seq)
        running += 1


def row(budget_gb: float, dtype: torch.dtype, block_size: int, seq_len: int, chunk: int):
    layers = gemma3_270m_layers()
    out = []
    for windowed in (False, True):
        groups = group_layers(layers, windowed)
        num_blocks = int(budget_gb * (1 << 30)) // bytes_per_block(groups, block_size, dtype)
        kv = KVCacheManager(num_blocks, block_size, [g.window for g in groups])
        longest = kv.max_tokens(chunk)
        n = concurrent(kv, seq_len, chunk)
        out.append((len(groups), num_blocks, longest, n, n * (seq_len + 1)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=512, help="prefill tokens per step")
    args = parser.parse_args()
    header = ["cache", "layout", "groups", "blocks", "longest sequence",
              f"{args.seq_len}-token sequences at once", "tokens held"]  # fmt: skip
    rows = []
    for gb, dtype, name in ((1.0, torch.float16, "1 GiB fp16 (CPU default)"),
                            (1.0, torch.float32, "1 GiB fp32 (CPU, --kv-cache-dtype float32)"),
                            (4.0, torch.bfloat16, "4 GiB bf16 (GPU)"),
                            (16.0, torch.bfloat16, "16 GiB bf16 (GPU)")):  # fmt: skip
        before, after = row(gb, dtype, args.block_size, args.seq_len, args.chunk)
        for label, (groups, blocks, longest, n, tokens) in (("every position", before),
                                                           ("window only", after)):  # fmt: skip
            rows.append([name, label, str(groups), f"{blocks:,}", f"{longest:,}",
                         f"{n:,}", f"{tokens:,}"])  # fmt: skip
        rows.append([name, "ratio", "", "", "", f"{after[3] / max(1, before[3]):.2f}x",
                     f"{after[4] / max(1, before[4]):.2f}x"])  # fmt: skip
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
