"""Online serving benchmark: girandole's server vs llama.cpp's server, streaming clients.

    .venv/bin/python benchmarks/bench_server.py            # 1/4/16/64 clients, both servers
    .venv/bin/python benchmarks/bench_server.py --quick    # 1/4/16 clients
    .venv/bin/python benchmarks/bench_server.py --servers girandole --concurrency 16
    .venv/bin/python benchmarks/bench_server.py --servers girandole,girandole-ray --concurrency 16

The script starts each server itself on a free 127.0.0.1 port (same GGUF, 2 threads), one after
the other, waits until it is ready and sends one warm-up request; then for each concurrency N, on
each server in turn (the order rotating from cell to cell, so load drifts on a shared machine hit
both alike; only one server is under load at a time), it runs N streaming clients
(httpx, asyncio) that together send max(N * --rounds, --min-requests) completions: about
--prompt-tokens tokens of random English words (a different prompt each, so no prefix-cache
hits), --max-tokens output tokens, greedy (or --temperature, --top-p), ignore_eos. It reports
per cell: total output tok/s (all output tokens / wall time of the cell), TTFT p50/p99 (request
sent to first text chunk), inter-token latency p50/p99 (gaps between streamed text chunks, all
requests pooled) and TPOT p50 ((end - first chunk) / (tokens - 1) per request). It stops the
servers at the end.

llama.cpp's server: the `llama-server` binary (built from the llama-cpp-python source package by
benchmarks/build_llama_server.sh; found via --llama-server-bin, $LLAMA_SERVER_BIN, next to this
Python, or on PATH) with --parallel slots and continuous batching; or, if there is none (or with
--llama-server python), llama-cpp-python's own `python -m llama_cpp.server`, which serves one
request at a time (no batching).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CpuMeter,
    LoadSampler,
    add_quiet_options,
    dump_json,
    find_llama_server,
    fmt,
    free_port,
    loadavg,
    log,
    machine_lines,
    make_text_prompt,
    markdown_table,
    median,
    percentile,
    print_run_header,
    proc_rss_mib,
    ratio,
)

GEMMA_EOS_IDS = (1, 106)  # <eos>, <end_of_turn>: banned by logit_bias where ignore_eos is missing


def sampling(args) -> dict:
    """The requests' sampling fields: greedy, or --temperature / --top-p. top_k 0 and min_p 0
    turn off llama.cpp's default top-k 40 and min-p 0.05 (girandole has neither by default):
    both servers sample the same distribution."""
    if args.temperature == 0:
        return {"temperature": 0}
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": 0, "min_p": 0.0}


class Server:
    """A server process started by this script; stopped by stop() (or at exit)."""

    name = "?"
    completions_path = "/v1/completions"
    ready_path = "/health"
    batching = True
    stop_timeout = 15.0

    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        self.args = args
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / f"{self.name.replace('/', '_')}.log"
        self.proc: subprocess.Popen | None = None
        self.model = "default"
        self.notes: list[str] = []

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def version(self) -> str:
        return "?"

    def body(self, prompt: str, max_tokens: int) -> dict:
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            **sampling(self.args),
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }

    def start(self) -> None:
        cmd = self.command()
        log(f"[{self.name}] starting: {' '.join(cmd)} (log: {self.log_path})")
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=self.env()
        )

    async def wait_ready(self, client, timeout: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                r = await client.get(self.base + self.ready_path, timeout=5)
                if r.status_code == 200:
                    await self.after_ready(client)
                    return time.perf_counter() - t0
            except Exception:  # noqa: BLE001 (not listening yet)
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}")

    async def after_ready(self, client) -> None:
        pass

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log_file.close()


class GirandoleServer(Server):
    name = "girandole"
    completions_path = "/inference/v1/completions"
    ready_path = "/health"

    def command(self) -> list[str]:
        exe = Path(sys.executable).with_name("girandole")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "girandole.cli"]
        cmd += ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        if self.args.model:
            cmd += ["--model", self.args.model]
        if self.args.girandole_kv_cache_gb is not None:
            cmd += ["--kv-cache-gb", str(self.args.girandole_kv_cache_gb)]
        return cmd + self.args.girandole_arg

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(self.args.threads))
        return env

    def version(self) -> str:
        import girandole

        return f"girandole {girandole.__version__} server"

    async def after_ready(self, client) -> None:
        r = await client.get(self.base + "/inference/v1/models", timeout=10)
        data = r.json().get("data") or []
        self.model = data[0]["id"] if data else "accounts/fireworks/models/gemma-3-270m"


class GirandoleRayServer(GirandoleServer):
    """`girandole serve --ray`: the same model as one Ray Serve replica on a local cluster that
    the server starts (tokens from the replica's own port; docs/deployments.md)."""

    name = "girandole --ray"
    stop_timeout = 90.0  # Ray Serve and the local cluster stop with the server

    def command(self) -> list[str]:
        return super().command() + ["--ray"]

    def version(self) -> str:
        import ray

        return f"{super().version()} on Ray Serve {ray.__version__}"


class LlamaServerBin(Server):
    name = "llama.cpp"
    ready_path = "/health"

    def __init__(self, args: argparse.Namespace, logdir: Path, binary: str) -> None:
        super().__init__(args, logdir)
        self.binary = binary
        self.slots = args.llama_slots or max(args.concurrency_list)
        self.ctx = self.slots * (args.prompt_tokens * 2 + args.max_tokens + 64)
        self.notes = [
            f"llama-server ({binary}), --parallel {self.slots} slots, -c {self.ctx}, --cache-ram 0, "
            f"{args.threads} threads, continuous batching"
        ]

    def command(self) -> list[str]:
        t = str(self.args.threads)
        return [
            self.binary,
            "-m", self.args.model_path,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "-t", t,
            "-tb", t,
            "-c", str(self.ctx),
            "--parallel", str(self.slots),
            "--cont-batching",
            "--no-webui",
            "--cache-ram", "0",  # prompts never repeat: the host-RAM prompt cache only adds RSS
            *self.args.llama_arg,
        ]  # fmt: skip

    def version(self) -> str:
        try:
            out = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=30
            )
            text = (out.stdout + out.stderr).strip().splitlines()
            return "llama-server " + " ".join(line for line in text if "version" in line)[:100]
        except (OSError, subprocess.TimeoutExpired):
            return "llama-server"


