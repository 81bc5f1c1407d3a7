"""Multi-LoRA benchmark on the default model (Gemma 3 270M, fast mode).

    .venv/bin/python benchmarks/bench_lora.py             # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_lora.py --quick     # one repeat, shorter outputs

Cells, each 16 concurrent requests (--requests) of --input-len random prompt tokens and
--output-len greedy output tokens (ignore_eos), all submitted at once; the measure is total
output tokens / wall time:

- base: the base model alone;
- lora: the same engine, the requests spread over 4 random rank-16 adapters (--adapters,
  --rank) targeting every projection, so every step mixes the four;
- merged: an engine built with adapter 0 merged into the weights (a deployment created from an
  adapter), no adapter at run time.

The targets: lora >= 0.75x base, merged within 3 % of base. The cells run interleaved, repeated
(--repeats), median reported, so drifts in machine load hit them alike; output tokens per CPU
second of the process are reported beside the wall-clock figure (less sensitive to a machine
shared with other jobs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, log, machine_lines, make_prompt, markdown_table, median  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_random_adapter(folder: Path, spec, rank: int, seed: int) -> Path:
    """A PEFT LoRA folder for `spec` with random A and B (as a trained adapter has: B != 0)."""
    import torch
    from safetensors.torch import save_file

    from girandole.model.lora import module_shapes

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for target, (out, inp) in module_shapes(spec).items():
            part = (
                "self_attn" if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            )
            prefix = f"base_model.model.model.layers.{layer}.{part}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) / inp**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": TARGETS,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def run_cell(engine, prompts: list[list[int]], adapters: list[str | None], output_len: int):
    """All requests at once; returns (output tokens per wall second, per CPU second of this
    process, output tokens)."""
    from girandole.sampling.params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start, cpu = time.perf_counter(), time.process_time()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", prompt, params, adapter=adapter)
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += len(out.new_token_ids)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return tokens / wall, tokens / cpu, tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="one repeat, 32 output tokens")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.output_len = 1, 32

    import torch

    from girandole.engine.engine import EngineConfig, LLMEngine

    config = dict(device=args.device, kv_cache_gb=0.5, max_num_seqs=args.requests)
    log("loading the base engine")
    base = LLMEngine(EngineConfig(**config))
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    names = []
    for i in range(args.adapters):
        folder = write_random_adapter(tmp / f"a{i}", base.model.spec, args.rank, seed=i)
        base.loras.register(base.loras.read(f"a{i}", folder))
        names.append(f"a{i}")
    log("loading the merged engine (adapter a0 merged into the weights)")
    merged = LLMEngine(EngineConfig(**config, merge_lora=str(tmp / "a0")))

    prompts = [make_prompt(args.input_len, f"lora-{i}") for i in range(args.requests)]
    cells = {
        "base": (base, [None] * args.requests),
        "lora": (base, [names[i % len(names)] for i in range(args.requests)]),
        "merged": (merged, [None] * args.requests),
    }
    for engine, adapters in cells.values():  # warm up (first-call costs, adapter residency)
        run_cell(engine, prompts[:4], adapters[:4], 4)
    results: dict[str, list[float]] = {name: [] for name in cells}
    per_cpu: dict[str, list[float]] = {name: [] for name in cells}
    for r in range(args.repeats):
        for name, (engine, adapters) in cells.items():
            engine.kv_cache.reset_prefix_cache()
            tps, tpc, tokens = run_cell(engine, prompts, adapters, args.output_len)
            results[name].append(tps)
            per_cpu[name].append(tpc)
            log(f"repeat {r + 1} {name}: {tps:.1f} output tok/s, {tpc:.1f} per CPU s ({tokens})")
    med = {name: median(v) for name, v in results.items()}
    med_cpu = {name: median(v) for name, v in per_cpu.items()}
    rows = [
        [
            name,
            fmt(med[name]),
            f"{med[name] / med['base']:.2f}x",
            fmt(med_cpu[name]),
            f"{med_cpu[name] / med_cpu['base']:.2f}x",
            ", ".join(fmt(x) for x in v),
        ]
        for name, v in results.items()
    ]
    print()
    for line in machine_lines():
        print(line)
    print(
        f"device {base.device}, {args.requests} requests, {args.input_len} prompt + "
        f"{args.output_len} output tokens each, {args.adapters} adapters of rank {args.rank}, "
        f"torch threads {torch.get_num_threads()}"
    )
    header = ["cell", "output tok/s", "vs base", "tok per CPU s", "vs base", "runs (tok/s)"]
    print(markdown_table(header, rows))
    if args.json:
        data = {"tok_per_s": results, "tok_per_cpu_s": per_cpu, "median": med}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
