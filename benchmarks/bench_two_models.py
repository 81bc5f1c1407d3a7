"""Two models on one machine, both decoding at once: girandole's two engines in one process
beside two llama-server processes.

    .venv/bin/python benchmarks/bench_two_models.py              # about 3 min
    .venv/bin/python benchmarks/bench_two_models.py --engines girandole-2,girandole-auto

Why: a girandole server runs each deployment (and each model) as an engine of its own in one
process, each with its own OpenMP team. Its thread governor (engine/cpu_threads.py) gives an
engine the cores other processes leave; but the process's other engines are not "other
processes" to /proc/stat, so two busy engines each kept a thread per core: 4 threads on 2
cores, each OpenMP region waiting for a descheduled thread's next time slice. The governor now
shares the cores among the process's stepping engines.

Columns, each in a worker subprocess of its own (loaded once, the two models loaded before the
first measurement):

- girandole-1 / girandole-2: both engines at a fixed thread count (`LLM(threads=N)`);
- girandole-auto: both with the governor (the default), its final thread counts shown;
- llama-server-1 / llama-server-2: two llama-server processes (llama.cpp's way to serve two
  models), `-t 1` / `-t 2` each, if a binary is found (see build_llama_server.sh).

Metric: the two engines' tokens per second together: both get a greedy, ignore_eos request of
--decode-tokens tokens after a --prompt-len token prompt at the same moment; (both token counts)
/ (the time until the later one ends). Median of --repeats. "others" is the share of the CPUs
and the load average is what the whole machine did while it ran (this benchmark's own work
included: read it against the 2 engines' threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LoadSampler,
    find_llama_server,
    loadavg,
    machine_lines,
    make_prompt,
    markdown_table,
    print_run_header,
)

ENGINES = ["girandole-1", "girandole-2", "girandole-auto", "llama-server-1", "llama-server-2"]
SETTLE_S = 0.5  # the previous worker's threads stop spinning for work


def both_at_once(run_one, prompts: list[list[int]], n_tokens: int) -> float:
    """Run one request per engine at the same moment; tokens per second of the two together."""
    counts: list[int] = [0, 0]

    def go(i: int) -> None:
        counts[i] = run_one(i, prompts[i], n_tokens)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def measure(run_one, spec: dict) -> list[float]:
    """A warm-up pair, then --repeats measured pairs of fresh prompts: their rates."""
    both_at_once(run_one, [make_prompt(8, "warm-a"), make_prompt(8, "warm-b")], 4)
    return [
        both_at_once(
            run_one,
            [make_prompt(spec["prompt_len"], f"{r}-{i}") for i in range(2)],
            spec["decode_tokens"],
        )
        for r in range(spec["repeats"])
    ]


def girandole_worker(threads: int | None, spec: dict) -> dict:
    from girandole import LLM, SamplingParams

    model = spec["model"]
    llms = [LLM(model=model, threads=threads) for _ in range(2)]
    params = SamplingParams(temperature=0, max_tokens=spec["decode_tokens"], ignore_eos=True)

    def run_one(i: int, prompt: list[int], n: int) -> int:
        return len(llms[i].generate([prompt], params)[0].token_ids)

    rates = measure(run_one, spec)
    governors = [llm.engine.cpu_threads for llm in llms]
    return {
        "rates": rates,
        "threads": [g.threads if g is not None else None for g in governors],
        "changes": [g.num_changes if g is not None else None for g in governors],
    }


def llama_server_worker(threads: int, spec: dict) -> dict:
    from bench_engine import LlamaServerEngine

    n = spec["prompt_len"] + spec["decode_tokens"]
    servers = [
        LlamaServerEngine(
            {
                **spec,
                "threads": threads,
                "concurrency": [1],
                "prefill_len": n,
                "input_len": n,
                "output_len": 0,
            }
        )  # fmt: skip
        for _ in range(2)
    ]
    try:

        def run_one(i: int, prompt: list[int], n_tokens: int) -> int:
            return servers[i].decode(prompt, n_tokens)["tokens"]

        rates = measure(run_one, spec)
    finally:
        for s in servers:
            s.stop()
    return {"rates": rates, "threads": [threads, threads], "changes": [None, None]}


def worker(name: str, spec: dict) -> dict:
    kind, _, count = name.rpartition("-")
    if kind == "girandole":
        return girandole_worker(None if count == "auto" else int(count), spec)
    return llama_server_worker(int(count), spec)


def run(name: str, spec: dict) -> dict:
    """One column in a fresh process: torch's thread state and OpenMP teams start clean."""
    time.sleep(SETTLE_S)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated columns")
    p.add_argument("--model", default=None, help="GGUF path (default: girandole's default model)")
    p.add_argument("--llama-server-bin", default=None, help="path of a llama-server binary")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="runs per column; the median is shown")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec))))
        return 0
    if args.model is None:
        from girandole.model.default import default_model_path

        args.model = str(default_model_path())
    spec = {
        "model": args.model,
        "llama_server_bin": args.llama_server_bin,
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
    }
    engines = args.engines.split(",")
    if find_llama_server(args.llama_server_bin) is None:
        engines = [e for e in engines if not e.startswith("llama-server")]
    before = loadavg()
    results = {}
    with LoadSampler() as sampler:
        for name in engines:
            results[name] = run(name, spec)
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    header = [
        "# Two models decoding at once (bench_two_models.py)",
        *machine_lines(),
        f"prompt {args.prompt_len} tokens, {args.decode_tokens} decoded"
        f" by each engine, medians of {args.repeats}",
    ]
    print_run_header(header, before, loadavg(), sampler)
    rows = []
    for name in engines:
        res = results[name]
        if "error" in res:
            rows.append([name, "error: " + res["error"][:60], "", "", ""])
            continue
        rows.append([
            name,
            f"{statistics.median(res['rates']):.1f}",
            " / ".join(f"{r:.1f}" for r in res["rates"]),
            ", ".join(str(t) for t in res["threads"]),
            ", ".join("-" if c is None else str(c) for c in res["changes"]),
        ])  # fmt: skip
    print(markdown_table(
        ["engines", "both together, tok/s", "runs", "threads each (end)", "count changes"], rows
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
