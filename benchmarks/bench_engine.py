"""Offline engine benchmark: girandole vs llama.cpp vs transformers on the default model.

    .venv/bin/python benchmarks/bench_engine.py            # full run (about 10 minutes, 2 cores)
    .venv/bin/python benchmarks/bench_engine.py --quick    # about 3 minutes
    .venv/bin/python benchmarks/bench_engine.py --engines girandole,llama-server --concurrency 16

Measures, on the same GGUF (Gemma 3 270M Q4_K_M) and the same random token-id prompts:

- single-stream decode tok/s: one request, time from its first output token to its last
  (prefill excluded), over --decode-tokens tokens after a short prompt;
- prefill tok/s: a --prefill-len token prompt with max_tokens=1, prompt length / time to first token;
- total output tok/s with N concurrent requests (--input-len prompt tokens, --output-len output
  tokens each, greedy, ignore_eos): all N submitted at once, total output tokens / wall time.

Engines: girandole (`LLM`), llama.cpp's Python binding (`llama_cpp.Llama`: no batched API, so
its N-request cells run the requests one after another), llama.cpp's own batching server
(`llama-server`, if a binary is found: see build_llama_server.sh) and transformers (fp32, the
GGUF dequantized; slow on CPU, so its larger cells are skipped, --hf-max-concurrency).

Each engine runs in its own worker subprocess (its own memory and threads), all loaded at the
start and idle while another measures; every cell is run on each engine in turn (interleaved, so
drifts in machine load hit them alike), repeated (--repeats; --big-repeats for 64+ requests) and
the median reported. On a shared machine each measurement first waits until other processes use
under --quiet-below of the CPUs, and is rerun with fresh prompts if they took more than
--retry-above while it ran; the share is printed next to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CpuMeter,
    LoadSampler,
    add_peer_options,
    add_quiet_options,
    fmt,
    loadavg,
    log,
    machine_lines,
    make_prompt,
    markdown_table,
    median,
    print_run_header,
    ratio,
    rss_mib,
    use_model_vocabulary,
)

# girandole-b: girandole with other EngineConfig fields (--girandole-b-opt), an A/B in one run
ENGINES = ("girandole", "girandole-b", "llama.cpp", "llama-server", "transformers")


# --------------------------------------------------------------------------------------------
# Engine adapters (run inside the worker subprocess)
# --------------------------------------------------------------------------------------------


class GirandoleEngine:
    name = "girandole"
    sequential = False
    opts_key = "girandole_opts"

    def __init__(self, spec: dict) -> None:
        import torch

        torch.set_num_threads(spec["threads"])
        from girandole import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        self.llm = LLM(model=spec["model"], **spec.get(self.opts_key, {}))
        self.engine = self.llm.engine
        self._n = 0
        cfg = self.engine.config
        self.notes = [
            f"girandole mode={cfg.mode} device={self.engine.device} kv_cache_gb={cfg.kv_cache_gb} "
            f"max_num_seqs={cfg.max_num_seqs} max_num_batched_tokens={cfg.max_num_batched_tokens}"
        ]
        if spec.get(self.opts_key):
            self.notes.append(f"EngineConfig fields {spec[self.opts_key]}")

    @staticmethod
    def version() -> str:
        import torch

        import girandole

        return f"girandole {girandole.__version__} (torch {torch.__version__})"

    def _params(self, max_tokens: int):
        return self.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def _stream(self, prompt: list[int], max_tokens: int) -> tuple[float, list[tuple[float, int]]]:
        """Run one request alone; return its start time and (time, n_new_tokens) per output."""
        self._n += 1
        rid = f"bench-{self._n}"
        events: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        self.engine.add_request(rid, list(prompt), self._params(max_tokens))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id == rid and out.new_token_ids:
                    events.append((time.perf_counter(), len(out.new_token_ids)))
                if out.request_id == rid and out.num_cached_tokens:
                    raise RuntimeError("unexpected prefix-cache hit in the benchmark")
        return t0, events

    def decode(self, prompt: list[int], n_tokens: int) -> dict:
        _, ev = self._stream(prompt, n_tokens)
        n_after_first = sum(n for _, n in ev[1:])
        return {"tok_s": n_after_first / (ev[-1][0] - ev[0][0]), "tokens": n_after_first + ev[0][1]}

    def prefill(self, prompt: list[int]) -> dict:
        t0, ev = self._stream(prompt, 1)
        ttft = ev[0][0] - t0
        return {"tok_s": len(prompt) / ttft, "ttft_s": ttft}

    def batch(self, prompts: list[list[int]], out_len: int) -> dict:
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, self._params(out_len))
        wall = time.perf_counter() - t0
        n = sum(len(o.token_ids) for o in outs)
        if n != len(prompts) * out_len:
            raise RuntimeError(f"expected {len(prompts) * out_len} output tokens, got {n}")
        if any(o.num_cached_tokens for o in outs):
            raise RuntimeError("unexpected prefix-cache hit in the benchmark")
        return {"tok_s": n / wall, "wall_s": wall, "tokens": n}


class LlamaCppEngine:
    name = "llama.cpp"
    sequential = True  # the Python binding serves one sequence at a time

    def __init__(self, spec: dict) -> None:
        from common import gguf_in_huge_pages
        from llama_cpp import Llama

        gguf_in_huge_pages(spec["model"])
        self.llm = Llama(
            model_path=spec["model"],
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            n_ctx=spec["n_ctx"],
            n_batch=512,
            verbose=False,
        )
        self.notes = [
            f"llama.cpp n_threads={spec['threads']} n_ctx={spec['n_ctx']} n_batch=512; "
            "N-request cells run sequentially (the Python binding has no batched API); the GGUF"
            " cached in 2 MiB folios first, as girandole's packed entry (common.gguf_in_huge_pages)"
        ]

    @staticmethod
    def version() -> str:
        import llama_cpp

        return f"llama-cpp-python {llama_cpp.__version__}"

    def _gen(self, prompt: list[int], n_tokens: int) -> tuple[float, list[float]]:
        self.llm.reset()  # no KV reuse between prompts: each one is computed from scratch
        times: list[float] = []
        t0 = time.perf_counter()
        for _tok in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) >= n_tokens:
                break
        return t0, times

    def decode(self, prompt: list[int], n_tokens: int) -> dict:
        _, times = self._gen(prompt, n_tokens)
        return {"tok_s": (len(times) - 1) / (times[-1] - times[0]), "tokens": len(times)}

    def prefill(self, prompt: list[int]) -> dict:
        t0, times = self._gen(prompt, 1)
        ttft = times[0] - t0
        return {"tok_s": len(prompt) / ttft, "ttft_s": ttft}

    def batch(self, prompts: list[list[int]], out_len: int) -> dict:
        t0 = time.perf_counter()
        n = 0
        for p in prompts:
            _, times = self._gen(p, out_len)
            n += len(times)
        wall = time.perf_counter() - t0
        return {"tok_s": n / wall, "wall_s": wall, "tokens": n}


class LlamaServerEngine:
    """llama.cpp's own server (llama-server, --parallel slots, continuous batching), driven with
    non-streaming /completion requests of token ids: llama.cpp's batched numbers."""

    name = "llama-server"
    sequential = False

    def __init__(self, spec: dict) -> None:
        import httpx
        from common import find_llama_server, free_port, gguf_in_huge_pages

        binary = find_llama_server(spec.get("llama_server_bin"))
        if binary is None:
            raise RuntimeError("no llama-server binary (see benchmarks/build_llama_server.sh)")
        gguf_in_huge_pages(spec["model"])
        self.slots = max(spec["concurrency"] or [1])
        per_slot = 64 + max(  # every cell's request fits a slot (the decode cell's long prompt too)
            spec["prefill_len"],
            spec["input_len"] + spec["output_len"],
            spec["decode_prompt_len"] + spec["decode_tokens"],
        )
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        t = str(spec["threads"])
        cmd = [binary, "-m", spec["model"], "--host", "127.0.0.1", "--port", str(port),
               "-t", t, "-tb", t, "-c", str(self.slots * per_slot), "--parallel", str(self.slots),
               "--cont-batching", "--no-webui", "--cache-ram", "0",
               *spec.get("llama_server_args", [])]  # fmt: skip
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        import atexit

        atexit.register(self.stop)
        self.client = httpx.Client(timeout=600)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.proc.returncode}; see {self.log.name}"
                )
            try:
                if self.client.get(self.base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 120:
                raise RuntimeError(f"llama-server not ready; see {self.log.name}")
            time.sleep(0.3)
        self.binary = binary
        self.notes = [
            f"llama-server --parallel {self.slots} -c {self.slots * per_slot} -t {t} --cache-ram 0: non-streaming "
            "/completion requests of token ids, all N at once; decode and prefill from its own "
            "timings (predicted_per_second, prompt_per_second); peak RSS is the server's; the GGUF "
            "cached in 2 MiB folios first, as girandole's packed entry (common.gguf_in_huge_pages)"
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    @staticmethod
    def version() -> str:
        from common import find_llama_server

        text = ""
        try:
            out = subprocess.run(
                [find_llama_server(None) or "llama-server", "--version"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            text = " ".join(x for x in (out.stdout + out.stderr).splitlines() if "version" in x)
        except (OSError, subprocess.SubprocessError):
            pass
        return f"llama-server ({text.strip() or '?'})"

    def _body(self, prompt: list[int], n: int) -> dict:
        return {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1,
                "ignore_eos": True, "cache_prompt": False}  # fmt: skip

    def _one(self, prompt: list[int], n: int) -> dict:
        r = self.client.post(self.base + "/completion", json=self._body(prompt, n))
        r.raise_for_status()
        return r.json()

    def decode(self, prompt: list[int], n_tokens: int) -> dict:
        out = self._one(prompt, n_tokens)
        return {"tok_s": out["timings"]["predicted_per_second"], "tokens": out["tokens_predicted"]}

    def prefill(self, prompt: list[int]) -> dict:
        t0 = time.perf_counter()
        out = self._one(prompt, 1)
        wall = time.perf_counter() - t0
        tm = out["timings"]
        return {"tok_s": tm["prompt_per_second"], "ttft_s": tm["prompt_ms"] / 1000, "wall_s": wall}

    def batch(self, prompts: list[list[int]], out_len: int) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(pool.map(lambda p: self._one(p, out_len), prompts))
        wall = time.perf_counter() - t0
        n = sum(o["tokens_predicted"] for o in outs)
        return {"tok_s": n / wall, "wall_s": wall, "tokens": n}

    def memory(self) -> dict:
        from common import proc_rss_mib

        return proc_rss_mib(self.proc.pid)


class TransformersEngine:
    name = "transformers"
    sequential = False

    def __init__(self, spec: dict) -> None:
        import torch

        torch.set_num_threads(spec["threads"])
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        path = Path(spec["model"])
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
        attn = getattr(self.model.config, "_attn_implementation", "?")
        self.notes = [f"transformers fp32 (GGUF dequantized), attn={attn}, model.generate, greedy"]

    @staticmethod
    def version() -> str:
        import torch
        import transformers

        return f"transformers {transformers.__version__} (torch {torch.__version__})"

    def _generate(self, prompts: list[list[int]], n_tokens: int, streamer=None):
        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.long)  # [batch, len]: equal lengths, no padding
        with torch.inference_mode():
            return self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_tokens,
                min_new_tokens=n_tokens,
                do_sample=False,
                pad_token_id=0,
                streamer=streamer,
            )

    def decode(self, prompt: list[int], n_tokens: int) -> dict:
        class Clock:
            def __init__(self) -> None:
                self.times: list[float] = []
                self.prompt_seen = False

            def put(self, value) -> None:
                if not self.prompt_seen:  # the first put() is the prompt itself
                    self.prompt_seen = True
                    return
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        clock = Clock()
        self._generate([prompt], n_tokens, clock)
        t = clock.times
        return {"tok_s": (len(t) - 1) / (t[-1] - t[0]), "tokens": len(t)}

    def prefill(self, prompt: list[int]) -> dict:
        t0 = time.perf_counter()
        self._generate([prompt], 1)
        ttft = time.perf_counter() - t0
        return {"tok_s": len(prompt) / ttft, "ttft_s": ttft}

    def batch(self, prompts: list[list[int]], out_len: int) -> dict:
        t0 = time.perf_counter()
        out = self._generate(prompts, out_len)
        wall = time.perf_counter() - t0
        n = (out.shape[1] - len(prompts[0])) * out.shape[0]
        return {"tok_s": n / wall, "wall_s": wall, "tokens": int(n)}


class GirandoleBEngine(GirandoleEngine):
    """girandole again, with --girandole-opt and --girandole-b-opt's fields."""

    name = "girandole-b"
    opts_key = "girandole_b_opts"


ADAPTERS = {
    "girandole": GirandoleEngine,
    "girandole-b": GirandoleBEngine,
    "llama.cpp": LlamaCppEngine,
    "llama-server": LlamaServerEngine,
    "transformers": TransformersEngine,
}


def serve_worker(engine_name: str, spec: dict) -> int:
    """Worker process: load one engine, then answer JSON commands, one a line, until "quit".

    The protocol uses this process's original stdout; fd 1 is pointed at stderr so that what the
    libraries print cannot corrupt it.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    cls = ADAPTERS[engine_name]
    try:
        t0 = time.perf_counter()
        eng = cls(spec)
        load_s = time.perf_counter() - t0
        mem = eng.memory() if hasattr(eng, "memory") else rss_mib()
        log(f"[{engine_name}] loaded in {load_s:.1f}s, {mem}")
        # Warm-up: one short request and one small batch (first-call costs out of the way).
        if spec["other_vocabulary"]:
            use_model_vocabulary(spec["model"])
        eng.decode(make_prompt(32, "warmup-decode"), 8)
        eng.batch([make_prompt(64, f"warmup-batch-{i}") for i in range(2)], 4)
        reply({"ok": True, "version": cls.version(), "load_s": load_s, "memory_after_load": mem,
               "notes": list(eng.notes), "sequential": eng.sequential})  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "quit":
                break
            if op == "decode":
                out = eng.decode(cmd["prompt"], cmd["n"])
            elif op == "prefill":
                out = eng.prefill(cmd["prompt"])
            elif op == "batch":
                out = eng.batch(cmd["prompts"], cmd["n"])
            elif op == "memory":
                out = eng.memory() if hasattr(eng, "memory") else rss_mib()
            else:
                raise ValueError(f"unknown op {op!r}")
            reply({"ok": True, "result": out})
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    if hasattr(eng, "stop"):
        eng.stop()
    return 0


class WorkerProc:
    """The driver's handle on one engine's worker subprocess."""

    def __init__(self, name: str, spec: dict) -> None:
        self.name = name
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )

    def _read(self, timeout: float) -> dict:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.kill()
            return {"ok": False, "error": f"timed out after {timeout:.0f}s"}
        line = self.proc.stdout.readline()
        if not line:
            return {"ok": False, "error": f"worker exited with {self.proc.wait()}"}
        return json.loads(line)

    def hello(self, timeout: float) -> dict:
        return self._read(timeout)

    def call(self, timeout: float, **cmd) -> dict:
        if self.proc.poll() is not None:
            return {"ok": False, "error": "worker is not running"}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def make_command(spec: dict, key: str, rep: int, attempt: int = 0) -> dict:
    """The command of one measurement; a retry gets fresh prompts (no prefix-cache hits)."""
    tag = f"{key}-{rep}" + (f"-retry{attempt}" if attempt else "")
    if key == "decode":
        prompt = make_prompt(spec["decode_prompt_len"], f"decode-{tag}")
        return {"op": "decode", "prompt": prompt, "n": spec["decode_tokens"]}
    if key == "prefill":
        return {"op": "prefill", "prompt": make_prompt(spec["prefill_len"], f"prefill-{tag}")}
    n = int(key[5:])
    prompts = [make_prompt(spec["input_len"], f"{tag}-{i}") for i in range(n)]
    return {"op": "batch", "prompts": prompts, "n": spec["output_len"]}


def plan_cells(spec: dict, engines: list[str]) -> list[tuple[str, str, int]]:
    """Every measurement as (engine, cell key, repeat), in run order.

    Interleaved (default): for each cell and repeat, every engine in turn (the order rotating with
    the repeat), so slow drifts in machine load hit all engines alike. Otherwise engine by engine.
    """
    keys = ["decode", "prefill"] + [f"batch{n}" for n in spec["concurrency"]]
    tasks = []
    for key in keys:
        for r in range(spec["repeats"]):
            for i in range(len(engines)):
                tasks.append((engines[(i + r) % len(engines)], key, r))
    if not spec["interleave"]:
        tasks.sort(key=lambda t: engines.index(t[0]))  # stable: keeps the cell order per engine
    return tasks


def skip_reason(spec: dict, name: str, key: str, rep: int, sequential: bool) -> str | None:
    if not key.startswith("batch"):
        return None
    n = int(key[5:])
    max_conc = spec["max_concurrency"].get(name)
    if max_conc is not None and n > max_conc:
        flag = "hf" if name == "transformers" else "llama"
        return f"skipped (> --{flag}-max-concurrency {max_conc})"
    if rep > 0 and n >= spec["big_cell"] and (sequential or name == "transformers"):
        return "once"  # a sequential or very slow engine: one run of a long cell is enough
    if n >= 64 and rep >= spec["big_repeats"]:
        return "once"  # the 64-request cells are long: fewer repeats (--big-repeats)
    return None


def run_measurement(
    spec: dict, w: WorkerProc, name: str, key: str, rep: int, c: dict, meter, timeout: float
) -> None:
    """One measurement: wait for a quiet machine, run, and rerun (fresh prompts) if other work
    took more than --retry-above of the machine meanwhile."""
    for attempt in range(spec["retries"] + 1):
        waited, before = meter.wait_quiet(spec["quiet_below"], spec["max_wait"])
        if waited > 3:
            log(f"  waited {waited:.0f}s for a quiet machine (others at {100 * before:.0f}%)")
        t0 = time.perf_counter()
        a = meter.snapshot()
        out = w.call(timeout, **make_command(spec, key, rep, attempt))
        foreign = meter.foreign(a, meter.snapshot())
        dt = time.perf_counter() - t0
        if not out.get("ok"):
            c.setdefault("errors", []).append(out.get("error"))
            log(f"[{name}] {key} rep {rep}: ERROR {out.get('error')}")
            return
        res = out["result"]
        res["others_cpu"] = foreign
        res["waited_s"] = waited
        log(f"[{name}] {key} rep {rep}: {res['tok_s']:.1f} tok/s ({dt:.1f}s, others used "
            f"{100 * foreign:.0f}% of the CPUs)")  # fmt: skip
        if foreign <= spec["retry_above"] or attempt == spec["retries"]:
            c["runs"].append(res)
            return
        c.setdefault("discarded", []).append(res)
        log(f"  discarded: other work used {100 * foreign:.0f}% of the CPUs; running it again")


def run_all(spec: dict, engines: list[str], timeout: float) -> dict[str, dict]:
    results: dict[str, dict] = {n: {"engine": n, "cells": {}, "skipped": {}} for n in engines}
    workers: dict[str, WorkerProc] = {}
    tasks = plan_cells(spec, engines)
    last_task = {name: i for i, (name, *_rest) in enumerate(tasks)}
    meter = CpuMeter()

    def start(name: str) -> WorkerProc | None:
        if name not in workers:
            log(f"--- starting {name} ---")
            w = WorkerProc(name, spec)
            hello = w.hello(timeout)
            workers[name] = w
            if not hello.get("ok"):
                results[name]["error"] = hello.get("error", "?")
                log(f"[{name}] failed to start: {results[name]['error']}")
            else:
                results[name].update({k: v for k, v in hello.items() if k != "ok"})
        return workers[name] if "error" not in results[name] else None

    try:
        if spec["interleave"]:
            for name in engines:  # load them one at a time, before any measurement
                start(name)
        for i, (name, key, rep) in enumerate(tasks):
            w = start(name)
            if w is not None:
                why = skip_reason(spec, name, key, rep, results[name].get("sequential", False))
                if why and why != "once":
                    results[name]["skipped"][key] = why
                elif why is None:
                    c = results[name]["cells"].setdefault(key, {"runs": []})
                    run_measurement(spec, w, name, key, rep, c, meter, timeout)
            if last_task[name] == i and name in workers:
                if "error" not in results[name]:
                    mem = workers[name].call(60, op="memory")
                    results[name]["memory_end"] = mem.get("result") or {}
                workers[name].close()
    finally:
        for w in workers.values():
            w.kill()

    for r in results.values():
        for key, c in r["cells"].items():
            c["median_tok_s"] = median([x["tok_s"] for x in c["runs"]])
            if key == "prefill":
                c["median_ttft_s"] = median([x["ttft_s"] for x in c["runs"]])
            if key.startswith("batch"):
                c["mode"] = "sequential" if r.get("sequential") else "batched"
    return results


def cell(res: dict, key: str, field: str = "median_tok_s") -> float | None:
    return (res.get("cells", {}).get(key) or {}).get(field)


def build_table(results: dict[str, dict], spec: dict) -> str:
    names = [n for n in ENGINES if n in results]
    header = ["metric", *names]
    peers = [
        n
        for n in ("girandole-b", "llama.cpp", "llama-server")
        if "girandole" in results and n in results
    ]
    header += [f"girandole / {peer}" for peer in peers]

    def row(label: str, key: str, field: str = "median_tok_s", digits: int = 1) -> list[str]:
        cells = []
        for n in names:
            r = results[n]
            if "error" in r:
                cells.append("error")
            elif key in r.get("skipped", {}):
                cells.append("skipped")
            else:
                v = cell(r, key, field)
                seq = (
                    key.startswith("batch") and r["cells"].get(key, {}).get("mode") == "sequential"
                )
                cells.append(fmt(v, digits) + (" (seq.)" if seq and v is not None else ""))
        g = results.get("girandole", {})
        return [
            label,
            *cells,
            *(ratio(cell(g, key, field), cell(results[p], key, field)) for p in peers),
        ]

    rows = [
        row(f"single-stream decode, tok/s ({spec['decode_tokens']} tokens)", "decode"),
        row(f"prefill {spec['prefill_len']} tokens, tok/s", "prefill"),
        row(f"prefill {spec['prefill_len']} tokens, TTFT s", "prefill", "median_ttft_s", 2),
    ]
    for n in spec["concurrency"]:
        label = f"{n} concurrent ({spec['input_len']} in / {spec['output_len']} out), output tok/s"
        rows.append(row(label, f"batch{n}"))

    def stat(r: dict, what: str) -> float | None:
        if what == "mem":
            return (r.get("memory_end") or {}).get("peak_rss_mib")
        return r.get("load_s")

    for label, what, digits in (("peak RSS, MiB", "mem", 0), ("load time, s", "load", 1)):
        out = [label]
        for n in names:
            out.append("error" if "error" in results[n] else fmt(stat(results[n], what), digits))
        g = results.get("girandole", {})
        out += [ratio(stat(g, what), stat(results[p], what)) for p in peers]
        rows.append(out)
    return markdown_table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_peer_options(
        p,
        ENGINES,
        "llama-server only if a binary is found, see benchmarks/build_llama_server.sh",
        "every engine",
    )
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-prompt-len", type=int, default=16)
    p.add_argument(
        "--llama-server-args",
        default="",
        help="more llama-server options, e.g. '-fa off' (its flash attention, on by default on "
        "CPU, decodes a 4,096-token context at half the rate of its plain attention)",
    )
    p.add_argument(
        "--hf-max-concurrency", type=int, default=4, help="skip larger transformers cells"
    )
    p.add_argument(
        "--llama-max-concurrency",
        type=int,
        default=16,
        help="skip larger cells of the llama.cpp binding (it serves requests one after another, "
        "so its rate is flat in N; llama-server has the batched numbers)",
    )
    p.add_argument(
        "--big-repeats", type=int, default=2, help="repeats of the cells with 64+ requests"
    )
    p.add_argument(
        "--big-cell", type=int, default=16, help="llama.cpp/transformers cells this big run once"
    )
    p.add_argument("--kv-cache-gb", type=float, default=None, help="girandole's KV cache size")
    p.add_argument(
        "--girandole-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra EngineConfig field for girandole, e.g. max_num_batched_tokens=1024",
    )
    p.add_argument(
        "--girandole-b-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run girandole a second time as engine girandole-b with this EngineConfig field"
        " too (after --girandole-opt's), measured in turn with the others: an A/B in one run,"
        " e.g. int8_prompts=true",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per load or measurement")
    add_quiet_options(p, "measurement", retries=2)
    p.add_argument(
        "--one-engine-at-a-time",
        action="store_true",
        help="run all cells of one engine, stop it, then the next (default: all engines loaded "
        "at once and every cell run on each in turn, so load drifts hit them alike)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 repeat, concurrency 1,4,16, 64 decode tokens, llama.cpp up to 16, transformers up to 1",
    )
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _fields(pairs: list[str]) -> dict:
    """EngineConfig fields from KEY=VALUE options, their values read by _value."""
    return {k: _value(v) for k, v in (kv.split("=", 1) for kv in pairs)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_worker(args.worker, json.loads(args.spec))

    if args.quick:
        args.repeats = min(args.repeats, 1)
        if args.concurrency == "1,4,16,64":
            args.concurrency = "1,4,16"
        args.decode_tokens = min(args.decode_tokens, 64)
        args.llama_max_concurrency = min(args.llama_max_concurrency, 16)
        args.hf_max_concurrency = min(args.hf_max_concurrency, 1)

    from common import find_llama_server

    if args.engines is None:
        have_server = find_llama_server(args.llama_server_bin) is not None
        engines = [
            e for e in ENGINES if (e != "llama-server" or have_server) and e != "girandole-b"
        ]
    else:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    from girandole.model.default import default_model_path

    if args.model is None:
        args.model = str(default_model_path())
    other_vocabulary = args.model != str(default_model_path())
    if other_vocabulary:
        use_model_vocabulary(args.model)
    concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    girandole_opts = _fields(args.girandole_opt)
    if args.kv_cache_gb is not None:
        girandole_opts["kv_cache_gb"] = args.kv_cache_gb
    b_opts = _fields(args.girandole_b_opt)
    if b_opts and "girandole-b" not in engines:
        engines.insert(
            engines.index("girandole") + 1 if "girandole" in engines else 0, "girandole-b"
        )
    need_ctx = max(
        args.prefill_len + 8,
        args.input_len + args.output_len + 8,
        args.decode_prompt_len + args.decode_tokens + 8,
    )
    spec = {
        "model": args.model,
        "other_vocabulary": other_vocabulary,
        "threads": args.threads,
        "repeats": args.repeats,
        "concurrency": concurrency,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "prefill_len": args.prefill_len,
        "decode_tokens": args.decode_tokens,
        "decode_prompt_len": args.decode_prompt_len,
        "big_cell": args.big_cell,
        "big_repeats": args.big_repeats,
        "max_concurrency": {
            "transformers": args.hf_max_concurrency,
            "llama.cpp": args.llama_max_concurrency,
        },
        "n_ctx": 1 << (need_ctx - 1).bit_length(),
        "girandole_opts": girandole_opts,
        "girandole_b_opts": {**girandole_opts, **b_opts},
        "llama_server_bin": args.llama_server_bin,
        "llama_server_args": shlex.split(args.llama_server_args),
        "interleave": not args.one_engine_at_a_time,
        "quiet_below": args.quiet_below,
        "max_wait": args.max_wait,
        "retry_above": args.retry_above,
        "retries": args.retries,
    }

    header = machine_lines()
    header.append(f"model: {args.model}")
    header.append(f"threads: {args.threads}; repeats per cell: {args.repeats} (median reported)")
    if args.llama_server_args:
        header.append(f"llama-server options: {args.llama_server_args}")
    load_before = loadavg()
    for line in header:
        log(line)
    log(f"load average before: {load_before}")

    t_start = time.perf_counter()
    with LoadSampler() as sampler:
        results = run_all(spec, engines, args.timeout)
    load_after = loadavg()

    print_run_header(header, load_before, load_after, sampler)
    shares = [
        x.get("others_cpu", 0)
        for r in results.values()
        for c in r.get("cells", {}).values()
        for x in c["runs"]
    ]
    reruns = sum(
        len(c.get("discarded", [])) for r in results.values() for c in r.get("cells", {}).values()
    )
    if shares:
        print(
            f"other processes' share of the CPUs during the kept measurements: median "
            f"{100 * median(shares):.0f}%, max {100 * max(shares):.0f}%; {reruns} measurements "
            f"rerun because others used over {100 * spec['retry_above']:.0f}%"
        )
    print(f"total benchmark time: {time.perf_counter() - t_start:.0f}s")
    print()
    print(build_table(results, spec))
    print()
    for name in engines:
        r = results[name]
        if "error" in r:
            print(f"- {name}: ERROR {r['error']}")
            continue
        print(f"- {r['version']}; " + "; ".join(r.get("notes", [])))
        for key, why in r.get("skipped", {}).items():
            print(f"  - {key}: {why}")
        for key, c in r.get("cells", {}).items():
            for err in c.get("errors", []):
                print(f"  - {key}: ERROR {err}")
    print("- (seq.): the engine served the N requests one after another (no batching);")
    print("  decode excludes prefill (first token to last); prefill = prompt tokens / TTFT;")
    print("  concurrent cells: total output tokens / wall time, prefill included.")
    print()
    print("all runs, tok/s (share of the CPUs used by other processes meanwhile):")
    for name in engines:
        r = results[name]
        for key, c in r.get("cells", {}).items():
            runs = ", ".join(
                f"{fmt(x['tok_s'])} ({100 * x.get('others_cpu', 0):.0f}%)" for x in c["runs"]
            )
            dropped = len(c.get("discarded", []))
            print(f"  {name:12s} {key:8s} {runs}" + (f"; {dropped} rerun" if dropped else ""))
    from common import dump_json

    dump_json(
        args.json,
        {
            "header": header,
            "load_before": load_before,
            "load_during": sampler.summary(),
            "load_after": load_after,
            "spec": spec,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
