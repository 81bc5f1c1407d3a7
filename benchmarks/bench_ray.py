"""The Ray Serve backend's costs and its prefix-aware routing, measured on this machine.

    .venv/bin/python benchmarks/bench_ray.py                 # both parts
    .venv/bin/python benchmarks/bench_ray.py --part routing  # prefix vs round robin only

Part "cost": start-up time (process start to /health 200 with the model served) and resident
memory (the server and every Ray process it started, summed) of `girandole serve` embedded and
`girandole serve --ray` (a local cluster, the default model as one replica), same model.

Part "routing": `girandole serve --ray --ray-replicas-per-node 0` with a deployment of the
default model at two replicas; a workload of 8 shared prefixes (about --prefix-tokens tokens of
random words each) with --per-prefix different short questions each, sent in a shuffled order by
4 concurrent clients, greedy, 8 output tokens. The prompt tokens served from the replicas' prefix
caches (usage.prompt_tokens_details.cached_tokens, summed) under `--ray-router prefix` and
`--ray-router round_robin`, each on a fresh server; the ratio is the issue's figure (>= 1.8x).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import free_port, log, machine_lines  # noqa: E402

WORDS = (
    "river stone lantern orchard copper meadow harbor violet ember thistle canyon willow"
    " falcon marble cedar juniper glacier saffron quartz prairie beacon tundra cobalt"
).split()
ACCOUNT = "fireworks"
MODEL = "accounts/fireworks/models/gemma-3-270m"


def process_rss_mib(root_pid: int) -> float:
    """RSS of a process, its children, and every Ray process of this user, in MiB."""
    import psutil

    seen: set[int] = set()
    total = 0
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if p.info["name"] in ("raylet", "gcs_server") or "ray::" in cmd or "/ray/" in cmd:
            procs.append(p)
    for p in procs:
        if p.pid in seen:
            continue
        seen.add(p.pid)
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / (1 << 20)


class Serve:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = Path(tempfile.mkdtemp(prefix="girandole-bench-ray-"))
        cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(self.port),
               "--log-level", "warning", "--data-dir", str(self.data), *args]  # fmt: skip
        self.log = open(self.data / "server.log", "wb")  # noqa: SIM115
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900) -> float:
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {self.data / 'server.log'}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.perf_counter() - self.t0
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def part_cost() -> list[str]:
    rows = []
    for label, args in (("embedded", []), ("--ray (local cluster)", ["--ray"])):
        server = Serve(*args)
        startup = server.wait_ready()
        httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})  # fmt: skip
        time.sleep(2)
        rss = process_rss_mib(server.proc.pid)
        server.stop()
        rows.append(f"| {label} | {startup:.1f} s | {rss:,.0f} MiB |")
        log(rows[-1])
    return ["| server | start-up to ready | resident memory (all processes) |",
            "|---|---|---|", *rows]  # fmt: skip


def workload(prefix_tokens: int, per_prefix: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(prefix_tokens)) for _ in range(8)]
    prompts = [f"{p}\nQuestion {q}: what comes next?" for p in prefixes for q in range(per_prefix)]
    rng.shuffle(prompts)
    return prompts


async def send_all(url: str, name: str, prompts: list[str]) -> tuple[int, int]:
    queue = list(prompts)
    cached = total = 0

    async def client() -> None:
        nonlocal cached, total
        async with httpx.AsyncClient(timeout=300) as http:
            while queue:
                prompt = queue.pop()
                body = {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0}
                for _ in range(60):
                    r = await http.post(url + "/v1/completions", json=body)
                    if r.status_code != 503:
                        break
                    await asyncio.sleep(1)
                r.raise_for_status()
                usage = r.json()["usage"]
                cached += usage["prompt_tokens_details"]["cached_tokens"]
                total += usage["prompt_tokens"]

    await asyncio.gather(*(client() for _ in range(4)))
    return cached, total


def part_routing(prefix_tokens: int, per_prefix: int, kv_cache_gb: float | None) -> list[str]:
    prompts = workload(prefix_tokens, per_prefix)
    results = {}
    for router in ("prefix", "round_robin"):
        server = Serve(
            "--ray", "--ray-router", router, "--ray-replicas-per-node", "0",
            "--ray-replica-cpus", "0.5",  # three replicas (the own model too) on 2 cores
            *(["--kv-cache-gb", str(kv_cache_gb)] if kv_cache_gb else []),
        )  # fmt: skip
        server.wait_ready()
        r = httpx.post(
            server.url + f"/v1/accounts/{ACCOUNT}/deployments?deploymentId=pair", timeout=60,
            json={"baseModel": MODEL, "minReplicaCount": 2, "maxReplicaCount": 2},
        )  # fmt: skip
        r.raise_for_status()
        name = f"{MODEL}#accounts/{ACCOUNT}/deployments/pair"
        deadline = time.monotonic() + 600
        while True:
            d = httpx.get(server.url + f"/v1/accounts/{ACCOUNT}/deployments/pair").json()
            if d["replicaCount"] == 2:
                break
            assert time.monotonic() < deadline, d
            time.sleep(1)
        t0 = time.perf_counter()
        cached, total = asyncio.run(send_all(server.url, name, prompts))
        seconds = time.perf_counter() - t0
        server.stop()
        results[router] = (cached, total, seconds)
        log(f"{router}: cached {cached:,} of {total:,} prompt tokens in {seconds:.1f} s")
    rows = [
        "| router | cached prompt tokens | of all prompt tokens | wall time |",
        "|---|---|---|---|",
    ]
    for router, (cached, total, seconds) in results.items():
        rows.append(f"| {router} | {cached:,} | {cached / total:.0%} | {seconds:.1f} s |")
    ratio = results["prefix"][0] / max(1, results["round_robin"][0])
    rows.append(f"\nprefix-aware / round robin, cached prompt tokens: **{ratio:.2f}x**")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", choices=["cost", "routing", "all"], default="all")
    p.add_argument("--prefix-tokens", type=int, default=200, help="words in each shared prefix")
    p.add_argument("--per-prefix", type=int, default=6, help="questions per prefix")
    p.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="each replica's KV cache: small enough that one replica cannot hold every prefix"
        " is where routing matters most",
    )
    args = p.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    out = machine_lines()
    if args.part in ("cost", "all"):
        out += ["", "## Cost of the Ray path", "", *part_cost()]
    if args.part in ("routing", "all"):
        out += ["", f"## Prefix-aware routing, 8 prefixes x {args.per_prefix} over 2 replicas", "",
                *part_routing(args.prefix_tokens, args.per_prefix, args.kv_cache_gb)]  # fmt: skip
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
