"""A CPU engine never imports Triton: the fused layers' kernels are the GPU path's alone, and
importing Triton cost a CPU server ~0.5 s of its start and ~70 MB of libraries
(model/fused_layers.py imports them on that path's first use)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from girandole import LLM
from girandole.sampling.params import SamplingParams

llm = LLM(model=sys.argv[1], mode="fast", device="cpu", kv_cache_gb=0.02)
assert llm.generate("hello", SamplingParams(max_tokens=4, temperature=0.8))[0].token_ids
print("triton" in sys.modules)
"""


def test_a_cpu_engine_never_imports_triton(tiny_llama_dir):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "False"
