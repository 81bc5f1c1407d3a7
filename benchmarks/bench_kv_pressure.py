"""The engine under KV-cache pressure: what a tiny cache costs, and where it goes.

    .venv/bin/python benchmarks/bench_kv_pressure.py              # scheduler table (seconds)
    .venv/bin/python benchmarks/bench_kv_pressure.py --model      # and the default model (minutes)
    .venv/bin/python benchmarks/bench_kv_pressure.py --model --model-workload 8,64,64 --kv-cache-gb 1,0.01

Two tables:

- Scheduler (no model, deterministic): the Scheduler and KVCacheManager driven as the engine
  drives them, with Gemma 3 270M's KV cache groups (one full-attention group, five sliding
  groups of window 512; 16-token blocks): per cache size, the steps, the rows a step carries,
  the prompt tokens computed (recomputation after preemptions included) against the prompts'
  own, and the preemptions; `--prefill-cap` as the step budget's floor caps prompt tokens
  while decodes run.
- Model (`--model`): the same requests on the default model (greedy, ignore_eos) with each
  cache size, run interleaved and repeated; median wall time and output tok/s, the same counts,
  and whether every cache gave the ample cache's tokens.

What it shows: a step costs about the same whatever the cache's size (per-row work aside); a
tiny cache holds fewer sequences at once, so the same tokens take more steps of fewer rows, and
every preemption recomputes what the victim had lost from the prefix cache when it returns.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, log, make_prompt, markdown_table, median  # noqa: E402

from girandole.engine.kv_cache import KVCacheManager  # noqa: E402
from girandole.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from girandole.engine.sequence import Sequence  # noqa: E402
from girandole.sampling.params import SamplingParams  # noqa: E402

GEMMA_WINDOWS = [None, 512, 512, 512, 512, 512]  # Gemma 3 270M's KV cache groups


def drive(
    num_blocks: int, requests: int, prompt_len: int, output_len: int, prefill_cap: int | None
) -> dict[str, float]:
    """Run the requests through a Scheduler alone: every scheduled token computed, every
    completed sequence sampling a token. Counts per run."""
    kv = KVCacheManager(num_blocks, 16, GEMMA_WINDOWS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512), kv)
    rng = random.Random(0)
    for i in range(requests):
        prompt = [rng.randrange(1000, 200_000) for _ in range(prompt_len)]
        sched.add(Sequence(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=output_len)))
    cap = None if prefill_cap is None else (lambda rows: prefill_cap)
    steps = rows = prompt_tokens = 0
    while sched.has_work():
        batch = sched.schedule(cap)
        steps += 1
        rows += len(batch.seqs)
        prompt_tokens += sum(
            n for s, n in zip(batch.seqs, batch.num_new_tokens) if not s.is_decode(n)
        )
        sched.mark_computed(batch)
        for seq in batch.out_of_blocks:
            sched.remove(seq)
        for seq in batch.seqs:
            if seq.num_computed_tokens == len(seq):
                seq.token_ids.append(rng.randrange(1000, 200_000))
                if seq.num_output_tokens >= output_len:
                    sched.remove(seq)
    return {
        "steps": steps,
        "rows": rows / steps,
        "prompt_tokens": prompt_tokens,
        "preemptions": sched.num_preemptions,
    }


def scheduler_table(args) -> str:
    rows = []
    for num_blocks in args.blocks:
        for cap in (None, args.prefill_cap):
            r = drive(num_blocks, args.requests, args.prompt_len, args.output_len, cap)
            rows.append(
                [
                    str(num_blocks),
                    "-" if cap is None else str(cap),
                    str(r["steps"]),
                    fmt(r["rows"]),
                    f"{r['prompt_tokens']:,} / {args.requests * args.prompt_len:,}",
                    str(r["preemptions"]),
                ]
            )
    header = ["blocks", "prefill cap", "steps", "rows a step", "prompt tokens computed / own"]
    return markdown_table(header + ["preemptions"], rows)


def model_table(args) -> str:
    import torch

    torch.set_num_threads(args.threads)
    from girandole import LLM

    llms = {gb: LLM(model=args.model_path, kv_cache_gb=gb) for gb in args.kv_cache_gb}
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    runs: dict[float, list[dict]] = {gb: [] for gb in llms}
    same = {gb: True for gb in llms}
    cut = {gb: False for gb in llms}
    for rep in range(args.repeats):
        prompts = [make_prompt(args.prompt_len, f"kvp-{rep}-{i}") for i in range(args.requests)]
        want = None
        for gb, llm in llms.items():  # interleaved: drifts in machine load hit every size alike
            engine = llm.engine
            counts = {"steps": 0, "rows": 0, "prompt_tokens": 0}
            schedule = engine.scheduler.schedule

            def counted(*a, schedule=schedule, counts=counts, **k):
                batch = schedule(*a, **k)
                if batch.seqs:
                    counts["steps"] += 1
                    counts["rows"] += len(batch.seqs)
                    counts["prompt_tokens"] += sum(
                        n for s, n in zip(batch.seqs, batch.num_new_tokens) if not s.is_decode(n)
                    )
                return batch

            engine.scheduler.schedule = counted
            preempted = engine.scheduler.num_preemptions
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            wall = time.perf_counter() - start
            engine.scheduler.schedule = schedule
            tokens = [o.token_ids for o in outs]
            want = want or tokens
            # a cache whose context is shorter than prompt + output ends requests early
            # ("length"): their tokens must be the first cache's up to there
            cut[gb] = cut[gb] or any(len(t) < len(w) for t, w in zip(tokens, want))
            same[gb] = same[gb] and all(t == w[: len(t)] for t, w in zip(tokens, want))
            counts.update(
                wall=wall,
                tok_s=sum(map(len, tokens)) / wall,
                preemptions=engine.scheduler.num_preemptions - preempted,
            )
            runs[gb].append(counts)
            log(f"{gb} GB, run {rep}: {wall:.1f} s, {counts}")
    rows = []
    for gb, llm in llms.items():
        rs = runs[gb]
        wall = median([r["wall"] for r in rs])
        rows.append(
            [
                str(gb),
                str(llm.engine.kv_cache.num_blocks),
                fmt(wall),
                fmt(median([r["tok_s"] for r in rs])),
                fmt(median([r["steps"] for r in rs]), 0),
                fmt(median([r["rows"] / r["steps"] for r in rs])),
                fmt(median([r["prompt_tokens"] for r in rs]), 0),
                fmt(median([r["preemptions"] for r in rs]), 0),
                ("yes" if same[gb] else "NO")
                + (f" (cut at {llm.engine.max_model_len} tokens)" if cut[gb] else ""),
            ]
        )
    header = ["kv cache GB", "blocks", "wall s (median)", "output tok/s", "steps", "rows a step"]
    header += ["prompt tokens computed", "preemptions", "tokens = first cache's"]
    return markdown_table(header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--blocks", type=lambda s: [int(x) for x in s.split(",")],
                   default=[100_000, 400, 200, 100])  # fmt: skip
    p.add_argument("--prefill-cap", type=int, default=32)
    p.add_argument("--model", action="store_true", help="also run the default model")
    p.add_argument("--model-path", default=None, help="a .gguf or HF folder (default model)")
    p.add_argument("--kv-cache-gb", type=lambda s: [float(x) for x in s.split(",")],
                   default=[1.0, 0.01, 0.003])  # fmt: skip
    p.add_argument("--model-workload", type=lambda s: [int(x) for x in s.split(",")],
                   default=[8, 64, 64], help="requests,prompt_len,output_len for --model")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(
        f"Scheduler alone, Gemma 3 270M's KV cache groups: {args.requests} requests of "
        f"{args.prompt_len} prompt + {args.output_len} output tokens\n"
    )
    print(scheduler_table(args))
    if args.model:
        args.requests, args.prompt_len, args.output_len = args.model_workload
        print(
            f"\nDefault model, {args.requests} requests of {args.prompt_len} + "
            f"{args.output_len} tokens, median of {args.repeats}\n"
        )
        print(model_table(args))


if __name__ == "__main__":
    main()
