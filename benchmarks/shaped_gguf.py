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
from model_shapes import SHAPES, shape_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("shape", choices=[n for n in SHAPES if not n.startswith("gemma")])
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
    arch = SHAPES[args.shape]["model_type"]  # GGUF's architecture name too (not Gemma's)
    torch.manual_seed(args.seed)
    model = tf.AutoModelForCausalLM.from_config(shape_config(args.shape))
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
