"""Decode speed while other processes use the CPU: girandole's thread counts side by side.

    .venv/bin/python benchmarks/bench_contention.py            # full run: about 4 min
    .venv/bin/python benchmarks/bench_contention.py --quick    # about 2 min
    .venv/bin/python benchmarks/bench_contention.py --engines girandole-1,girandole-auto

Why: a decode step is hundreds of OpenMP parallel regions, and each region needs all of its
threads on a core at once. When other processes hold a core, every region waits for the
scheduler to bring the descheduled thread back (gang scheduling), so an engine with as many
threads as cores can decode many times slower than one with fewer threads. This script shows it.

Rows (load patterns), each made by plain Python subprocesses started before a cell and killed
after it (always, even on error):

- none: no competitor of ours (other work on a shared machine still counts; see "others");
- half: one process busy 50% of the time (--half-busy-ms busy, then as long asleep);
- 1 busy: one `while True: pass` process;
- 2 busy: two of them.

Columns (engines), each in its own worker subprocess, loaded once, all loaded before the first
measurement; every load pattern runs each engine in turn (order rotating with the repeat):

- girandole-1 / girandole-2: a fixed thread count: GIRANDOLE_THREADS=N and OMP_NUM_THREADS=N in
  its environment, and torch.set_num_threads(N) before the model loads (right on code that does
  not know GIRANDOLE_THREADS yet);
- girandole-auto: GIRANDOLE_THREADS and OMP_NUM_THREADS unset, torch left at its default: the
  engine's own choice (with a thread governor, the count it picks from what other processes
  leave free; without one, torch's default, usually one thread per core). The "auto threads"
  column is the thread count its governor reported at the end of each cell (median), if the
  engine has one (`LLMEngine.cpu_threads`, engine/cpu_threads.py), "-" otherwise;
- transformers: torch, --threads threads, the GGUF dequantized to fp32 (as bench_engine.py runs
  it); slow, so it decodes --hf-decode-tokens tokens;
- llama-server: llama.cpp's server with -t --threads, if a binary is found (see
  build_llama_server.sh); "not built" otherwise.

Metric: single-stream decode tok/s: a greedy, ignore_eos request of --decode-tokens tokens after
a --prompt-len token prompt, timed from its first output token to its last (prefill excluded),
median of --repeats. "others" is the share of the CPUs that processes outside this benchmark
(and its competitors) used during the cells: on a shared machine it makes every row slower.

Times on 2 cores (Intel Xeon, default model, all engines but llama-server): the full run took
224 s with the machine otherwise quiet; the slow cells are the 2-thread ones under load, so with
other work on the machine it takes longer (--quick: 432 s while others used two thirds of the
CPUs; --repeats 3 at --quick's lengths: 326 s with others at 0-50%).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CpuMeter,
    LoadSampler,
    add_peer_options,
    dump_json,
    find_llama_server,
    fmt,
    loadavg,
    log,
    machine_lines,
    make_prompt,
    markdown_table,
    median,
    print_run_header,
    ratio,
    use_model_vocabulary,
)

ENGINES = ("girandole-1", "girandole-2", "girandole-auto", "transformers", "llama-server")
LOADS = ("none", "half", "1 busy", "2 busy")
# Competitors end themselves after this long, or when their parent is gone: a killed benchmark
# leaves nothing spinning.
COMPETITOR_MAX_S = 1800


# --------------------------------------------------------------------------------------------
# Competitors: the load patterns
# --------------------------------------------------------------------------------------------

_BUSY = """
import os, time
parent, end = os.getppid(), time.monotonic() + {max_s}
while os.getppid() == parent and time.monotonic() < end:
    for _ in range(20000):
        pass
"""

_HALF = """
import os, time
parent, end = os.getppid(), time.monotonic() + {max_s}
busy, idle = {busy_s}, {idle_s}
while os.getppid() == parent and time.monotonic() < end:
    t = time.monotonic() + busy
    while time.monotonic() < t:
        pass
    time.sleep(idle)
