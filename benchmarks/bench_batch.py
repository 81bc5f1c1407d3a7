"""Batch jobs against interactive traffic, on a girandole server (the default model):

1. throughput: the same N short prompts (default 500) run by 16 concurrent streaming clients, then
   as one batch job; output tokens/s of each (the job timed from its creation to COMPLETED).
   Target: the job at >= 0.9x the clients' throughput.
2. interactive latency: the time to first token of a streamed request, one after another, on the
   idle server and while a batch job of N lines runs. Target: <= 2x the idle TTFT.

Every request samples greedily with ignore_eos, so each produces exactly --max-tokens tokens.

    .venv/bin/python benchmarks/bench_batch.py                 # starts its own server
    .venv/bin/python benchmarks/bench_batch.py --url http://127.0.0.1:8000 --api-key KEY \\
        --account fireworks
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid

import httpx
from common import make_text_prompt, markdown_table, median, start_girandole

MODEL = "accounts/fireworks/models/gemma-3-270m"


def body(prompt: str, max_tokens: int, stream: bool) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def prompts(n: int, words: int) -> list[str]:
    return [make_text_prompt(words, f"batch-{i}") for i in range(n)]


class Server:
    def __init__(self, url: str, key: str, account: str) -> None:
        self.url = url
        self.account = account
        self.headers = {"Authorization": f"Bearer {key}"}
        self.http = httpx.Client(base_url=url, headers=self.headers, timeout=120)

    def call(self, method: str, path: str, **kw) -> dict:
        r = self.http.request(method, f"/v1/accounts/{self.account}{path}", **kw)
        if r.status_code >= 400:
            raise SystemExit(f"{method} {path}: HTTP {r.status_code} {r.text}")
        return r.json()

    def create_job(self, texts: list[str], max_tokens: int) -> str:
        """Upload the prompts and create a job; its id (timing starts at creation)."""
        job_id = "bench-" + uuid.uuid4().hex[:10]
        lines = [
            {"custom_id": f"p{i}", "body": body(t, max_tokens, False)} for i, t in enumerate(texts)
        ]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        self.call("POST", "/datasets", json={"datasetId": f"{job_id}-in", "dataset": {}})
        self.call("POST", f"/datasets/{job_id}-in:upload", files={"file": ("in.jsonl", data)})
        self.call(
            "POST",
            "/batchInferenceJobs",
            params={"batchInferenceJobId": job_id},
            json={"model": MODEL, "inputDatasetId": f"{job_id}-in"},
        )
        return job_id

    def job(self, job_id: str) -> dict:
        return self.call("GET", f"/batchInferenceJobs/{job_id}")

    def wait_job(self, job_id: str, done=lambda j: j["state"] == "JOB_STATE_COMPLETED") -> dict:
        while True:
            job = self.job(job_id)
            if job["state"] == "JOB_STATE_FAILED":
                raise SystemExit(f"job failed: {job['status']}")
            if done(job):
                return job
            time.sleep(0.05)


async def stream_one(client: httpx.AsyncClient, url: str, payload: dict) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed completion."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=payload) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - start), tokens


async def concurrent_clients(server: Server, texts: list[str], clients: int, max_tokens: int):
    """Run every prompt through `clients` streaming clients; (seconds, output tokens)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for t in texts:
        queue.put_nowait(t)
    total = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal total
        while not queue.empty():
            text = queue.get_nowait()
            _, tokens = await stream_one(client, server.url, body(text, max_tokens, True))
            total += tokens

    start = time.perf_counter()
    async with httpx.AsyncClient(headers=server.headers, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return time.perf_counter() - start, total


async def ttfts(server: Server, count: int, max_tokens: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(headers=server.headers, timeout=600) as client:
        for i in range(count):
            text = make_text_prompt(24, f"interactive-{i}-{uuid.uuid4().hex}")
            ttft, _ = await stream_one(client, server.url, body(text, max_tokens, True))
            out.append(ttft)
            await asyncio.sleep(0.2)
    return out


def run(server: Server, args: argparse.Namespace) -> int:
    texts = prompts(args.lines, args.prompt_words)
    asyncio.run(concurrent_clients(server, texts[:32], args.clients, 4))  # warm-up

    seconds, tokens = asyncio.run(concurrent_clients(server, texts, args.clients, args.max_tokens))
    clients_tps = tokens / seconds
    print(f"{args.clients} streaming clients: {tokens} tokens in {seconds:.1f} s", flush=True)

    start = time.perf_counter()
    job = server.wait_job(server.create_job(texts, args.max_tokens))
    job_seconds = time.perf_counter() - start
    job_tokens = int(job["jobProgress"]["outputTokens"])
    job_tps = job_tokens / job_seconds
    print(f"batch job: {job_tokens} tokens in {job_seconds:.1f} s", flush=True)

    idle = asyncio.run(ttfts(server, args.ttft_requests, 8))
    job_id = server.create_job(prompts(args.lines, args.prompt_words), args.max_tokens)
    server.wait_job(job_id, lambda j: j["jobProgress"]["totalProcessedRequests"] >= 16)
    during = asyncio.run(ttfts(server, args.ttft_requests, 8))
    still = server.job(job_id)["state"]
    server.call("POST", f"/batchInferenceJobs/{job_id}:cancel")
    idle_ms, during_ms = median(idle) * 1000, median(during) * 1000
    print(f"TTFT idle {idle_ms:.0f} ms, during a job {during_ms:.0f} ms ({still})", flush=True)

    ratio_tps = job_tps / clients_tps
    ratio_ttft = during_ms / idle_ms
    print()
    print(
        markdown_table(
            ["measure", "baseline", "with the batch job", "ratio", "target"],
            [
                [
                    f"output tokens/s, {args.lines} prompts x {args.max_tokens} tokens",
                    f"{clients_tps:.0f} ({args.clients} streaming clients)",
                    f"{job_tps:.0f}",
                    f"{ratio_tps:.2f}x",
                    ">= 0.9x",
                ],
                [
                    "interactive TTFT p50 (ms)",
                    f"{idle_ms:.0f} (idle)",
                    f"{during_ms:.0f}",
                    f"{ratio_ttft:.2f}x",
                    "<= 2x",
                ],
            ],  # fmt: skip
        )
    )
    return 0 if ratio_tps >= 0.9 and ratio_ttft <= 2 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--account", default="fireworks")
    p.add_argument("--lines", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--ttft-requests", type=int, default=15)
    p.add_argument("--batch-max-in-flight", type=int, default=None, help="for the server it starts")
    args = p.parse_args()
    if args.url:
        return run(Server(args.url, args.api_key or "", args.account), args)
    key = "bench-" + uuid.uuid4().hex
    flags = ["--log-level", "warning"]
    if args.batch_max_in_flight:
        flags += ["--batch-max-in-flight", str(args.batch_max_in_flight)]
    proc, url, _ = start_girandole(key, "girandole-bench-batch-", *flags)
    try:
        return run(Server(url, key, args.account), args)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
