"""Reinforcement fine-tuning (GRPO) step benchmark on the default model: the phases of one step.

    .venv/bin/python benchmarks/bench_rft.py                      # 1 prompt, 4 x 32 tokens
    .venv/bin/python benchmarks/bench_rft.py --candidates 8 --tokens 64 --threads 2

One step of a GRPO job (finetune/grpo.py) on one prompt, timed by phase with the trainer's own
pieces (reference-mode model, `Trainable`, rollout.sample, grpo.token_logps):

- rollout: the candidates sampled with the KV cache (rollout.py), every candidate run to
  `--tokens` (no stop token), so the count is fixed;
- policy: each candidate's forward and backward (the policy-gradient loss);
- reference: each candidate's base-model forward (only with klBeta > 0);
- decode step: the rollout's seconds per decode step (all candidates' tokens of one position).

Each phase's median wall-clock and CPU seconds over `--steps` steps after `--warmup`. The
evaluator's time is the user's code, not measured here.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, machine_lines, markdown_table, median  # noqa: E402

PROMPT = "Write a short poem about the sea."


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="tokens of each candidate")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a job's default: 1)")
    p.add_argument("--note", default="", help="a line printed under the table (e.g. the load)")
    args = p.parse_args()
    if args.steps <= args.warmup:
        p.error("--steps must be larger than --warmup")

    import torch

    from girandole.finetune.grpo import token_logps
    from girandole.finetune.rollout import SamplingConfig, sample
    from girandole.finetune.trainer import Trainable
    from girandole.model import lora
    from girandole.model.default import resolve_model_path
    from girandole.model.loader import load_model
    from girandole.tokenizer.chat_template import chat_template_for, encode_chat
    from girandole.tokenizer.loader import load_tokenizer

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    path = resolve_model_path(None)
    log("loading the default model (reference mode, fp32)")
    tok = load_tokenizer(path)
    model, _ = load_model(path, mode="reference", device=cpu, use_cache=False)
    lora.attach(model)
    trainable = Trainable(model.spec, 8, 8.0, None, cpu)
    _, prompt = encode_chat(tok, [{"role": "user", "content": PROMPT}], chat_template_for(tok))
    sampling = SamplingConfig(candidates=args.candidates, max_tokens=args.tokens)
    generator = torch.Generator().manual_seed(0)
    phases: dict[str, list[tuple[float, float]]] = {"rollout": [], "policy": [], "reference": []}
    for step in range(args.steps):
        log(f"step {step + 1} of {args.steps}")
        adapter = trainable.adapter()
        times = {}
        start, start_cpu = time.monotonic(), cpu_s()
        candidates = sample(model, adapter, prompt, sampling, set(), generator, cpu)
        times["rollout"] = (time.monotonic() - start, cpu_s() - start_cpu)
        start, start_cpu = time.monotonic(), cpu_s()
        for candidate in candidates:
            logp = token_logps(model, adapter, prompt + candidate, len(prompt), cpu)
            (-logp.mean()).backward(retain_graph=True)
        times["policy"] = (time.monotonic() - start, cpu_s() - start_cpu)
        start, start_cpu = time.monotonic(), cpu_s()
        with torch.no_grad():
            for candidate in candidates:
                token_logps(model, None, prompt + candidate, len(prompt), cpu)
        times["reference"] = (time.monotonic() - start, cpu_s() - start_cpu)
        if step >= args.warmup:
            for name, value in times.items():
                phases[name].append(value)

    rows = []
    for name, values in phases.items():
        rows.append([name, f"{median([v[0] for v in values]):.2f}", f"{median([v[1] for v in values]):.2f}"])  # fmt: skip
    rollout = median([v[0] for v in phases["rollout"]])
    rows.append(["decode step (rollout / tokens)", f"{rollout / args.tokens:.3f}", ""])
    total = sum(median([v[0] for v in values]) for values in phases.values())
    rows.append(["step, klBeta > 0 (sum)", f"{total:.2f}", ""])
    print()
    for line in machine_lines():
        print(line)
    print(
        f"default model {Path(path).name}, fp32 on CPU, torch {torch.__version__}, torch threads"
        f" {args.threads}; prompt of {len(prompt)} tokens, {args.candidates} candidates of"
        f" {args.tokens} tokens, {args.steps} steps ({args.warmup} warmup left out of the medians)"
    )
    print(markdown_table(["phase", "s (median)", "CPU s (median)"], rows))
    if args.note:
        print(args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