"""


class Competitors:
    """The competitor processes of one load pattern, alive inside a `with` block."""

    def __init__(self, load: str, half_busy_ms: float) -> None:
        s = half_busy_ms / 1000
        busy = _BUSY.format(max_s=COMPETITOR_MAX_S)
        half = _HALF.format(max_s=COMPETITOR_MAX_S, busy_s=s, idle_s=s)
        self.codes = {"none": [], "half": [half], "1 busy": [busy], "2 busy": [busy, busy]}[load]
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Competitors:
        try:
            for code in self.codes:
                self.procs.append(subprocess.Popen([sys.executable, "-c", code]))
            if self.procs:
                time.sleep(0.3)  # running, and in the scheduler's view, before the cell starts
                dead = [p.returncode for p in self.procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"a competitor process exited at once ({dead})")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


# --------------------------------------------------------------------------------------------
# Engine adapters (run inside the worker subprocess); bench_engine.py's, with thread control
# --------------------------------------------------------------------------------------------


def governor_threads(engine: object) -> int | None:
    """The thread count the engine last chose (engine/cpu_threads.py), if it chooses one."""
    threads = getattr(getattr(engine, "cpu_threads", None), "threads", None)
    return threads if isinstance(threads, int) else None


class GirandoleAdapter:
    """girandole's `LLM` with a fixed thread count (spec["threads"]) or its own (None)."""

    def __init__(self, spec: dict) -> None:
        import torch

        if spec["threads"] is not None:
            torch.set_num_threads(spec["threads"])
        from bench_engine import GirandoleEngine

        from girandole import LLM, SamplingParams

        inner = GirandoleEngine.__new__(GirandoleEngine)  # its methods, our construction
        inner.SamplingParams = SamplingParams
        inner.llm = LLM(model=spec["model"])
        inner.engine = inner.llm.engine
        inner._n = 0
        self.inner = inner
        self.torch = torch
        self.version = GirandoleEngine.version()

    def decode(self, prompt: list[int], n_tokens: int) -> dict:
        return self.inner.decode(prompt, n_tokens)

    def threads(self) -> dict:
        governor = getattr(self.inner.engine, "cpu_threads", None)
        return {
            "governor": governor_threads(self.inner.engine),
            "torch": self.torch.get_num_threads(),
            # the governor's changes since the engine loaded (a count that dipped mid-cell)
            "changes": getattr(governor, "num_changes", None),
        }


class TransformersAdapter:
    def __init__(self, spec: dict) -> None:
        from bench_engine import TransformersEngine

        self.inner = TransformersEngine(spec)
        self.version = TransformersEngine.version()

    def decode(self, prompt: list[int], n_tokens: int) -> dict:
        return self.inner.decode(prompt, n_tokens)

    def threads(self) -> dict:
        return {"governor": None, "torch": self.inner.torch.get_num_threads()}


class LlamaServerAdapter:
    def __init__(self, spec: dict) -> None:
        from bench_engine import LlamaServerEngine

        n = spec["prompt_len"] + max(spec["decode_tokens"], spec["hf_decode_tokens"])
        self.inner = LlamaServerEngine(
            {**spec, "concurrency": [1], "prefill_len": n, "input_len": n, "output_len": 0}
        )
        self.version = LlamaServerEngine.version()

    def decode(self, prompt: list[int], n_tokens: int) -> dict:
        return self.inner.decode(prompt, n_tokens)

    def threads(self) -> dict:
        return {"governor": None, "torch": None}

    def stop(self) -> None:
        self.inner.stop()


def worker_spec(name: str, base: dict) -> tuple[dict, dict[str, str | None]]:
    """The spec of one engine's worker and its environment changes (None: unset the variable)."""
    t = base["threads"]
    if name == "girandole-auto":
        return {**base, "threads": None}, {"GIRANDOLE_THREADS": None, "OMP_NUM_THREADS": None}
    if name.startswith("girandole-"):
        n = int(name.split("-", 1)[1])
        return {**base, "threads": n}, {"GIRANDOLE_THREADS": str(n), "OMP_NUM_THREADS": str(n)}
    return dict(base), {"OMP_NUM_THREADS": str(t), "GIRANDOLE_THREADS": str(t)}