class LlamaCppPythonServer(Server):
    name = "llama.cpp"
    ready_path = "/v1/models"
    batching = False

    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        super().__init__(args, logdir)
        self.notes = [
            "llama-cpp-python's `python -m llama_cpp.server` (one request at a time, no batching; "
            "--interrupt_requests False so requests queue instead of cancelling each other)"
        ]

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", self.args.model_path,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_threads", str(self.args.threads),
            "--n_threads_batch", str(self.args.threads),
            "--n_ctx", str(2 * (self.args.prompt_tokens * 2 + self.args.max_tokens)),
            "--interrupt_requests", "False",
        ]  # fmt: skip

    def version(self) -> str:
        import llama_cpp

        return f"llama-cpp-python {llama_cpp.__version__} server"

    def body(self, prompt: str, max_tokens: int) -> dict:
        # No ignore_eos here: ban the EOS tokens instead, so every request gives max_tokens.
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            **sampling(self.args),
            "stream": True,
            "logit_bias": {str(t): -100 for t in GEMMA_EOS_IDS},
        }


# --------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------


async def one_request(client, server: Server, prompt: str, max_tokens: int) -> dict:
    chunk_times: list[float] = []
    usage = None
    t_send = time.perf_counter()
    async with client.stream(
        "POST", server.base + server.completions_path, json=server.body(prompt, max_tokens)
    ) as r:
        if r.status_code != 200:
            body = (await r.aread()).decode(errors="replace")[:300]
            return {"error": f"HTTP {r.status_code}: {body}"}
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            data = json.loads(payload)
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                if choice.get("text"):
                    chunk_times.append(time.perf_counter())
    t_end = time.perf_counter()
    if not chunk_times:
        return {"error": "no text streamed"}
    tokens = (usage or {}).get("completion_tokens") or len(chunk_times)
    return {
        "ttft": chunk_times[0] - t_send,
        "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
        "tpot": (t_end - chunk_times[0]) / (tokens - 1) if tokens > 1 else None,
        "tokens": tokens,
        "prompt_tokens": (usage or {}).get("prompt_tokens"),
        "chunks": len(chunk_times),
        "t_send": t_send,
        "t_end": t_end,
    }


