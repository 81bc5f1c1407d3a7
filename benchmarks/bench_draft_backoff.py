"""A draft model that disagrees with the request: decode speed with and without speculation.

    .venv/bin/python benchmarks/bench_draft_backoff.py              # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/bench_draft_backoff.py --repeats 1 --max-tokens 32

The default model (Gemma 3 270M) drafts for itself (`draft_model` = its own GGUF,
`--draft-token-count`, default 4). One greedy stream (ignore_eos) per cell, a short random
prompt:

- plain, adapter: an engine without a draft, the request on a random LoRA adapter;
- draft, adapter: the drafting engine, the same request: the draft proposes base-model tokens,
  which the adapter (random, B of std --lora-std) rarely keeps;
- draft, base: the drafting engine, the request on the base model (the draft proposes its own
  greedy tokens: everything is accepted).

Decode tok/s counts output tokens after the first over the time from the first output token to
the last (prefill excluded); steps/s, the engine steps over the same time; tok/CPU s, the same
tokens over this process's CPU time (less sensitive to other jobs on the machine). Each cell is
the median of --repeats runs, interleaved. proposed/step: tokens proposed per decode step.
Run it on two checkouts (PYTHONPATH=<checkout>/src) to compare them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora import write_random_adapter  # noqa: E402
from common import fmt, log, machine_lines, make_prompt, markdown_table, median  # noqa: E402


def run_one(engine, prompt: list[int], params, adapter: str | None) -> dict:
    engine.add_request(f"b{time.monotonic_ns()}", prompt, params, adapter=adapter)
    tokens, steps, first, last, cpu_first, cpu_last = 0, 0, None, None, 0.0, 0.0
    spec: dict = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now, cpu = time.perf_counter(), time.process_time()
        if first is not None:
            steps += 1
        for out in outs:
            if out.new_token_ids:
                if first is None:
                    first, cpu_first = now, cpu
                last, cpu_last = now, cpu
            tokens += len(out.new_token_ids)
            spec = out.speculation or spec
    span = last - first if first and last and last > first else None
    cpu_span = cpu_last - cpu_first
    return {
        "tok_s": (tokens - 1) / span if span else None,
        "tok_cpu_s": (tokens - 1) / cpu_span if cpu_span > 0 else None,
        "steps_s": steps / span if span else None,
        "steps": steps,
        "tokens": tokens,
        "spec": spec,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--draft-token-count", type=int, default=4)
    p.add_argument("--lora-std", type=float, default=0.05, help="std of the adapter's B")
    args = p.parse_args()

    import torch

    from girandole.engine.engine import EngineConfig, LLMEngine
    from girandole.model.default import default_model_path
    from girandole.sampling.params import SamplingParams

    log("loading the plain and the drafting engine")
    plain = LLMEngine(EngineConfig(kv_cache_gb=0.25))
    draft = LLMEngine(
        EngineConfig(
            kv_cache_gb=0.25,
            draft_model=str(default_model_path()),
            draft_token_count=args.draft_token_count,
        )
    )
    folder = write_random_adapter(
        Path(tempfile.mkdtemp(prefix="bench-backoff-")) / "a0", plain.model.spec, 16, seed=0
    )
    # write_random_adapter's B has std 0.01 (a gentle adapter): rescaled to --lora-std
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    for name, w in weights.items():
        if "lora_B" in name:
            weights[name] = w * (args.lora_std / 0.01)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    for engine in (plain, draft):
        engine.loras.register(engine.loras.read("a0", folder))

    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    prompt = make_prompt(args.prompt_len, "backoff")
    cells = {
        "plain, adapter": (plain, "a0"),
        "draft, adapter": (draft, "a0"),
        "draft, base": (draft, None),
    }
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for engine, adapter in cells.values():
        run_one(engine, make_prompt(args.prompt_len, "warm"), warm, adapter)
    results: dict[str, list[dict]] = {name: [] for name in cells}
    for r in range(args.repeats):
        for name, (engine, adapter) in cells.items():
            results[name].append(run_one(engine, prompt, params, adapter))
            log(f"repeat {r}: {name}: {fmt(results[name][-1]['tok_s'])} tok/s")

    base_rate = median([x["tok_s"] for x in results["plain, adapter"]])
    rows = []
    for name, runs in results.items():
        rate = median([x["tok_s"] for x in runs])
        spec = runs[-1]["spec"]
        proposed, accepted = spec.get("proposed", 0), spec.get("accepted", 0)
        rows.append([
            name,
            fmt(rate),
            fmt(median([x["steps_s"] for x in runs])),
            fmt(median([x["tok_cpu_s"] for x in runs])),
            fmt(rate / base_rate, 2) + "x",
            fmt(proposed / runs[-1]["steps"], 2),
            f"{accepted}/{proposed}" if proposed else "-",
        ])  # fmt: skip
    print("\n".join(machine_lines()))
    print(f"torch threads {torch.get_num_threads()}, prompt {args.prompt_len} tokens, "
          f"{args.max_tokens} output tokens, draft_token_count {args.draft_token_count}, "
          f"adapter B std {args.lora_std}, {args.repeats} repeats\n")  # fmt: skip
    header = ["cell", "decode tok/s", "steps/s", "tok/CPU s", "vs plain", "proposed/step",
              "accepted/proposed"]  # fmt: skip
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
