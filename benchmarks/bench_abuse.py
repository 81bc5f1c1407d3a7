"""Abuse replay: the hostile patterns of the hardening issue against a running girandole server,
each while a normal client keeps sending a small completion (a server it starts itself holds at
most 1,024 connections, so the idle-socket pattern shows the cap at work). Loopback only,
bounded in count and time; stops by itself.

Per pattern it prints the status codes the abuser saw and the p50 latency of the normal request
sent meanwhile, beside its p50 on the idle server: the target is at most 3x. Beside them: the
server's resident memory before the pattern and its peak during it (a server this script started;
n/a with --url), and the engine's backpressure pauses (/health) before and after it.

    .venv/bin/python benchmarks/bench_abuse.py                 # starts its own server
    .venv/bin/python benchmarks/bench_abuse.py --url http://127.0.0.1:8000 --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable

import httpx
from common import markdown_table, median, proc_rss_mib, start_girandole

MODEL = "accounts/fireworks/models/gemma-3-270m"
NORMAL = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


class Abuser:
    def __init__(self, url: str, key: str | None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.statuses: collections.Counter[str] = collections.Counter()

    async def post_and_hang_up(self, body: dict, after: float, path: str = "/v1/completions"):
        """POST (streaming when asked), hang up `after` seconds in (or at the answer)."""
        async with httpx.AsyncClient(timeout=120) as client:
            try:
                async with asyncio.timeout(after):
                    async with client.stream(
                        "POST", self.url + path, json=body, headers=self.headers
                    ) as r:
                        self.statuses[str(r.status_code)] += 1
                        async for _ in r.aiter_bytes():
                            pass
            except TimeoutError:
                self.statuses["hung up"] += 1
            except httpx.HTTPError as exc:
                self.statuses[type(exc).__name__] += 1

    async def post(self, body: dict | bytes, headers: dict | None = None, check=None) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            try:
                kw = {"json": body} if isinstance(body, dict) else {"content": body}
                r = await client.post(
                    self.url + "/v1/completions", headers={**self.headers, **(headers or {})}, **kw
                )
                self.statuses[str(r.status_code)] += 1
                if check is not None:
                    self.statuses[check(r)] += 1
            except httpx.HTTPError as exc:
                self.statuses[type(exc).__name__] += 1


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def idle_sockets(a: Abuser, count: int, hold: float) -> None:
    socks = []
    for _ in range(count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", _port(a.url)), timeout=5))
        except OSError as exc:
            a.statuses[type(exc).__name__] += 1
    a.statuses[f"{len(socks)} opened"] += 1
    await asyncio.sleep(hold)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    a.statuses[f"{closed} closed by server"] += 1


async def slow_heads(a: Abuser, count: int, hold: float) -> None:
    socks = []
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", _port(a.url)), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        except OSError as exc:
            a.statuses[type(exc).__name__] += 1
    deadline = time.monotonic() + hold
    closed = 0
    while time.monotonic() < deadline and socks:
        await asyncio.sleep(1.0)
        alive = []
        for s in socks:
            try:
                s.sendall(b"X-Drip: 1\r\n")
                alive.append(s)
            except OSError:
                closed += 1
                s.close()
        socks = alive
    for s in socks:
        s.close()
    a.statuses[f"{closed} closed by server"] += 1


async def body_drops(a: Abuser, count: int) -> None:
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", _port(a.url)), timeout=5)
            auth = a.headers.get("Authorization", "")
            head = (
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000000\r\nAuthorization: {auth}\r\n\r\n"
            )
            s.sendall(head.encode() + b'{"prompt": "' + b"a" * 100_000)
            await asyncio.sleep(0.05)
            s.close()
            a.statuses["dropped mid-body"] += 1
        except OSError as exc:
            a.statuses[type(exc).__name__] += 1


UNREAD_STREAM = {
    "model": MODEL,
    "prompt": "Once upon a time",
    "max_tokens": 3500,
    "n": 8,
    "stream": True,
    "logprobs": True,
    "top_logprobs": 5,
    "sampling_mask": "non_zero_list",  # a vocabulary-sized list in every chunk
    "temperature": 1.0,
    "ignore_eos": True,
}


async def engine_stats(a: Abuser) -> dict | None:
    """/health's engine stats (None when it does not answer with them in 10 s)."""
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(a.url + "/health", headers=a.headers)
        return r.json().get("engine")
    except (httpx.HTTPError, ValueError):
        return None


def engine_busy(stats: dict | None) -> int:
    """Requests the engine holds beyond the normal client's one (running ones include paused
    ones, parked ones are in no queue: at least the larger count); an unanswered /health counts
    as busy (1)."""
    if stats is None:
        return 1
    queued = int(stats.get("num_running") or 0) + int(stats.get("num_waiting") or 0)
    paused = int(stats.get("num_paused") or 0)
    return paused if paused else max(0, queued - 1)