def serve_worker(name: str, spec: dict) -> int:
    """Worker process: load one engine, then answer JSON commands, one a line, until "quit".

    The protocol uses this process's original stdout; fd 1 is pointed at stderr so that what the
    libraries print cannot corrupt it.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # A SIGTERM from the driver runs atexit handlers (llama-server's stop) on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    if spec["other_vocabulary"]:
        use_model_vocabulary(spec["model"])
    try:
        t0 = time.perf_counter()
        if name.startswith("girandole-"):
            eng = GirandoleAdapter(spec)
        elif name == "transformers":
            eng = TransformersAdapter(spec)
        else:
            eng = LlamaServerAdapter(spec)
        load_s = time.perf_counter() - t0
        eng.decode(make_prompt(spec["prompt_len"], f"warmup-{name}"), 8)  # first-call costs
        reply({"ok": True, "version": eng.version, "load_s": load_s, "threads": eng.threads()})
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["op"] == "quit":
                    break
                if cmd["op"] == "decode":
                    out = eng.decode(cmd["prompt"], cmd["n"])
                    out["threads"] = eng.threads()
                else:
                    raise ValueError(f"unknown op {cmd['op']!r}")
                reply({"ok": True, "result": out})
            except Exception as exc:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        if hasattr(eng, "stop"):
            eng.stop()
    return 0


class WorkerProc:
    """The driver's handle on one engine's worker subprocess."""

    def __init__(self, name: str, spec: dict, env_changes: dict[str, str | None]) -> None:
        self.name = name
        env = dict(os.environ)
        for k, v in env_changes.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )

    def read(self, timeout: float) -> dict:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.kill()
                return {"ok": False, "error": f"no answer in {timeout:.0f}s (worker killed)"}
        line = self.proc.stdout.readline()
        if not line:
            return {"ok": False, "error": f"worker exited with {self.proc.wait()}"}
        return json.loads(line)

    def call(self, timeout: float, **cmd) -> dict:
        if self.proc.poll() is not None:
            return {"ok": False, "error": "worker is not running"}
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            return {"ok": False, "error": f"worker gone: {exc}"}
        return self.read(timeout)

    def close(self) -> None:
        """Ask the worker to quit; terminate it, then kill it, if it does not."""
        if self.proc.poll() is not None:
            return
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(20)
            return
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.stop()

    def stop(self) -> None:
        """Terminate the worker (its SIGTERM handler stops a llama-server); kill it if need be."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


# Before each cell: the previous engine's threads wait for work by spinning for a while
# (llama.cpp's polling, OpenMP's spin-wait) and, meanwhile, took cores from the next engine
# (the engine after a 2-thread one measured 0.67x of it with nothing else running)
SETTLE_S = 0.5


def run_all(spec: dict, engines: list[str], loads: list[str], timeout: float) -> dict:
    results: dict[str, dict] = {n: {"engine": n, "cells": {}} for n in engines}
    workers: dict[str, WorkerProc] = {}
    meter = CpuMeter()
    try:
        for name in engines:  # all loaded before any measurement, one at a time
            if name == "llama-server" and find_llama_server(spec["llama_server_bin"]) is None:
                results[name]["error"] = "not built (see benchmarks/build_llama_server.sh)"
                continue
            log(f"--- starting {name} ---")
            wspec, env = worker_spec(name, spec)
            workers[name] = WorkerProc(name, wspec, env)
            hello = workers[name].read(timeout)
            if hello.get("ok"):
                results[name].update({k: v for k, v in hello.items() if k != "ok"})
                log(f"[{name}] loaded in {hello['load_s']:.1f}s, threads {hello['threads']}")
            else:
                results[name]["error"] = hello.get("error", "?")
                log(f"[{name}] failed to start: {results[name]['error']}")
                workers.pop(name).kill()
        live = [n for n in engines if n in workers]
        for rep in range(spec["repeats"]):
            for load in loads:
                for i in range(len(live)):
                    name = live[(i + rep) % len(live)]
                    cell = results[name]["cells"].setdefault(load, {"runs": [], "errors": []})
                    time.sleep(SETTLE_S)
                    run_cell(spec, workers[name], name, load, rep, cell, meter, timeout)
    except BaseException:  # Ctrl-C, SIGTERM, a bug: stop the workers now, not after their work
        for w in workers.values():
            w.stop()
        raise
    for w in workers.values():
        w.close()
    for r in results.values():
        for c in r["cells"].values():
            c["median_tok_s"] = median([x["tok_s"] for x in c["runs"]])
            gov = [x["threads"]["governor"] for x in c["runs"] if x["threads"]["governor"]]
            c["governor_threads"] = median(gov) if gov else None
    return results


