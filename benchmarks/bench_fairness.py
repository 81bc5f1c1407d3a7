"""One key's burst beside another key's requests: how long the other key waits.

    .venv/bin/python benchmarks/bench_fairness.py          # about 2 min
    .venv/bin/python benchmarks/bench_fairness.py --burst 256 --probes 8

Why: the admission queue holds at most --max-concurrent-requests (64) choices at the engine and
queues the rest. First come, first served, an eval harness's burst of hundreds of requests made
every later request of another key wait behind all of it (and get 503 at --queue-timeout). Now
the queue is fair between tenants (api/ops/admission.py): the next slot goes to the waiter whose
account, then key, holds the fewest.

Each column is a server under the same load: key A sends --burst requests at once (random
prompts of --prompt-len tokens, --burst-tokens each, greedy, ignore_eos), and while they run key
B sends --probes requests, one every --probe-every seconds (--probe-tokens each). Rows: B's
latency (send to last byte; median, max), A's completed requests and its tokens per second.

- girandole: `girandole serve --api-key A --api-key B` (two keys of one account);
- llama-server (if built, see build_llama_server.sh): --parallel --llama-slots, one queue for
  everyone (it has no keys: the same requests).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
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
    start_girandole,
)

KEY_A, KEY_B = "burst-key", "probe-key"


async def run_load(url: str, body_of, spec: dict, headers_a: dict, headers_b: dict) -> dict:
    """The burst and the probes against one server; B's latencies and A's throughput."""
    import httpx

    limits = httpx.Limits(max_connections=spec["burst"] + spec["probes"] + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(headers: dict, prompt: list[int], n: int) -> tuple[float, int, int]:
            t0 = time.perf_counter()
            r = await client.post(url, json=body_of(prompt, n), headers=headers)
            return time.perf_counter() - t0, r.status_code, n if r.status_code == 200 else 0

        t0 = time.perf_counter()
        burst = [
            asyncio.create_task(
                one(headers_a, make_prompt(spec["prompt_len"], f"a{i}"), spec["burst_tokens"])
            )
            for i in range(spec["burst"])
        ]
        await asyncio.sleep(spec["probe_every"])  # the burst is queued
        probes = []
        for i in range(spec["probes"]):
            prompt = make_prompt(spec["prompt_len"], f"b{i}")
            probes.append(asyncio.create_task(one(headers_b, prompt, spec["probe_tokens"])))
            await asyncio.sleep(spec["probe_every"])
        done_b = await asyncio.gather(*probes)
        done_a = await asyncio.gather(*burst)
        wall = time.perf_counter() - t0
    b_lat = [lat for lat, status, _ in done_b if status == 200]
    return {
        "b_median_s": statistics.median(b_lat) if b_lat else None,
        "b_max_s": max(b_lat) if b_lat else None,
        "b_ok": len(b_lat),
        "b_statuses": sorted({status for _, status, _ in done_b}),
        "a_ok": sum(1 for _, status, _ in done_a if status == 200),
        "a_tok_s": sum(n for _, _, n in done_a) / wall,
    }


def girandole_column(spec: dict) -> dict:
    proc, url, _ = start_girandole(KEY_A, "bench-fairness-", "--api-key", KEY_B,
                                   "--max-queued-requests", str(spec["burst"] + spec["probes"]))  # fmt: skip
    try:

        def body(prompt: list[int], n: int) -> dict:
            return {"model": "accounts/fireworks/models/gemma-3-270m", "prompt": prompt,
                    "max_tokens": n, "temperature": 0, "ignore_eos": True}  # fmt: skip

        return asyncio.run(run_load(
            url + "/v1/completions", body, spec,
            {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"},
        ))  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(60)


def llama_server_column(spec: dict) -> dict:
    from bench_engine import LlamaServerEngine

    n = spec["prompt_len"] + max(spec["burst_tokens"], spec["probe_tokens"])
    server = LlamaServerEngine({**spec, "concurrency": [spec["llama_slots"]], "prefill_len": n,
                                "input_len": n, "output_len": 0})  # fmt: skip
    try:

        def body(prompt: list[int], n: int) -> dict:
            return server._body(prompt, n)

        return asyncio.run(run_load(server.base + "/completion", body, spec, {}, {}))
    finally:
        server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="girandole,llama-server")
    p.add_argument("--burst", type=int, default=192, help="key A's requests, sent at once")
    p.add_argument("--burst-tokens", type=int, default=32)
    p.add_argument("--probes", type=int, default=5, help="key B's requests, one at a time")
    p.add_argument("--probe-tokens", type=int, default=8)
    p.add_argument("--probe-every", type=float, default=1.0, help="seconds between B's requests")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="llama-server's -t")
    p.add_argument("--llama-slots", type=int, default=16)
    p.add_argument("--llama-server-bin", default=None)
    p.add_argument(
        "--model", default=None, help="GGUF for llama-server (default: the default model)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from girandole.model.default import default_model_path

        args.model = str(default_model_path())
    spec = {k: getattr(args, k) for k in ("burst", "burst_tokens", "probes", "probe_tokens",
            "probe_every", "prompt_len", "threads", "llama_slots", "llama_server_bin", "model")}  # fmt: skip
    engines = args.engines.split(",")
    if find_llama_server(args.llama_server_bin) is None:
        engines = [e for e in engines if e != "llama-server"]
    columns = {"girandole": girandole_column, "llama-server": llama_server_column}
    before = loadavg()
    results = {}
    with LoadSampler() as sampler:
        for name in engines:
            results[name] = columns[name](spec)
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    header = [
        "# One key's burst beside another key's requests (bench_fairness.py)",
        *machine_lines(),
        f"key A: {args.burst} requests at once ({args.prompt_len}-token prompts,"
        f" {args.burst_tokens} tokens each); key B: {args.probes} requests of"
        f" {args.probe_tokens} tokens, one every {args.probe_every:g} s during it",
    ]
    print_run_header(header, before, loadavg(), sampler)

    def cell(name: str, key: str, digits: int = 2) -> str:
        value = results[name][key]
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        ["key B's latency, median (s)", *(cell(e, "b_median_s") for e in engines)],
        ["key B's latency, max (s)", *(cell(e, "b_max_s") for e in engines)],
        ["key B's requests answered 200", *(f"{results[e]['b_ok']} of {args.probes}"
                                             f" {results[e]['b_statuses']}" for e in engines)],
        ["key A's requests answered 200", *(f"{results[e]['a_ok']} of {args.burst}" for e in engines)],
        ["key A's tokens per second", *(cell(e, "a_tok_s", 1) for e in engines)],
    ]  # fmt: skip
    print(markdown_table(["", *engines], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
