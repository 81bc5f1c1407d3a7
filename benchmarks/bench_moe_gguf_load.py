"""Load time of a mixture-of-experts GGUF at Qwen3-30B-A3B's shapes: hidden 2048, experts of
intermediate 768 (gate/up Q4_K, down Q6_K as in its Q4_K_M file, random blocks), 32 query / 4 KV
heads of 128 (Q8_0), a small vocabulary; --experts experts in --layers layers (the real model:
128 in 48). Prints the build time per expert in fast mode (the packed int4/int8 linears the
server runs, what the packed-model cache holds once built) and in reference mode (float32), and
the whole model's estimate from it.

    .venv/bin/python benchmarks/bench_moe_gguf_load.py               # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_moe_gguf_load.py --experts 8   # quicker
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "model"))

from common import log, machine_lines, markdown_table  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2048, 768, 32, 4, 128, 512
REAL_EXPERTS = 128 * 48  # Qwen3-30B-A3B: 128 experts in each of 48 layers


def write_file(path: Path, experts: int, layers: int) -> None:
    import gguf
    import numpy as np
    from gguf.quants import quantize
    from moe_gguf_helpers import random_k_blocks

    rng = np.random.default_rng(0)
    q = gguf.GGMLQuantizationType

    def q8(*shape: int) -> np.ndarray:
        return quantize((rng.standard_normal(shape) * 0.02).astype(np.float32), q.Q8_0)

    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(layers)
    w.add_feed_forward_length(6144)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_expert_count(experts)
    w.add_expert_used_count(min(8, experts))
    w.add_expert_feed_forward_length(INTERMEDIATE)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", q8(VOCAB, HIDDEN), raw_dtype=q.Q8_0)
    w.add_tensor("output.weight", q8(VOCAB, HIDDEN), raw_dtype=q.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for i in range(layers):
        q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        for name, shape in (
            ("attn_q", (q_rows, HIDDEN)),
            ("attn_k", (kv_rows, HIDDEN)),
            ("attn_v", (kv_rows, HIDDEN)),
            ("attn_output", (HIDDEN, q_rows)),
        ):
            w.add_tensor(f"blk.{i}.{name}.weight", q8(*shape), raw_dtype=q.Q8_0)
        for name, size in (("attn_norm", HIDDEN), ("ffn_norm", HIDDEN)):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(size, np.float32))
        for name in ("attn_q_norm", "attn_k_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(HEAD_DIM, np.float32))
        router = (rng.standard_normal((experts, HIDDEN)) * 0.02).astype(np.float32)
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", router)
        for k, (name, shape, qtype) in enumerate(
            (
                ("ffn_gate_exps", (experts, INTERMEDIATE, HIDDEN), "Q4_K"),
                ("ffn_up_exps", (experts, INTERMEDIATE, HIDDEN), "Q4_K"),
                ("ffn_down_exps", (experts, HIDDEN, INTERMEDIATE), "Q6_K"),
            )
        ):
            blocks = random_k_blocks(shape, qtype, seed=i * 3 + k)
            w.add_tensor(f"blk.{i}.{name}.weight", blocks, raw_dtype=q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    args = p.parse_args()

    import torch

    from girandole.model.loader import load_model

    n = args.experts * args.layers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moe.gguf"
        write_file(path, args.experts, args.layers)
        log(f"wrote {path.stat().st_size / 2**20:.0f} MiB")
        for mode in ("fast", "reference"):
            start = time.perf_counter()
            model, _ = load_model(path, mode=mode, device="cpu", use_cache=False)
            took = time.perf_counter() - start
            with torch.inference_mode():  # it runs
                model.compute_logits(model(torch.tensor([1, 5, 9]), torch.arange(3)))
            per = took / n
            rows.append(
                [mode, f"{took:.1f}", f"{per * 1000:.0f}", f"{per * REAL_EXPERTS / 60:.0f}"]
            )
            del model
    print("\n".join(machine_lines()))
    print(
        markdown_table(
            ["mode", f"load s ({n} experts)", "ms per expert", "Qwen3-30B-A3B estimate, min"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
