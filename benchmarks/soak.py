"""Soak test: many concurrent clients against a real `girandole serve`, then check nothing leaked.

64 clients (by default) send a fixed number of requests between them: completions and chat,
streaming and not, random sampling parameters and lengths, and about one in six hangs up on
purpose (at once, after a random delay, or mid-stream after a few events). Afterwards:

- every request that was not aborted completed correctly (200, the right number of choices,
  a finish reason, usage consistent with max_tokens, streams ending in [DONE]);
- the engine is idle and its KV blocks in use are back to zero;
- the server's memory (RSS) after the run is flat against a sample taken after warm-up;
- the usage table holds exactly one row per request sent (aborted ones included).

With `--wide`, half the requests use the rest of the surface as well: logprobs and
top_logprobs, echo (max_tokens 0 included), JSON mode and JSON schemas, tools (auto and
required), and the Messages, Responses and embeddings routes, each answer checked in its own
shape.

It prints a summary ending in `loss = N` (requests lost or wrong); exit status 0 when every
check passes.

    .venv/bin/python benchmarks/soak.py                       # default model, 512 requests
    .venv/bin/python benchmarks/soak.py --requests 2000 --clients 64 --model PATH
    .venv/bin/python benchmarks/soak.py --wide --seed 3           # the wider surface too

With `--ray-replicas N` the server runs on a local Ray cluster (`--ray`) and the requests go to
a deployment of the model with N replicas (`--ray-autoscale`: 1 to 2 by load), in each of
Fireworks' names for it (soak_ray.py). The checks then hold per replica as well: each one idle
with no KV block in use (its /metrics series), each replica process's RSS flat, and once the
server stopped, no process of its Ray cluster left (ps).

    .venv/bin/python benchmarks/soak.py --ray-replicas 2 --requests 300 --clients 16 [--wide]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import soak_ray

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    aborted: int = 0
    wrong: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, data_dir: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(port),
           "--data-dir", str(data_dir), "--log-level", "warning",
           "--max-concurrent-requests", str(args.clients),
           # clients that hung up hold their slot until the server notices: on a slow machine
           # the others may queue a while, which is not a loss
           "--queue-timeout", "1800"]  # fmt: skip
    if args.ray_replicas:
        cmd += soak_ray.server_flags(args)
    if args.model:
        cmd += ["--model", args.model]
    if args.model_id:
        cmd += ["--model-id", args.model_id]
    if args.kv_cache_gb:
        cmd += ["--kv-cache-gb", str(args.kv_cache_gb)]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    log = open(data_dir / "server.log", "wb")
    env = {**os.environ, **(soak_ray.FAST_METRICS if args.ray_autoscale else {})}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready in time")


PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "List three colours:",
    "In 1905, Albert Einstein",
    "The quick brown fox",
    "Translate to French: good morning",
]


def random_body(rng: random.Random, model: str) -> tuple[str, dict]:
    chat = rng.random() < 0.4
    body: dict = {
        "model": model,
        "max_tokens": rng.randint(1, 24),
        "stream": rng.random() < 0.5,
    }
    if rng.random() < 0.7:
        body["temperature"] = round(rng.uniform(0, 1.5), 2)
    if rng.random() < 0.3:
        body["top_p"] = round(rng.uniform(0.1, 1), 2)
    if rng.random() < 0.3:
        body["top_k"] = rng.randint(0, 50)
    if rng.random() < 0.2:
        body["n"] = 2
    if rng.random() < 0.2:
        body["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.15:
        body["stop"] = [rng.choice([".", "\n", " the"])]
    prompt = rng.choice(PROMPTS) * rng.randint(1, 4)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]},
        },
    }
]  # fmt: skip


def wide_body(rng: random.Random, model: str) -> tuple[str, dict]:
    """A request using one more feature of the surface (`--wide`)."""
    prompt = rng.choice(PROMPTS)
    stream = rng.random() < 0.5
    kind = rng.choice(["logprobs", "echo", "json", "schema", "tools", "messages", "responses",
                       "embeddings"])  # fmt: skip
    if kind == "logprobs":
        if rng.random() < 0.5:
            body = {"prompt": prompt, "logprobs": rng.randint(0, 5)}
            path = "/v1/completions"
        else:
            body = {"messages": [{"role": "user", "content": prompt}], "logprobs": True,
                    "top_logprobs": rng.randint(0, 5)}  # fmt: skip
            path = "/v1/chat/completions"
        body |= {"max_tokens": rng.randint(1, 16), "stream": stream, "n": rng.choice([1, 1, 2])}
        return path, {"model": model, **body}
    if kind == "echo":  # scoring, as lm-evaluation-harness does it
        return "/v1/completions", {"model": model, "prompt": prompt, "echo": True, "logprobs": 1,
                                   "max_tokens": rng.choice([0, 1, 4]), "stream": False}  # fmt: skip
    if kind in ("json", "schema", "tools"):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": rng.randint(8, 40), "stream": stream,
                "temperature": rng.choice([0, 0.7])}  # fmt: skip
        if kind == "json":
            body["response_format"] = {"type": "json_object"}
        elif kind == "schema":
            body["response_format"] = {
                "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}
            }  # fmt: skip
        else:
            body |= {"tools": TOOLS, "tool_choice": rng.choice(["auto", "required"])}
        return "/v1/chat/completions", body
    if kind == "messages":
        return "/v1/messages", {"model": model, "max_tokens": rng.randint(1, 24), "stream": stream,
                                "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    if kind == "responses":
        return "/v1/responses", {"model": model, "input": prompt, "store": False,
                                 "max_output_tokens": rng.randint(16, 32), "stream": stream}  # fmt: skip
    return "/v1/embeddings", {"model": model, "input": [prompt] * rng.randint(1, 3)}


def check_wide(path: str, body: dict, payload) -> str | None:
    """What is wrong with a 200 answer of the Messages, Responses or embeddings route, or with
    the extra fields of a completions/chat one (logprobs, echo, JSON, tools); None when right."""
    stream = body.get("stream", False)
    if path == "/v1/embeddings":
        data = payload.get("data", [])
        return None if len(data) == len(body["input"]) else f"{len(data)} embeddings"
    if path == "/v1/messages":
        if stream:
            kinds = [e.get("type") for e in payload if isinstance(e, dict)]
            return None if kinds[-1:] == ["message_stop"] else f"events {kinds[-3:]}"
        ok = payload.get("type") == "message" and payload.get("stop_reason")
        return None if ok else f"message {payload!r:.200}"
    if path == "/v1/responses":
        final = payload[-1] if stream and payload else payload
        if stream:
            if final.get("type") not in ("response.completed", "response.incomplete"):
                return f"last event {final.get('type')}"
            final = final["response"]
        ok = final.get("status") in ("completed", "incomplete") and final.get("usage")
        return None if ok else f"response {final!r:.200}"
    if stream:
        return None
    for choice in payload.get("choices", []):
        if body.get("echo") and not choice["text"].startswith(body["prompt"]):
            return "echo without the prompt"
        if "logprobs" in body and body["logprobs"] not in (None, False):
            if not choice.get("logprobs"):
                return "no logprobs"
        rf = body.get("response_format")
        if rf and choice["finish_reason"] == "stop":
            try:
                value = json.loads(choice["message"]["content"])
            except ValueError:
                return f"not JSON: {choice['message']['content']!r:.100}"
            if rf["type"] == "json_schema" and set(value) != {"name", "age"}:
                return f"schema broken: {value}"
        if body.get("tool_choice") == "required" and not choice["message"].get("tool_calls"):
            return "tool_choice required without a call"
    return None


def check_response(path: str, body: dict, status: int, payload) -> str | None:
    """None when the response is right; else what is wrong."""
    if status != 200:
        return f"status {status}: {str(payload)[:200]}"
    if path not in ("/v1/completions", "/v1/chat/completions"):
        return check_wide(path, body, payload)
    n = body.get("n", 1)
    if body.get("stream", False):
        events = payload
        if not events or events[-1] != "[DONE]":
            return "stream did not end with [DONE]"
        finishes = [
            c for e in events[:-1] if isinstance(e, dict) for c in e.get("choices", [])
            if c.get("finish_reason")
        ]  # fmt: skip
        if len(finishes) != n:
            return f"{len(finishes)} finish reasons for n={n}"
        usage = next((e["usage"] for e in reversed(events[:-1]) if e.get("usage")), None)
    else:
        choices = payload.get("choices", [])
        if len(choices) != n or any(c.get("finish_reason") is None for c in choices):
            return f"choices {choices!r:.200}"
        usage = payload.get("usage")
    if (
        not usage
        or usage["completion_tokens"] > n * body["max_tokens"]
        or usage["prompt_tokens"] < 1
    ):
        return f"usage {usage}"
    return check_wide(path, body, payload)


async def normal_request(client: httpx.AsyncClient, url: str, headers, path, body, tally: Tally):
    """Send one request and check its answer (headers: the key's and the request's own)."""
    try:
        if body.get("stream", False):
            events = []
            async with client.stream("POST", url + path, json=body, headers=headers) as r:
                status = r.status_code
                raw = (await r.aread()).decode()
            if status == 200:
                for block in raw.split("\n\n"):
                    for line in block.split("\n"):
                        if line.startswith("data: "):
                            data = line[6:]
                            events.append(data if data == "[DONE]" else json.loads(data))
            payload = events if status == 200 else raw
        else:
            r = await client.post(url + path, json=body, headers=headers)
            status, payload = r.status_code, (r.json() if r.status_code == 200 else r.text)
    except Exception as exc:  # noqa: BLE001
        tally.wrong.append(f"{path}: {type(exc).__name__}: {exc}")
        return
    problem = check_response(path, body, status, payload)
    if problem:
        tally.wrong.append(f"{path} {json.dumps(body)[:200]}: {problem}")
    else:
        tally.ok += 1


async def aborted_request(
    port: int, key: str, path: str, body: dict, rng: random.Random, extra: dict[str, str]
):
    """Send the whole request on a raw socket, then hang up: at once, after a delay, or (streams)
    after a few events. The server has the request either way, so it must account for it."""
    data = json.dumps(body).encode()
    more = "".join(f"{name}: {value}\r\n" for name, value in extra.items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n{more}"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + data)
        await writer.drain()
        how = rng.random()
        if how < 0.3:
            return "at once"
        if body.get("stream", False) and how < 0.8:
            want = rng.randint(1, 6)
            seen = 0
            try:
                while seen < want:
                    chunk = await asyncio.wait_for(reader.read(4096), 300)
                    if not chunk:
                        break
                    seen += chunk.count(b"\n\n")
            except TimeoutError:
                return "no first event in 300 s"
            return "mid-stream"
        await asyncio.sleep(rng.uniform(0.01, 1.0))
        return "after a delay"
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except Exception:  # noqa: BLE001
            pass


async def run_load(
    args, url: str, port: int, key: str, plan: list, tally: Tally, clients: int | None = None
) -> None:
    next_index = 0
    clients = clients or args.clients
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:

        async def worker(wid: int) -> None:
            nonlocal next_index
            wrng = random.Random(args.seed * 1000 + wid)
            while next_index < len(plan):
                abort, path, body, extra = plan[next_index]
                next_index += 1
                tally.sent += 1
                if abort:
                    how = await aborted_request(port, key, path, body, wrng, extra)
                    tally.aborted += 1
                    tally.by_kind[how] = tally.by_kind.get(how, 0) + 1
                else:
                    await normal_request(client, url, headers | extra, path, body, tally)

        await asyncio.gather(*(worker(i) for i in range(clients)))


def wait_idle(url: str, timeout: float = 60) -> tuple[bool, dict]:
    """Wait until nothing runs and no KV block is in use; (whether it got there, engine stats)."""
    deadline = time.monotonic() + timeout
    while True:
        engine = httpx.get(url + "/health", timeout=10).json()["engine"]
        # on Ray the own model's replicas sum up their stats: none before its first request
        idle = engine.get("num_running", 0) == 0 and engine.get("num_waiting", 0) == 0
        if idle and engine.get("kv_blocks_used", 0) == 0:
            return True, engine
        if time.monotonic() > deadline:
            return False, engine
        time.sleep(0.2)


def run_waves(args, url: str, port: int, key_info: dict, plan: list, tally: Tally) -> int:
    """`--ray-autoscale`: the plan in waves, each a burst of every client (Ray scales the
    deployment up) then one client at a time until Ray took it back to one replica, so that
    replicas start and stop under load; the number of scale-downs seen."""
    downscales, i = 0, 0
    while i < len(plan):
        burst = plan[i : i + 3 * args.clients]
        i += len(burst)
        asyncio.run(run_load(args, url, port, key_info["key"], burst, tally))
        deadline = time.monotonic() + 120
        peak = soak_ray.deployment(url, key_info["key"]).get("replicaCount", 0)
        while peak > 1 and i < len(plan) and time.monotonic() < deadline:
            asyncio.run(run_load(args, url, port, key_info["key"], plan[i : i + 1], tally, 1))
            i += 1
            if soak_ray.deployment(url, key_info["key"]).get("replicaCount") == 1:
                downscales += 1
                break
    return downscales


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--abort-rate", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a .gguf or HF folder; default: the default model")
    p.add_argument("--model-id", default=None)
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--wide", action="store_true", help="half the requests use the wider surface")
    p.add_argument("--rss-slack", type=float, default=0.10, help="allowed RSS growth after warm-up")
    p.add_argument("--ray-replicas", type=int, default=0,
                   help="run on Ray Serve: the requests go to a deployment of N replicas")  # fmt: skip
    p.add_argument("--ray-autoscale", action="store_true",
                   help="with --ray-replicas: the deployment scales between 1 and 2 by load")  # fmt: skip
    args = p.parse_args()
    if args.ray_autoscale and not args.ray_replicas:
        args.ray_replicas = 1
    if args.ray_replicas and args.kv_cache_gb is None:
        args.kv_cache_gb = 0.25  # per replica: several of them share this machine's memory

    data_dir = Path(tempfile.mkdtemp(prefix="girandole-soak-"))
    created = subprocess.run(
        [sys.executable, "-m", "girandole.cli", "keys", "create", "--account", "fireworks",
         "--name", "soak", "--json", "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    key_info = json.loads(created.stdout)
    if args.ray_replicas:
        soak_ray.add_model(ROOT, data_dir, args.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, data_dir, port)
    replicas: dict[str, dict[str, float]] = {}
    replica_rss: dict[str, dict[int, int]] = {}
    ray_procs: list[soak_ray.RayProcess] = []
    replicas_idle = True
    downscales = 0
    started = time.monotonic()
    try:
        wait_ready(url, proc)
        if args.ray_replicas:
            soak_ray.create_deployment(url, key_info["key"], args)
            soak_ray.wait_replicas(
                url, key_info["key"], 1 if args.ray_autoscale else args.ray_replicas
            )
            model = None
        else:
            model = httpx.get(
                url + "/v1/models", headers={"Authorization": f"Bearer {key_info['key']}"}
            ).json()["data"][0]["id"]
        ready_s = time.monotonic() - started
        server = psutil.Process(proc.pid)
        rss: dict[str, float] = {"start": server.memory_info().rss}

        rng = random.Random(args.seed)
        make = random_body
        if args.wide:

            def make(rng: random.Random, model: str) -> tuple[str, dict]:
                return (wide_body if rng.random() < 0.5 else random_body)(rng, model)

        plan = []
        for _ in range(args.requests):
            abort = rng.random() < args.abort_rate
            name, extra = soak_ray.target(rng) if args.ray_replicas else (model, {})
            plan.append((abort, *make(rng, name), extra))
        warm = max(args.clients, args.requests // 4)  # warm-up: then RSS is sampled
        tally = Tally()
        start = time.monotonic()
        asyncio.run(run_load(args, url, port, key_info["key"], plan[:warm], tally))
        wait_idle(url)
        if args.ray_replicas:
            soak_ray.wait_replicas_idle(url, None)
            replica_rss["warm"] = soak_ray.replica_rss()
        rss["warm"] = server.memory_info().rss
        if args.ray_autoscale:
            downscales = run_waves(args, url, port, key_info, plan[warm:], tally)
        else:
            asyncio.run(run_load(args, url, port, key_info["key"], plan[warm:], tally))
        elapsed = time.monotonic() - start
        idle, engine = wait_idle(url)
        if args.ray_replicas:
            expect = None if args.ray_autoscale else args.ray_replicas
            replicas_idle, replicas = soak_ray.wait_replicas_idle(url, expect)
            replica_rss["end"] = soak_ray.replica_rss()
        rss["end"] = server.memory_info().rss
        # usage rows: one per request sent
        deadline = time.monotonic() + 30
        while True:
            with sqlite3.connect(data_dir / "girandole.db") as db:
                rows, aborted_rows = db.execute(
                    "SELECT COUNT(*), SUM(aborted) FROM usage WHERE key_id = ?", (key_info["id"],)
                ).fetchone()
            if rows >= tally.sent or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        metrics = httpx.get(url + "/metrics", timeout=10).text
        if args.ray_replicas:
            ray_procs = soak_ray.ray_processes(server)
    finally:
        proc.terminate()
        code = proc.wait(120)
    left = soak_ray.survivors(ray_procs) if args.ray_replicas else []
    left_ps = soak_ray.ps_ray_lines({p.pid for p in left})

    growth = (rss["end"] - rss.get("warm", rss["start"])) / rss.get("warm", rss["start"])
    checks = {
        "every non-aborted request completed correctly": not tally.wrong,
        "engine idle, KV blocks in use back to 0": idle,
        f"memory flat after warm-up (RSS growth {growth:+.1%} <= {args.rss_slack:.0%})": growth
        <= args.rss_slack,
        f"usage rows ({rows}) == requests sent ({tally.sent})": rows == tally.sent,
        f"server exited 0 on SIGTERM (got {code})": code == 0,
    }
    if args.ray_replicas:
        warm_rss, end_rss = replica_rss.get("warm", {}), replica_rss.get("end", {})
        kept = set(warm_rss) & set(end_rss)  # replicas that ran through (autoscaling: some go)
        worst = max(((end_rss[p] - warm_rss[p]) / warm_rss[p] for p in kept), default=0.0)
        seen = soak_ray.kinds(ray_procs)
        n = f" ({args.ray_replicas})"
        if args.ray_autoscale:
            n = f" (scaled down {downscales} times under load)"
        checks |= {
            f"every replica{n} idle, KV blocks in use back to 0 ({len(replicas)} seen)":
                replicas_idle,
            f"replica memory flat after warm-up (worst RSS growth {worst:+.1%})":
                worst <= args.rss_slack,
            f"no Ray process left after the server stopped ({len(ray_procs)} before:"
            f" {seen}; {len(left)} left)": not left and "raylet" in seen and "gcs_server" in seen,
        }  # fmt: skip
    loss = len(tally.wrong) + abs(rows - tally.sent)
    print(f"soak: {tally.sent} requests from {args.clients} clients in {elapsed:.1f} s"
          f" ({tally.sent / elapsed:.1f} req/s); server ready in {ready_s:.0f} s")  # fmt: skip
    print(f"  completed ok {tally.ok}, aborted on purpose {tally.aborted} {tally.by_kind},"
          f" usage rows {rows} (aborted {aborted_rows})")  # fmt: skip
    print(f"  engine at the end: {engine}")
    print(f"  server RSS: start {rss['start'] / 2**20:.0f} MiB, after warm-up"
          f" {rss.get('warm', 0) / 2**20:.0f} MiB, end {rss['end'] / 2**20:.0f} MiB")  # fmt: skip
    if args.ray_replicas:
        for replica, series in sorted(replicas.items()):
            print(f"  replica {replica}: {series}")
        for pid in sorted(set(replica_rss.get("warm", {})) | set(replica_rss.get("end", {}))):
            before, after = (
                replica_rss.get("warm", {}).get(pid),
                replica_rss.get("end", {}).get(pid),
            )
            mib = lambda b: "-" if b is None else f"{b / 2**20:.0f} MiB"  # noqa: E731
            print(f"  replica process {pid}: RSS after warm-up {mib(before)}, end {mib(after)}")
        for line in left_ps:
            print(f"  left running: {line}")
    ttft = [
        x
        for x in metrics.splitlines()
        if x.startswith("girandole_time_to_first_token_seconds_count")
    ]
    print(f"  {ttft[0] if ttft else ''}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    for w in tally.wrong[:20]:
        print(f"  wrong: {w}")
    print(f"loss = {loss}")
    return 0 if all(checks.values()) and loss == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