async def run_cell(client, server: Server, n_clients: int, n_requests: int, args, key: str) -> dict:
    prompts = [make_text_prompt(args.prompt_tokens, f"{key}-{i}") for i in range(n_requests)]
    counter = itertools.count()
    results: list[dict] = []

    async def worker() -> None:
        while (i := next(counter)) < n_requests:
            try:
                results.append(await one_request(client, server, prompts[i], args.max_tokens))
            except Exception as exc:  # noqa: BLE001 (report, keep the other clients going)
                results.append({"error": f"{type(exc).__name__}: {exc}"})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": n_clients,
        "requests": n_requests,
        "ok": len(ok),
        "errors": errors[:5],
        "num_errors": len(errors),
        "wall_s": wall,
        "output_tokens": tokens,
        "tok_s": tokens / wall if wall > 0 else None,
        "req_s": len(ok) / wall if wall > 0 else None,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50),
        "itl_p99": percentile(itl, 99),
        "tpot_p50": median([r["tpot"] for r in ok if r["tpot"] is not None]),
        "mean_prompt_tokens": (
            sum(r["prompt_tokens"] for r in ok) / len(ok)
            if ok and all(r["prompt_tokens"] for r in ok)
            else None
        ),
        "tokens_per_chunk": tokens / sum(r["chunks"] for r in ok) if ok else None,
    }