def run_cell(
    spec: dict, w: WorkerProc, name: str, load: str, rep: int, cell: dict, meter, timeout: float
) -> None:
    """One decode on one engine under one load pattern; competitors killed whatever happens."""
    n = spec["hf_decode_tokens"] if name == "transformers" else spec["decode_tokens"]
    prompt = make_prompt(spec["prompt_len"], f"{name}-{load}-{rep}")
    with Competitors(load, spec["half_busy_ms"]):
        a = meter.snapshot()  # the competitors are our children: not counted as "others"
        t0 = time.perf_counter()
        out = w.call(timeout, op="decode", prompt=prompt, n=n)
        dt = time.perf_counter() - t0
        others = meter.foreign(a, meter.snapshot())
    if not out.get("ok"):
        cell["errors"].append(out.get("error"))
        log(f"[{name}] {load} rep {rep}: ERROR {out.get('error')}")
        return
    res = out["result"]
    res["others_cpu"] = others
    cell["runs"].append(res)
    log(f"[{name}] {load} rep {rep}: {res['tok_s']:.1f} tok/s ({dt:.1f}s, threads "
        f"{res['threads']}, others {100 * others:.0f}%)")  # fmt: skip


def build_table(results: dict[str, dict], engines: list[str], loads: list[str], spec: dict) -> str:
    labels = {
        "girandole-1": "girandole 1 thread",
        "girandole-2": "girandole 2 threads",
        "girandole-auto": "girandole auto",
        "transformers": f"transformers ({spec['threads']} threads)",
        "llama-server": f"llama-server (-t {spec['threads']})",
    }
    shown = [e for e in ENGINES if e in engines]
    header = ["load"]
    for e in shown:
        header.append(labels[e])
        if e == "girandole-auto":
            header.append("auto threads")
    both = all(e in shown for e in ("girandole-auto", "girandole-2"))
    if both:
        header.append("auto / 2 threads")
    header.append("others")

    def value(e: str, load: str) -> str:
        r = results[e]
        if "error" in r:
            return "not built" if r["error"].startswith("not built") else "error"
        c = r["cells"].get(load)
        if not c or not c["runs"]:
            return "error" if c and c["errors"] else "-"
        return fmt(c["median_tok_s"])

    rows = []
    for load in loads:
        row = [load]
        for e in shown:
            row.append(value(e, load))
            if e == "girandole-auto":
                row.append(fmt(results[e]["cells"].get(load, {}).get("governor_threads"), 0))
        if both:
            auto, two = (
                results[e]["cells"].get(load, {}).get("median_tok_s")
                for e in ("girandole-auto", "girandole-2")
            )
            row.append(ratio(auto, two))
        shares = [
            x["others_cpu"]
            for e in shown
            for x in results[e]["cells"].get(load, {}).get("runs", [])
        ]
        row.append(f"{100 * median(shares):.0f}%" if shares else "-")
        rows.append(row)
    return markdown_table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_peer_options(
        p,
        ENGINES,
        "llama-server is shown as 'not built' without a binary",
        "transformers and llama-server",
    )
    p.add_argument(
        "--loads", default=",".join(LOADS), help="comma-separated subset of " + ",".join(LOADS)
    )
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens per decode (girandole)")
    p.add_argument(
        "--hf-decode-tokens", type=int, default=32, help="tokens per decode (transformers)"
    )
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument(
        "--half-busy-ms", type=float, default=20, help="the half competitor: busy, then asleep"
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per load or decode")
    p.add_argument(
        "--quick", action="store_true", help="1 repeat, 32 decode tokens (16 for transformers)"
    )
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_worker(args.worker, json.loads(args.spec))
    # A SIGTERM (or Ctrl-C) unwinds through the finally blocks: workers and competitors stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.quick:
        args.repeats = 1
        args.decode_tokens = min(args.decode_tokens, 32)
        args.hf_decode_tokens = min(args.hf_decode_tokens, 16)
    engines = [e.strip() for e in (args.engines or ",".join(ENGINES)).split(",") if e.strip()]
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    for x in loads:
        if x not in LOADS:
            raise SystemExit(f"unknown load {x!r}; choose from {', '.join(LOADS)}")
    if args.repeats < 1 or args.decode_tokens < 2 or args.hf_decode_tokens < 2:
        raise SystemExit("--repeats must be at least 1 and decode lengths at least 2")
    from girandole.model.default import default_model_path

    if args.model is None:
        args.model = str(default_model_path())
    if not Path(args.model).is_file():
        raise SystemExit(f"model not found: {args.model}")
    other_vocabulary = args.model != str(default_model_path())
    if other_vocabulary:
        use_model_vocabulary(args.model)
    spec = {
        "model": args.model,
        "other_vocabulary": other_vocabulary,
        "threads": args.threads,
        "repeats": args.repeats,
        "decode_tokens": args.decode_tokens,
        "hf_decode_tokens": args.hf_decode_tokens,
        "prompt_len": args.prompt_len,
        "half_busy_ms": args.half_busy_ms,
        "llama_server_bin": args.llama_server_bin,
        "n_ctx": 1
        << (args.prompt_len + max(args.decode_tokens, args.hf_decode_tokens) + 8).bit_length(),
    }

    header = machine_lines()
    header.append(f"model: {args.model}")
    header.append(
        f"decode: {args.decode_tokens} tokens (transformers {args.hf_decode_tokens}) after a "
        f"{args.prompt_len}-token prompt, greedy; repeats per cell: {args.repeats} (median)"
    )
    load_before = loadavg()
    for line in header:
        log(line)
    log(f"load average before: {load_before}")
    t_start = time.perf_counter()
    with LoadSampler() as sampler:
        results = run_all(spec, engines, loads, args.timeout)
    load_after = loadavg()

    print_run_header(header, load_before, load_after, sampler)
    print(f"total benchmark time: {time.perf_counter() - t_start:.0f}s")
    print()
    print(build_table(results, engines, loads, spec))
    print()
    print("single-stream decode tok/s (first output token to last), median of the repeats;")
    print("'others': median share of the CPUs used by processes outside this benchmark meanwhile.")
    for name in engines:
        r = results[name]
        if "error" in r:
            print(f"- {name}: ERROR {r['error']}")
        else:
            print(f"- {name}: {r['version']}; threads after load {r['threads']}")
        for load, c in r["cells"].items():
            for err in c["errors"]:
                print(f"  - {load}: ERROR {err}")
    print()
    print("all runs, tok/s (threads: governor/torch; others' share of the CPUs):")
    for name in engines:
        for load, c in results[name]["cells"].items():
            runs = ", ".join(
                f"{fmt(x['tok_s'])} ({x['threads']['governor'] or '-'}/"
                f"{x['threads']['torch'] or '-'}; {100 * x['others_cpu']:.0f}%)"
                for x in c["runs"]
            )
            print(f"  {name:14s} {load:7s} {runs}")
    dump_json(
        args.json,
        {"header": header, "load_before": load_before, "load_during": sampler.summary(),
         "load_after": load_after, "spec": spec, "results": results},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
