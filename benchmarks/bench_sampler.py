"""Sampling one step of B rows over Gemma's 262,144-token vocabulary: girandole's Sampler against
transformers' logits warpers (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, then
softmax and torch.multinomial: what `generate(do_sample=True)` does per step), on the same
logits, in the same run.

    .venv/bin/python benchmarks/bench_sampler.py            # B = 1, 16, 64
    .venv/bin/python benchmarks/bench_sampler.py --rows 16 --repeats 20

Logits: "peaked" rows (a few tokens far above the rest, as a trained model's usually are) and
"flat" rows (normal, sigma 3: top-p's nucleus runs to tens of thousands of tokens, the worst case
for a sampler that looks for it among its top candidates). Reported: median ms per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import log, machine_lines, markdown_table, median  # noqa: E402

from girandole.sampling.params import SamplingParams  # noqa: E402
from girandole.sampling.sampler import Sampler, SamplerRow  # noqa: E402

VOCAB = 262144
CONFIGS = {
    "temperature 0.8": dict(temperature=0.8),
    "t 0.8, top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "t 1.0, top-k 40": dict(temperature=1.0, top_k=40),
    "greedy": dict(temperature=0.0),
    # over a 2,000-token prompt and 200 output tokens (transformers: RepetitionPenalty)
    "t 0.8, repetition 1.1": dict(temperature=0.8, repetition_penalty=1.1),
}
HISTORY = (2000, 200)  # prompt and output tokens of the rows a penalty reads


def history(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, sum(HISTORY)), generator=g)


def logits_for(rows: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, VOCAB, generator=g) * 3
    if kind == "peaked":
        top = torch.randint(0, VOCAB, (rows, 8), generator=g)
        x.scatter_(1, top, 25.0 + torch.rand(rows, 8, generator=g) * 5)
    return x


def transformers_step(logits: torch.Tensor, params: dict, ids: torch.Tensor) -> torch.Tensor:
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if params.get("repetition_penalty"):
        logits = RepetitionPenaltyLogitsProcessor(params["repetition_penalty"])(ids, logits)
    if params["temperature"] == 0:
        return logits.argmax(dim=-1)
    scores = TemperatureLogitsWarper(params["temperature"])(None, logits)
    if params.get("top_k"):
        scores = TopKLogitsWarper(params["top_k"])(None, scores)
    if params.get("top_p", 1.0) < 1.0:
        scores = TopPLogitsWarper(params["top_p"])(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]


def time_ms(fn, logits: torch.Tensor, repeats: int) -> float:
    fn(logits.clone())  # warm
    times = []
    for _ in range(repeats):
        x = logits.clone()
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for line in machine_lines():
        log(line)
    sampler = Sampler(seed=0)
    table = []
    for b in [int(r) for r in args.rows.split(",")]:
        for kind in ("peaked", "flat"):
            logits = logits_for(b, kind, seed=b)
            ids = history(b, seed=b)
            for name, params in CONFIGS.items():
                rows = [
                    SamplerRow(SamplingParams(**params), None, ids[i].tolist(), HISTORY[0])
                    for i in range(b)
                ]
                ours = time_ms(lambda x, rows=rows: sampler(x, rows), logits, args.repeats)
                hf = time_ms(
                    lambda x, params=params, ids=ids: transformers_step(x, params, ids),
                    logits,
                    args.repeats,
                )
                table.append([str(b), kind, name, f"{ours:.2f}", f"{hf:.2f}", f"{hf / ours:.1f}x"])
                log(" | ".join(table[-1]))
    header = ["rows", "logits", "sampling", "girandole ms", "transformers ms", "speed-up"]
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