async def bench_servers(servers: list[Server], args) -> dict[str, dict]:
    """Start every server, then run each concurrency cell on each server in turn (the order
    rotating), so drifts in machine load hit them alike; stop them all at the end."""
    import httpx

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    results = {s.name: {"server": s.name, "notes": s.notes, "cells": {}} for s in servers}
    meter = CpuMeter()
    live: list[Server] = []
    async with httpx.AsyncClient(
        limits=limits, timeout=httpx.Timeout(args.request_timeout)
    ) as client:
        try:
            for server in servers:  # one at a time: loading is CPU-heavy
                res = results[server.name]
                server.start()
                try:
                    res["version"] = server.version()
                    res["startup_s"] = await server.wait_ready(client, args.startup_timeout)
                    res["pid"] = server.proc.pid
                    log(f"[{server.name}] ready in {res['startup_s']:.1f}s (model {server.model})")
                    warm = await one_request(client, server, make_text_prompt(32, "warmup"), 8)
                    if "error" in warm:
                        raise RuntimeError(f"warm-up request failed: {warm['error']}")
                    res["memory_after_warmup"] = proc_rss_mib(server.proc.pid)
                    live.append(server)
                except Exception as exc:  # noqa: BLE001
                    res["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"[{server.name}] ERROR {res['error']}")
                    server.stop()
            for i, n in enumerate(args.concurrency_list):
                n_requests = max(n * args.rounds, args.min_requests)
                order = live[i % len(live) :] + live[: i % len(live)] if live else []
                if args.fixed_order:
                    order = live
                for server in order:
                    for attempt in range(args.retries + 1):
                        waited, _ = await asyncio.to_thread(
                            meter.wait_quiet, args.quiet_below, args.max_wait
                        )
                        if waited > 3:
                            log(f"  waited {waited:.0f}s for a quiet machine")
                        a = meter.snapshot()
                        key = f"c{n}" + (f"-retry{attempt}" if attempt else "")
                        cell = await run_cell(client, server, n, n_requests, args, key)
                        cell["others_cpu"] = meter.foreign(a, meter.snapshot())
                        cell["waited_s"] = waited
                        log(
                            f"[{server.name}] {n} clients, {n_requests} requests: "
                            f"{fmt(cell['tok_s'])} tok/s, TTFT p50 {fmt(cell['ttft_p50'], 2)}s, "
                            f"ITL p50 {fmt(1000 * (cell['itl_p50'] or 0))}ms, others used "
                            f"{100 * cell['others_cpu']:.0f}% of the CPUs"
                            + (
                                f", {cell['num_errors']} errors: {cell['errors'][:1]}"
                                if cell["num_errors"]
                                else ""
                            )
                        )
                        if cell["others_cpu"] <= args.retry_above or attempt == args.retries:
                            break
                        log("  discarded: too much other work meanwhile; running it again")
                    cell["reruns"] = attempt
                    results[server.name]["cells"][str(n)] = cell
            for server in live:
                results[server.name]["memory_end"] = proc_rss_mib(server.proc.pid)
        finally:
            for server in servers:
                server.stop()
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def build_table(results: dict[str, dict], concurrency: list[int]) -> str:
    names = list(results)
    both = "girandole" in results and "llama.cpp" in results
    header = ["clients", "metric", *names] + (["girandole / llama.cpp"] if both else [])
    metrics = [
        ("output tok/s (total)", "tok_s", 1, 1.0),
        ("TTFT p50, s", "ttft_p50", 2, 1.0),
        ("TTFT p99, s", "ttft_p99", 2, 1.0),
        ("ITL p50, ms", "itl_p50", 1, 1000.0),
        ("ITL p99, ms", "itl_p99", 1, 1000.0),
        ("TPOT p50, ms", "tpot_p50", 1, 1000.0),
    ]
    rows = []
    for n in concurrency:
        for i, (label, key, digits, scale) in enumerate(metrics):
            cells = []
            vals = {}
            for name in names:
                c = results[name].get("cells", {}).get(str(n))
                if c is None:
                    cells.append("error" if "error" in results[name] else "-")
                    continue
                v = c.get(key)
                vals[name] = v
                text = fmt(v * scale if v is not None else None, digits)
                if key == "tok_s" and c.get("num_errors"):
                    text += f" ({c['num_errors']} errors)"
                cells.append(text)
            row = [str(n) if i == 0 else "", label, *cells]
            if both:
                row.append(ratio(vals.get("girandole"), vals.get("llama.cpp")))
            rows.append(row)
    mem = ["", "server peak RSS, MiB"]
    for name in names:
        mem.append(fmt((results[name].get("memory_end") or {}).get("peak_rss_mib"), 0))
    if both:
        mem.append(
            ratio(
                (results["girandole"].get("memory_end") or {}).get("peak_rss_mib"),
                (results["llama.cpp"].get("memory_end") or {}).get("peak_rss_mib"),
            )
        )
    rows.append(mem)
    return markdown_table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--servers", default="girandole,llama.cpp")
    p.add_argument("--model", default=None, help="GGUF path (default: girandole's default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--rounds", type=int, default=1, help="requests per client in each cell")
    p.add_argument(
        "--min-requests", type=int, default=4, help="at least this many requests per cell"
    )
    p.add_argument("--prompt-tokens", type=int, default=256, help="about this many prompt tokens")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature > 0")
    p.add_argument(
        "--llama-server",
        choices=["auto", "bin", "python"],
        default="auto",
        help="llama.cpp's server: the llama-server binary, llama-cpp-python's, or auto",
    )
    p.add_argument("--llama-server-bin", default=None, help="path of a llama-server binary")
    p.add_argument(
        "--llama-slots",
        type=int,
        default=None,
        help="llama-server --parallel (default: max clients)",
    )
    p.add_argument("--llama-arg", action="append", default=[], help="extra llama-server argument")
    p.add_argument("--girandole-kv-cache-gb", type=float, default=None)
    p.add_argument(
        "--girandole-arg", action="append", default=[], help="extra `girandole serve` argument"
    )
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--quick", action="store_true", help="clients 1,4,16")
    add_quiet_options(p, "cell", retries=1)
    p.add_argument(
        "--fixed-order",
        action="store_true",
        help="same server order in every cell (default: the order rotates cell by cell)",
    )
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick and args.concurrency == "1,4,16,64":
        args.concurrency = "1,4,16"
    args.concurrency_list = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.model is None:
        from girandole.model.default import default_model_path

        args.model_path = str(default_model_path())
    else:
        args.model_path = str(Path(args.model).resolve())

    logdir = Path(tempfile.mkdtemp(prefix="girandole-bench-server-"))
    servers: list[Server] = []
    for name in [s.strip() for s in args.servers.split(",") if s.strip()]:
        if name == "girandole":
            servers.append(GirandoleServer(args, logdir))
        elif name in ("girandole-ray", "ray"):
            servers.append(GirandoleRayServer(args, logdir))
        elif name in ("llama.cpp", "llama-cpp", "llama"):
            binary = (
                find_llama_server(args.llama_server_bin) if args.llama_server != "python" else None
            )
            if args.llama_server == "bin" and binary is None:
                raise SystemExit(
                    "no llama-server binary found (see benchmarks/build_llama_server.sh)"
                )
            servers.append(
                LlamaServerBin(args, logdir, binary)
                if binary
                else LlamaCppPythonServer(args, logdir)
            )
        else:
            raise SystemExit(f"unknown server {name!r}")

    header = machine_lines() + [
        f"model: {args.model_path}",
        f"threads: {args.threads}; prompts: about {args.prompt_tokens} tokens of random words; "
        f"{args.max_tokens} output tokens, {sampling(args)}, ignore_eos; requests per cell: "
        f"max(clients x {args.rounds}, {args.min_requests})",
    ]
    for line in header:
        log(line)
    load_before = loadavg()
    t0 = time.perf_counter()
    try:
        with LoadSampler() as sampler:
            results = asyncio.run(bench_servers(servers, args))
    finally:
        for server in servers:
            server.stop()
    load_after = loadavg()

    print_run_header(header, load_before, load_after, sampler)
    print(f"total benchmark time: {time.perf_counter() - t0:.0f}s")
    print()
    print(build_table(results, args.concurrency_list))
    print()
    for name, r in results.items():
        line = f"- {r.get('version', name)}: " + "; ".join(r.get("notes", []))
        if "startup_s" in r:
            line += f"; ready {r['startup_s']:.1f}s after start"
        cells = r.get("cells", {})
        prompt_tokens = [
            c["mean_prompt_tokens"] for c in cells.values() if c.get("mean_prompt_tokens")
        ]
        if prompt_tokens:
            line += f"; mean prompt tokens {sum(prompt_tokens) / len(prompt_tokens):.0f}"
        tpc = [c["tokens_per_chunk"] for c in cells.values() if c.get("tokens_per_chunk")]
        if tpc:
            line += f"; tokens per streamed chunk {sum(tpc) / len(tpc):.2f}"
        print(line)
        if "error" in r:
            print(f"  - ERROR: {r['error']}")
        for n, c in cells.items():
            if c["num_errors"]:
                print(f"  - {n} clients: {c['num_errors']} failed requests, e.g. {c['errors'][0]}")
    shares = [c.get("others_cpu", 0) for r in results.values() for c in r.get("cells", {}).values()]
    if shares:
        reruns = sum(
            c.get("reruns", 0) for r in results.values() for c in r.get("cells", {}).values()
        )
        print(
            f"- other processes' share of the CPUs during the kept cells: median "
            f"{100 * median(shares):.0f}%, max {100 * max(shares):.0f}%; {reruns} cells rerun"
        )
    print(f"- server logs: {logdir}")
    dump_json(
        args.json,
        {
            "header": header,
            "load_before": load_before,
            "load_during": sampler.summary(),
            "load_after": load_after,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
