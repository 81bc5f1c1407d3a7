"""Helpers shared by the benchmark scripts: workloads, machine facts, statistics, tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BOS_ID = 2  # Gemma's <bos>; every prompt starts with it, as the tokenizer would add it
# Random prompt tokens come from this range: ordinary vocabulary pieces, no special tokens.
TOKEN_RANGE = (1000, 200_000)


def make_prompt(n_tokens: int, key: str) -> list[int]:
    """A random prompt of exactly n_tokens ids (BOS first), the same for every engine.

    Each call site passes its own key (cell, repeat, request index), so no two prompts share a
    prefix beyond BOS: prefix caches get no hits and every engine computes the whole prompt.
    """
    rng = random.Random(key)
    return [BOS_ID] + [rng.randrange(*TOKEN_RANGE) for _ in range(n_tokens - 1)]


def use_model_vocabulary(gguf_path: str) -> None:
    """Draw make_prompt's ids from another GGUF's vocabulary (its BOS, and ids below its size)
    instead of Gemma's: for benchmarks of other models (`--model`)."""
    global BOS_ID, TOKEN_RANGE
    from girandole.model.loader.gguf_file import open_gguf

    fields = open_gguf(gguf_path).fields
    size = len(fields["tokenizer.ggml.tokens"].contents())
    bos = fields.get("tokenizer.ggml.bos_token_id")
    BOS_ID = int(bos.contents()) if bos is not None else BOS_ID
    TOKEN_RANGE = (min(TOKEN_RANGE[0], size // 4), min(TOKEN_RANGE[1], size))


def make_text_prompt(n_tokens: int, key: str) -> str:
    """A random text of about n_tokens Gemma tokens (common English words, one token each mostly).

    Servers take text; one common word is about one token, so the count is close, not exact.
    """
    rng = random.Random(key)
    return " ".join(rng.choice(_WORDS) for _ in range(n_tokens))


_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this "
    "be or has had not but first one their its new after who they have two been also other more "
    "time all year city when there some into most only over state world school during three "
    "under between about while many where later made these both such than during water house "
    "river music game team party film life early north south east west member second small "
    "great old long high large work name part place group number people system family war "
    "season public general court area day line power village church land book story series"
).split()


def cpu_ms(fn, reps: int = 5) -> float:
    """Median process CPU milliseconds of `fn()` over `reps` calls, after one warm-up call (the
    native library built, the pages touched): other jobs sharing the host do not inflate it."""
    fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets the CPU kernels (and llama.cpp's) choose between, as /proc/cpuinfo names
# them: a table per machine kind in docs/benchmarks.md is keyed by these.
ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def native_build() -> str:
    """Which build of girandole's native CPU kernels runs here (model/kernels/loader.py)."""
    try:
        from girandole.model.kernels import loader
    except ImportError:
        return "?"
    if loader.library() is None:
        return "none (torch's kernels)"
    return f"{loader.isa()}" + (" + AMX" if loader.amx() else "")


def cpu_isa() -> str:
    """The CPU's vector and matrix extensions among ISA_FLAGS, and its vendor."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    flags: set[str] = set()
    vendor = "?"
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
        elif line.startswith("vendor_id"):
            vendor = line.split(":", 1)[1].strip()
        if flags and vendor != "?":
            break
    return f"{vendor}; " + (" ".join(f for f in ISA_FLAGS if f in flags) or "no AVX2")


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine_lines() -> list[str]:
    mem = mem_total_gib()
    return [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs"
        + (f", {mem:.0f} GiB RAM" if mem else "")
        + f", {platform.system()} {platform.release()}",
        f"isa: {cpu_isa()}; girandole's native kernels: {native_build()}",
        f"python {platform.python_version()}, girandole commit {git_commit()}",
    ]


def rss_mib() -> dict[str, float]:
    """Current and peak resident memory of this process, MiB (from /proc/self/status)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        import resource

        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def proc_rss_mib(pid: int) -> dict[str, float]:
    """Current and peak resident memory of another process, MiB."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def start_girandole(key: str, prefix: str, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    """`girandole serve` of this checkout on a free port, with API key `key`, a data folder of
    its own (a temporary one named `prefix`..., its log in server.log there) and `flags`, once
    /health answers 200 (at most 10 minutes). Returns the process, its URL and the folder."""
    import tempfile

    import httpx

    port = free_port()
    data = Path(tempfile.mkdtemp(prefix=prefix))
    cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(port), "--api-key", key,
           "--data-dir", str(data), *flags]  # fmt: skip
    with open(data / "server.log", "wb") as log:  # the child keeps its own copy of the handle
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1]
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {data / 'server.log'}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url, data
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server not ready in 600 s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def dump_json(path: str | None, data: object) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2))


def gguf_in_huge_pages(path: str) -> None:
    """Cache a peer's GGUF file as girandole's loader caches its packed entry (model/loader/
    page_cache.py): dropped from the page cache, then read back in 2 MiB folios, so that
    llama.cpp's mapping of it takes 2 MiB pages too and neither side pays 4 KiB pages for the
    other's (a file written by pip or shaped_gguf.py stays cached in small folios)."""
    from girandole.model.loader import page_cache

    page_cache.drop(Path(path))
    page_cache.read_huge(Path(path))


def find_llama_server(explicit: str | None) -> str | None:
    for cand in (
        explicit,
        os.environ.get("LLAMA_SERVER_BIN"),
        str(Path(sys.executable).with_name("llama-server")),
    ):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return shutil.which("llama-server")


class LoadSampler:
    """Samples the 1-minute load average and the machine's busy CPU fraction in the background.

    The benchmarks themselves keep about `threads` cores busy; anything above that is other work
    sharing the machine (and makes every number here slower and noisier).
    """

    def __init__(self, interval: float = 5.0) -> None:
        import threading

        self.interval = interval
        self.loads: list[float] = []
        self.busy: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def _run(self) -> None:
        try:
            prev = self._cpu_times()
        except OSError:
            prev = None
        while not self._stop.wait(self.interval):
            self.loads.append(os.getloadavg()[0])
            if prev is not None:
                cur = self._cpu_times()
                total, idle = cur[0] - prev[0], cur[1] - prev[1]
                if total > 0:
                    self.busy.append(1 - idle / total)
                prev = cur

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def summary(self) -> str:
        if not self.loads:
            return "load not sampled"
        s = (
            f"1-min load average during the run: mean {statistics.mean(self.loads):.1f}, "
            f"max {max(self.loads):.1f} ({os.cpu_count()} CPUs)"
        )
        if self.busy:
            s += f"; CPUs busy {100 * statistics.mean(self.busy):.0f}% on average"
        return s


def _jiffies(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class CpuMeter:
    """How much of the machine's CPU *other* work used over an interval.

    Other work = all busy CPU time (/proc/stat) minus the time of this process and its
    descendants (the engine workers, the servers under test). As a fraction of the whole machine
    (1.0 = every core busy with others' work). Linux only; elsewhere it reports 0.
    """

    def __init__(self, root: int | None = None) -> None:
        self.root = root or os.getpid()
        self.ok = Path("/proc/stat").exists()

    def snapshot(self) -> tuple[int, int, dict[int, int]]:
        if not self.ok:
            return 0, 0, {}
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        ours = {pid: _jiffies(pid) for pid in _descendants(self.root)}
        return sum(fields[:8]), idle, ours

    @staticmethod
    def foreign(a: tuple[int, int, dict[int, int]], b: tuple[int, int, dict[int, int]]) -> float:
        total = b[0] - a[0]
        if total <= 0:
            return 0.0
        busy = total - (b[1] - a[1])
        # Our processes' time over the interval: processes alive at both ends, plus new ones.
        ours = sum(j - a[2].get(pid, 0) for pid, j in b[2].items())
        return max(0.0, min(1.0, (busy - ours) / total))

    def measure(self, seconds: float) -> float:
        a = self.snapshot()
        time.sleep(seconds)
        return self.foreign(a, self.snapshot())

    def wait_quiet(
        self, threshold: float, max_wait: float, window: float = 2.0
    ) -> tuple[float, float]:
        """Wait until others use at most `threshold` of the machine over a `window`-second
        interval (or max_wait passed). Returns (seconds waited, last measured share)."""
        t0 = time.perf_counter()
        if not self.ok or threshold >= 1:
            return 0.0, 0.0
        while True:
            share = self.measure(window)
            waited = time.perf_counter() - t0
            if share <= threshold or waited >= max_wait:
                return waited, share


def add_quiet_options(p: argparse.ArgumentParser, what: str, retries: int) -> None:
    """Options for a shared machine: wait for quiet before each `what`, rerun a disturbed one."""
    p.add_argument(
        "--quiet-below",
        type=float,
        default=0.1,
        help=f"before each {what}, wait until other processes use at most this share of the "
        "CPUs (1 = never wait)",
    )
    p.add_argument("--max-wait", type=float, default=300, help="longest wait for quiet, seconds")
    p.add_argument(
        "--retry-above",
        type=float,
        default=0.25,
        help=f"rerun a {what} (fresh prompts) when other processes used more than this share of "
        "the CPUs while it ran",
    )
    p.add_argument("--retries", type=int, default=retries, help=f"reruns per {what} at most")


def add_peer_options(
    p: argparse.ArgumentParser, engines: list[str], llama_note: str, threads_of: str
) -> None:
    """The options of the scripts that run girandole beside its peers in one process each:
    which engines, the model, llama-server's binary, threads (of `threads_of`), repeats."""
    p.add_argument(
        "--engines",
        default=None,
        help="comma-separated subset of " + ",".join(engines) + f" (default: all; {llama_note})",
    )
    p.add_argument("--model", default=None, help="GGUF path (default: girandole's default model)")
    p.add_argument("--llama-server-bin", default=None, help="path of a llama-server binary")
    p.add_argument("--threads", type=int, default=2, help=f"threads of {threads_of}")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported")


def print_run_header(
    header: list[str], load_before: str, load_after: str, sampler: LoadSampler
) -> None:
    """The report's first lines: the machine and run (`header`), the load around the run and
    what other processes used while it ran."""
    print()
    for line in header:
        print(line)
    print(f"load average (1/5/15 min) before: {load_before}; after: {load_after}")
    print(sampler.summary())
