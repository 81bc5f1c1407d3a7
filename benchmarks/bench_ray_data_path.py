"""What does Ray Serve cost on the token path? 16 SSE streams of 129 small chunks each from a toy
deployment that only sleeps between chunks (no engine), served four ways:

- plain:     one uvicorn process, no Ray (the floor: what serving the chunks costs anyway);
- relay:     Ray Serve's HTTP proxy relays every chunk from the replica (Serve's default path);
- coalesced: the same, the replica yielding the chunks of each COALESCE_MS window as one;
- direct:    Ray Serve places the replica and answers "where" (one relayed call per request),
             the client then streams straight from an HTTP server inside the replica.

For each: CPU seconds used by the serving processes during the run (all of Ray's processes, or
the plain server), as a share of one core over the run's wall time, chunks/s and the time to
first chunk. Also Ray's start-up time and resident memory. The client runs in a process of its
own and is not counted.

Needs `pip install "ray[serve]"`. Usage: python benchmarks/bench_ray_data_path.py [--streams 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import psutil

CHUNK = 'data: {"choices":[{"index":0,"text":" tok"}]}\n\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def sse_chunks(n: int, interval: float, coalesce_ms: float):
    """The toy stream: n chunks `interval` s apart, optionally coalesced per window."""
    buffer, window_start = [], time.monotonic()
    for _ in range(n):
        await asyncio.sleep(interval)
        if coalesce_ms <= 0:
            yield CHUNK
            continue
        buffer.append(CHUNK)
        if (time.monotonic() - window_start) * 1000 >= coalesce_ms:
            yield "".join(buffer)
            buffer, window_start = [], time.monotonic()
    if buffer:
        yield "".join(buffer)
    yield "data: [DONE]\n\n"


def toy_app():
    from fastapi import FastAPI
    from starlette.responses import StreamingResponse

    app = FastAPI()

    @app.get("/stream")
    async def stream(n: int = 129, interval: float = 0.031, coalesce_ms: float = 0.0):
        return StreamingResponse(
            sse_chunks(n, interval, coalesce_ms), media_type="text/event-stream"
        )

    return app


def serve_plain(port: int) -> None:
    import uvicorn

    uvicorn.run(toy_app(), host="127.0.0.1", port=port, log_level="warning")


# -- the client (a process of its own) ----------------------------------------------------------


async def _client(url: str, streams: int, n: int, interval: float, coalesce_ms: float, where: bool):
    import httpx

    async with httpx.AsyncClient(timeout=120) as client:

        async def one() -> tuple[float, int]:
            start = time.monotonic()
            target = url
            if where:  # ask Serve which replica, then stream from it directly
                target = (await client.get(url + "/where")).json()["url"]
            params = {"n": n, "interval": interval, "coalesce_ms": coalesce_ms}
            ttft, chunks = None, 0
            async with client.stream("GET", target + "/stream", params=params) as r:
                async for text in r.aiter_text():
                    if ttft is None:
                        ttft = time.monotonic() - start
                    chunks += text.count("data: ") - text.count("[DONE]")
            return ttft, chunks

        start = time.monotonic()
        results = await asyncio.gather(*(one() for _ in range(streams)))
        wall = time.monotonic() - start
    ttfts = sorted(r[0] for r in results)
    return {
        "wall_s": wall,
        "chunks": sum(r[1] for r in results),
        "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2],
    }


def run_client(url: str, args: argparse.Namespace, coalesce_ms: float, where: bool) -> dict:
    cmd = [
        sys.executable, __file__, "--client", url, "--streams", str(args.streams),
        "--chunks", str(args.chunks), "--interval", str(args.interval),
        "--coalesce-ms", str(coalesce_ms),
    ] + (["--where"] if where else [])  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- CPU accounting -----------------------------------------------------------------------------


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def idle_share(procs: list[psutil.Process], seconds: float = 5.0) -> float:
    """What the processes use doing nothing (Ray's background work), as a share of a core."""
    before = cpu_seconds(procs)
    time.sleep(seconds)
    return (cpu_seconds(procs) - before) / seconds


def measured(
    label: str, procs: list[psutil.Process], url: str, args, coalesce_ms=0.0, where=False, idle=0.0
):
    """The median run of --repeats (by CPU share), net of the processes' idle use."""
    run_client(url, argparse.Namespace(**{**vars(args), "streams": 2}), coalesce_ms, where)  # warm
    runs = []
    for _ in range(args.repeats):
        before = cpu_seconds(procs)
        result = run_client(url, args, coalesce_ms, where)
        used = cpu_seconds(procs) - before
        net = max(0.0, used - idle * result["wall_s"])
        result.update(label=label, cpu_s=used, net_cpu_s=net, core_share=net / result["wall_s"])
        result["chunks_per_s"] = result["chunks"] / result["wall_s"]
        runs.append(result)
    result = sorted(runs, key=lambda r: r["core_share"])[len(runs) // 2]
    result["core_shares"] = [round(r["core_share"], 3) for r in runs]
    print(
        f"{label:<10} {result['chunks']:>6} chunks  {result['chunks_per_s']:7.1f} chunks/s"
        f"  ttft p50 {result['ttft_p50_ms']:6.1f} ms  CPU {result['net_cpu_s']:6.2f} s net"
        f" = {100 * result['core_share']:5.1f} % of a core"
        f" (runs: {', '.join(f'{100 * c:.1f}' for c in result['core_shares'])} %)",
        flush=True,
    )
    return result


def ray_processes() -> list[psutil.Process]:
    """Every process of the Ray session this driver started (its descendants)."""
    return psutil.Process().children(recursive=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=129)
    parser.add_argument("--interval", type=float, default=0.031)
    parser.add_argument("--coalesce-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--where", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        result = asyncio.run(
            _client(
                args.client, args.streams, args.chunks, args.interval, args.coalesce_ms, args.where
            )
        )
        print(json.dumps(result))
        return 0

    print(
        f"{args.streams} streams x {args.chunks} chunks, {1000 * args.interval:.0f} ms apart;"
        f" {os.cpu_count()} CPUs",
        flush=True,
    )
    results = []
    port = free_port()
    plain = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench_ray_data_path as b; b.serve_plain({port})",
        ]
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "plain server did not start"
                time.sleep(0.2)
        results.append(
            measured("plain", [psutil.Process(plain.pid)], f"http://127.0.0.1:{port}", args)
        )
    finally:
        plain.terminate()
        plain.wait(10)

    import ray
    from ray import serve

    start = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    app = toy_app()

    @serve.deployment(max_ongoing_requests=256, num_replicas=1)
    @serve.ingress(app)
    class Toy:
        def __init__(self) -> None:
            import uvicorn

            self.port = free_port()
            server = uvicorn.Server(
                uvicorn.Config(toy_app(), host="127.0.0.1", port=self.port, log_level="warning")
            )
            threading.Thread(target=server.run, daemon=True).start()

        @app.get("/where")
        async def where(self) -> dict:
            return {"url": f"http://127.0.0.1:{self.port}"}

    serve.run(Toy.bind(), route_prefix="/")
    startup = time.monotonic() - start
    procs = ray_processes()
    rss = sum(p.memory_info().rss for p in procs if p.is_running())
    print(
        f"ray: start-up (ray.init + serve.run) {startup:.1f} s; {len(procs)} processes,"
        f" resident {rss / 2**20:.0f} MiB",
        flush=True,
    )
    url = f"http://127.0.0.1:{serve_port}"
    try:
        idle = idle_share(procs)
        print(f"ray idle: {100 * idle:.1f} % of a core (subtracted below)", flush=True)
        results.append(measured("relay", procs, url, args, idle=idle))
        results.append(
            measured("coalesced", procs, url, args, coalesce_ms=args.coalesce_ms, idle=idle)
        )
        results.append(measured("direct", procs, url, args, where=True, idle=idle))
    finally:
        serve.shutdown()
        ray.shutdown()
    print(
        json.dumps(
            {
                "startup_s": startup,
                "ray_rss_mib": rss / 2**20,
                "idle_core_share": idle,
                "runs": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
