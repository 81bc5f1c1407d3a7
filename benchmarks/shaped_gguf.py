"""A GGUF with a real model's shapes and random weights, quantized as llama.cpp quantizes it:
for benchmarks of models other than the default one (no model hub here).

    .venv/bin/python benchmarks/shaped_gguf.py qwen3-0.6b /tmp/qwen3-0.6b-q4_k_m.gguf
    .venv/bin/python benchmarks/bench_engine.py --model /tmp/qwen3-0.6b-q4_k_m.gguf

Writes the model's tensors in float32 with the tests' GGUF writer (tests/model/model_helpers.py:
the layout llama.cpp's convert_hf_to_gguf.py writes, a stand-in vocabulary of `<tN>` tokens),
then runs llama.cpp's `llama-quantize` (built by build_llama_server.sh) to --type (Q4_K_M: the
usual download). Speed depends on the shapes and the storage types, not on the weights' values;
prompts are token ids (bench_engine.py draws them from the file's vocabulary).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "model"))

from common import find_llama_server, log  # noqa: E402

SHAPES = {
    # name: (architecture, transformers config)
    "qwen3-0.6b": (
        "qwen3",
        dict(
            model_type="qwen3",
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            model_type="qwen2",
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "llama-3.2-1b": (
        "llama",
        dict(
            model_type="llama",
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
    ),
}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--type", default="Q4_K_M", help="llama-quantize's type (default Q4_K_M)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    import transformers as tf
    from model_helpers import write_tiny_gguf

    server = find_llama_server(None)
    quantize = Path(server).with_name("llama-quantize") if server else None
    if quantize is None or not quantize.exists():
        raise SystemExit("llama-quantize not found: run benchmarks/build_llama_server.sh")
    arch, cfg = SHAPES[args.shape]
    config = tf.AutoConfig.for_model(**cfg, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    log(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        f32 = Path(tmp) / "f32.gguf"
        write_tiny_gguf(model, arch, f32, {})
        del model
        subprocess.run([str(quantize), str(f32), str(args.out), args.type], check=True)
    log(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
