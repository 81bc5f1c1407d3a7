"""Where girandole's decode step spends its time: torch profiler + cProfile over decode steps.

    .venv/bin/python benchmarks/profile_decode.py                 # batch 1 and 16, 32 steps each
    .venv/bin/python benchmarks/profile_decode.py --batch 4 --steps 64 --context 256
    .venv/bin/python benchmarks/profile_decode.py --model other.gguf  # another GGUF

Prefills --batch random prompts of --context tokens, then profiles --steps engine steps that are
decode-only (one new token per sequence). Prints the step time, the top torch ops by self CPU
time, and the top Python functions by own time (the interpreter overhead around the ops).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, make_prompt, use_model_vocabulary  # noqa: E402


def prefill(llm, batch: int, context: int, steps: int, key: str) -> None:
    from girandole import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        llm.engine.add_request(f"{key}-{i}", make_prompt(context, f"{key}-{i}"), params)
    # Step until every sequence has its first token (prefill done): the rest are decode steps.
    started: set[str] = set()
    while len(started) < batch:
        for out in llm.engine.step():
            if out.new_token_ids:
                started.add(out.request_id)


def drain(llm) -> None:
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def profile(llm, batch: int, steps: int, context: int, top: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    # Timing without any profiler first.
    prefill(llm, batch, context, steps * 3, f"time{batch}")
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.engine.step()
    dt = (time.perf_counter() - t0) / steps
    drain(llm)
    print(
        f"\n=== batch {batch}, context ~{context}: {1000 * dt:.1f} ms/step, {batch / dt:.1f} tok/s ==="
    )

    prefill(llm, batch, context, steps * 3, f"prof{batch}")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            llm.engine.step()
    drain(llm)
    print(f"torch ops, top {top} by self CPU time ({steps} steps):")
    print(
        prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60
        )
    )

    prefill(llm, batch, context, steps * 3, f"cprof{batch}")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        llm.engine.step()
    pr.disable()
    drain(llm)
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    print(f"Python functions, top {top} by own time ({steps} steps):")
    print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])
    del torch


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--model", default=None, help="a GGUF path (default: the default model)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from girandole import LLM

    t0 = time.perf_counter()
    if args.model is not None:
        use_model_vocabulary(args.model)
    llm = LLM() if args.model is None else LLM(model=args.model)
    log(f"loaded in {time.perf_counter() - t0:.1f}s")
    prefill(llm, 1, 16, 8, "warmup")
    drain(llm)
    for b in [int(x) for x in args.batch.split(",")]:
        profile(llm, b, args.steps, args.context, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