async def unread_streams(a: Abuser, count: int, hold: float, settle: float = 60.0) -> None:
    """`count` streams that read nothing for `hold` seconds (a small receive buffer, so the
    server's writes soon wait), then hang up; then wait, at most `settle` seconds, for the
    engine to drop their work, so that none is left behind to slow the next pattern."""
    body = json.dumps(UNREAD_STREAM).encode()
    auth = a.headers.get("Authorization", "")
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nAuthorization: {auth}\r\n\r\n"
    )
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
        try:
            s.settimeout(5)
            s.connect(("127.0.0.1", _port(a.url)))
            s.sendall(head.encode() + body)
            socks.append(s)
        except OSError as exc:
            a.statuses[type(exc).__name__] += 1
            s.close()
    a.statuses[f"{len(socks)} opened"] += 1
    try:
        await asyncio.sleep(hold)
    finally:
        for s in socks:
            # unread data in its buffer: close() sends a reset, not a FIN
            s.close()
        a.statuses[f"{len(socks)} hung up"] += 1
    start = time.monotonic()
    while engine_busy(await engine_stats(a)) and time.monotonic() - start < settle:
        await asyncio.sleep(0.5)
    stats = await engine_stats(a)
    if stats is None:
        a.statuses["/health unanswered"] += 1
    elif left := engine_busy(stats):
        a.statuses[f"{left} requests left after {settle:.0f} s"] += 1
    else:
        a.statuses[f"engine idle {time.monotonic() - start:.0f} s after"] += 1


def header_size(r: httpx.Response) -> str:
    size = sum(len(k) + len(v) for k, v in r.headers.items())
    return f"headers {'<' if size < 8192 else '>='} 8 KiB"


def schema_enum(n: int) -> dict:
    return {"type": "object", "properties": {"v": {"enum": [f"value{i}" for i in range(n)]}}}


