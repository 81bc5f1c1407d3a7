"""A GGUF with a real model's shapes and random weights, quantized as llama.cpp quantizes it:
for benchmarks of models other than the default one (no model hub here).

    .venv/bin/python benchmarks/shaped_gguf.py qwen3-0.6b /tmp/qwen3-0.6b-q4_k_m.gguf
    .venv/bin/python benchmarks/bench_engine.py --model /tmp/qwen3-0.6b-q4_k_m.gguf

Writes the model's tensors in float32 with the tests' GGUF writer (tests/model/model_helpers.py:
the layout llama.cpp's convert_hf_to_gguf.py writes, a stand-in vocabulary of `<tN>` tokens),
then runs llama.cpp's `llama-quantize` (built by build_llama_server.sh; else llama-cpp-python's
`llama_model_quantize`, the same C code) to --type (Q4_K_M: the usual download). A mixture of
experts (qwen3-30b-a3b) is too big for a transformers model in memory: its random float16
tensors are streamed into the file one at a time, in the layout convert_hf_to_gguf.py writes
(`qwen3moe`, experts stacked). --layers and --vocab shrink a model to fit memory and time:

    .venv/bin/python benchmarks/shaped_gguf.py qwen3-30b-a3b /tmp/moe.gguf --layers 4 --vocab 16384

Speed depends on the shapes and the storage types, not on the weights' values; prompts are token
ids (bench_engine.py draws them from the file's vocabulary).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "model"))

from common import find_llama_server, log  # noqa: E402
from model_shapes import SHAPES  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("shape", choices=[n for n in SHAPES if not n.startswith("gemma")])
    p.add_argument("out", type=Path)
    p.add_argument("--type", default="Q4_K_M", help="llama-quantize's type (default Q4_K_M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the model's")
    p.add_argument("--vocab", type=int, default=None, help="a smaller stand-in vocabulary")
    args = p.parse_args()
    fields = dict(SHAPES[args.shape])
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    if args.vocab:
        fields["vocab_size"] = args.vocab
    if fields["model_type"] == "qwen3_moe":
        with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
            f16 = Path(tmp) / "f16.gguf"
            write_random_moe_gguf(fields, f16, args.seed)
            quantize(f16, args.out, args.type)
        log(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB)")
        return 0

    import torch
    import transformers as tf
    from model_helpers import write_tiny_gguf

    arch = fields["model_type"]  # GGUF's architecture name too (not Gemma's)
    torch.manual_seed(args.seed)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**fields))
    log(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        f32 = Path(tmp) / "f32.gguf"
        write_tiny_gguf(model, arch, f32, {})
        del model
        quantize(f32, args.out, args.type)
    log(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB)")
    return 0


def quantize(src: Path, out: Path, qtype: str) -> None:
    """llama.cpp's quantization of `src` to `qtype`: its llama-quantize binary if built, else
    the same function through llama-cpp-python's C API."""
    server = find_llama_server(None)
    binary = Path(server).with_name("llama-quantize") if server else None
    if binary is not None and binary.exists():
        subprocess.run([str(binary), str(src), str(out), qtype], check=True)
        return
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(
            "no llama-quantize nor llama-cpp-python: see build_llama_server.sh"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params):
        raise SystemExit(f"llama_model_quantize failed on {src}")


def write_random_moe_gguf(fields: dict, path: Path, seed: int) -> None:
    """A Qwen3-MoE (`qwen3moe`) GGUF of random float16 weights (norms 1, the router float32),
    written one tensor at a time so that memory holds one stacked expert tensor at most."""
    import gguf
    import numpy as np

    hidden, inter = fields["hidden_size"], fields["moe_intermediate_size"]
    experts, vocab = fields["num_experts"], fields["vocab_size"]
    heads, kv_heads, head_dim = (
        fields["num_attention_heads"],
        fields["num_key_value_heads"],
        fields["head_dim"],
    )
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_name("shaped-qwen3moe")
    w.add_context_length(fields["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(fields["num_hidden_layers"])
    w.add_feed_forward_length(fields["intermediate_size"])
    w.add_expert_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(fields["rms_norm_eps"])
    w.add_rope_freq_base(fields["rope_theta"])
    w.add_expert_count(experts)
    w.add_expert_used_count(fields["num_experts_per_tok"])
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    shapes: dict[str, tuple[tuple[int, ...], type]] = {
        "token_embd.weight": ((vocab, hidden), np.float16)
    }
    for i in range(fields["num_hidden_layers"]):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": ((hidden,), np.float32),
            b + "attn_q.weight": ((heads * head_dim, hidden), np.float16),
            b + "attn_k.weight": ((kv_heads * head_dim, hidden), np.float16),
            b + "attn_v.weight": ((kv_heads * head_dim, hidden), np.float16),
            b + "attn_output.weight": ((hidden, heads * head_dim), np.float16),
            b + "attn_q_norm.weight": ((head_dim,), np.float32),
            b + "attn_k_norm.weight": ((head_dim,), np.float32),
            b + "ffn_norm.weight": ((hidden,), np.float32),
            b + "ffn_gate_inp.weight": ((experts, hidden), np.float32),
            b + "ffn_gate_exps.weight": ((experts, inter, hidden), np.float16),
            b + "ffn_up_exps.weight": ((experts, inter, hidden), np.float16),
            b + "ffn_down_exps.weight": ((experts, hidden, inter), np.float16),
        }
    shapes |= {
        "output_norm.weight": ((hidden,), np.float32),
        "output.weight": ((vocab, hidden), np.float16),
    }
    for name, (shape, dtype) in shapes.items():
        w.add_tensor_info(
            name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, (shape, dtype) in shapes.items():
        if name.endswith("norm.weight"):
            data = np.ones(shape, dtype=dtype)
        else:  # the init's spread; routers wider so that routing is not near uniform
            std = 0.5 if "ffn_gate_inp" in name else 0.02
            data = (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)
        w.write_tensor_data(data)
        del data
    w.close()


if __name__ == "__main__":
    sys.exit(main())