def schema_props(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def tools(n: int) -> list[dict]:
    return [
        {"type": "function", "function": {"name": f"f{i}", "parameters": schema_props(3)}}
        for i in range(n)
    ]


def patterns(a: Abuser) -> dict[str, Callable[[], Awaitable[None]]]:
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    return {
        "prompts x n = 2000 x 128, hang up": lambda: a.post_and_hang_up(
            {"model": MODEL, "prompt": ["a"] * 2000, "n": 128, "stream": True}, 3
        ),
        "prompts x n = 200 x 128, hang up at 1 s": lambda: a.post_and_hang_up(
            {"model": MODEL, "prompt": ["a"] * 200, "n": 128, "stream": True}, 1
        ),
        "enum of 100k values, hang up at 5 s": lambda: a.post_and_hang_up(
            {"model": MODEL, "prompt": "x", "response_format": json_format(schema_enum(100_000))},
            5,
        ),
        "5,000 properties, hang up at 5 s": lambda: a.post_and_hang_up(
            {"model": MODEL, "prompt": "x", "response_format": json_format(schema_props(5000))},
            5,
        ),
        "3,000 tools, hang up at 5 s": lambda: a.post_and_hang_up(
            {"model": MODEL, "messages": msgs, "tools": tools(3000)}, 5, chat
        ),
        "two 100k-char strings, hang up at 5 s": lambda: a.post_and_hang_up(
            {
                "model": MODEL,
                "prompt": "x",
                "response_format": json_format(
                    {
                        "type": "object",
                        "properties": {
                            "a": {"const": "a" * 100_000},
                            "b": {"enum": ["b" * 100_000]},
                        },
                    }
                ),
            },  # fmt: skip
            5,
        ),
        "remote $ref": lambda: a.post(
            {
                "model": MODEL,
                "prompt": "x",
                "response_format": json_format({"$ref": "http://127.0.0.1:9/schema.json"}),
            }  # fmt: skip
        ),
        "3,000 idle sockets for 8 s": lambda: idle_sockets(a, 3000, 8),
        "200 slow request heads for 8 s": lambda: slow_heads(a, 200, 8),
        "50 bodies dropped mid-send": lambda: body_drops(a, 50),
        "logit_bias of 8,000 entries": lambda: a.post(
            {
                "model": MODEL,
                "prompt": "x",
                "max_tokens": 1,
                "logit_bias": {str(i): 1 for i in range(8000)},
            },
            check=header_size,  # fmt: skip
        ),
        "text/plain body": lambda: a.post(
            json.dumps(NORMAL).encode(), headers={"Content-Type": "text/plain"}
        ),
        "4 streams never read (n = 8, masks) for 30 s": lambda: unread_streams(a, 4, 30),
    }


async def normal_latencies(url: str, headers: dict, stop: asyncio.Event, least: int) -> list[float]:
    times: list[float] = []
    async with httpx.AsyncClient(timeout=120) as client:
        while not stop.is_set() or len(times) < least:
            start = time.perf_counter()
            r = await client.post(url + "/v1/completions", json=NORMAL, headers=headers)
            if r.status_code == 200:
                times.append(time.perf_counter() - start)
            else:
                times.append(float("inf"))
            await asyncio.sleep(0.05)
    return times


async def peak_rss(pid: int, stop: asyncio.Event) -> float:
    """The server's highest resident memory, MiB, sampled every 0.2 s until `stop`."""
    peak = 0.0
    while True:
        peak = max(peak, proc_rss_mib(pid).get("rss_mib", 0.0))
        if stop.is_set():
            return peak
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass


async def run_pattern(
    a: Abuser, abuse: Callable[[], Awaitable[None]], budget: float, pid: int | None = None
) -> tuple[list[float], str, str]:
    """The normal request's latencies while `abuse` runs, the server's RSS (MiB, before -> peak
    meanwhile) and the engine's backpressure pauses (before -> after)."""
    stop = asyncio.Event()
    pauses_before = ((await engine_stats(a)) or {}).get("num_backpressure_pauses")
    rss_before = proc_rss_mib(pid).get("rss_mib") if pid else None
    rss = asyncio.create_task(peak_rss(pid, stop)) if pid else None
    normal = asyncio.create_task(normal_latencies(a.url, a.headers, stop, least=5))
    try:
        await asyncio.wait_for(abuse(), budget)
    except TimeoutError:
        a.statuses["abuser timed out"] += 1
    stop.set()
    lat = await normal
    pauses_after = ((await engine_stats(a)) or {}).get("num_backpressure_pauses")
    rss_text = "n/a"
    if rss is not None and rss_before is not None:
        peak = await rss
        rss_text = f"{rss_before:.0f} -> {peak:.0f} (+{peak - rss_before:.0f})"
    pauses_text = "n/a" if pauses_before is None else f"{pauses_before} -> {pauses_after}"
    return lat, rss_text, pauses_text


async def main_async(
    args: argparse.Namespace, url: str, key: str | None, pid: int | None = None
) -> int:
    a = Abuser(url, key)
    await run_pattern(a, lambda: asyncio.sleep(0), 1)  # warm-up
    rows, worst, idles = [], 0.0, []
    for name, abuse in patterns(a).items():
        if args.only and args.only not in name:
            continue
        # the idle baseline right before each pattern: a shared machine drifts
        idle_p50 = median((await run_pattern(a, lambda: asyncio.sleep(0), 1))[0])
        idles.append(idle_p50)
        a.statuses = collections.Counter()
        lat, rss, pauses = await run_pattern(a, abuse, args.budget, pid)
        p50 = median(lat)
        ratio = p50 / idle_p50 if p50 and idle_p50 else float("inf")
        worst = max(worst, ratio)
        seen = ", ".join(f"{k}: {v}" for k, v in sorted(a.statuses.items()))
        verdict = "ok" if ratio <= 3 else "SLOW"
        rows.append([name, seen, f"{idle_p50 * 1000:.0f}", f"{p50 * 1000:.0f}", f"{ratio:.2f}x",
                     verdict, rss, pauses])  # fmt: skip
        print(f"{name}: {seen}; normal p50 {p50 * 1000:.0f} ms ({ratio:.2f}x); server RSS MiB "
              f"{rss}; backpressure pauses {pauses}", flush=True)  # fmt: skip
        await asyncio.sleep(1)
    idle_p50 = median(idles)
    print()
    print(
        f"normal request on the idle server: p50 {idle_p50 * 1000:.0f} ms (median of the baselines)"
    )
    header = ["pattern", "abuser saw", "idle p50 ms", "meanwhile p50 ms", "ratio", "",
              "server RSS MiB, before -> peak", "backpressure pauses"]  # fmt: skip
    print(markdown_table(header, rows))
    return 0 if worst <= 3 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one with the default model)")
    p.add_argument("--api-key", default=None)
    # 100: the unread streams hold 30 s, then the server may take tens of seconds to drop them
    p.add_argument("--budget", type=float, default=100.0, help="seconds per pattern at most")
    p.add_argument("--only", default=None, help="run the patterns whose name contains this")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this client holds sockets too
    proc = None
    key = args.api_key
    if args.url:
        url = args.url.rstrip("/")
    else:
        key = key or "abuse-key"
        proc, url, data = start_girandole(key, "girandole-abuse-", "--max-connections", "1024")
        print(f"server log: {data / 'server.log'}")
    try:
        return asyncio.run(main_async(args, url, key, proc.pid if proc is not None else None))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
