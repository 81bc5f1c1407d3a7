"""Event-loop stalls from one huge request: while a streaming completion runs, send one big
request and measure the largest gap between the stream's chunks (and that request's status).

The server runs one event loop for every client: any work a request does on it (reading,
parsing, validating, templating, tokenizing, writing JSON) delays the chunks of every other
stream. Each row is one big request (or a stream of big chunks: listed sampling masks) sent
while a stream (long max_tokens, ignore_eos) is running; "alone" is the stream with nothing else
sent, for the gap a decode step and a noisy machine give anyway.

    .venv/bin/python benchmarks/loop_stall.py                 # starts its own server
    .venv/bin/python benchmarks/loop_stall.py --url http://127.0.0.1:8000 --api-key KEY
    .venv/bin/python benchmarks/loop_stall.py --json-writer   # no server: what one chunk costs

`--json-writer` times, on this process alone, the JSON of one streamed chunk with a listed
sampling mask (`sampling_mask: "non_zero_list"`: the whole 262,144-id vocabulary of the default
model when nothing is masked), which the server writes on its event loop once a token: with
Python's json (the writer before, still the fallback for what orjson refuses) and as the server
writes it now.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable

import httpx
import numpy as np
from common import make_text_prompt, markdown_table, start_girandole

MODEL = "accounts/fireworks/models/gemma-3-270m"
SIXTEEN_MB = 16 * 1024 * 1024


def chat_message(chars: int) -> bytes:
    """One user message of `chars` characters of English words (the probe's 1.9M chars)."""
    text = make_text_prompt(chars // 4, "chat")[:chars]
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return json.dumps(body).encode()


def completions_body(size: int) -> bytes:
    """A completions body just under `size` bytes: many short prompts' worth of JSON (a list
    of token-id lists is what a JSON parser works hardest on per byte)."""
    ids = ",".join(["12345"] * ((size - 200) // 6))
    return f'{{"model": "{MODEL}", "max_tokens": 1, "prompt": [{ids}]}}'.encode()


def completions_lists(size: int) -> bytes:
    """A completions body just under `size` bytes of empty prompts (`[]`): millions of
    containers, which set off the garbage collector while they are parsed."""
    lists = ",".join(["[]"] * ((size - 200) // 3))
    return f'{{"model": "{MODEL}", "max_tokens": 1, "prompt": [{lists}]}}'.encode()


def completions_text(size: int) -> bytes:
    """A completions body just under `size` bytes: one long text prompt."""
    text = make_text_prompt(size // 5, "text")[: size - 200]
    return json.dumps({"model": MODEL, "max_tokens": 1, "prompt": text}).encode()


def masked_stream(n: int, tokens: int) -> bytes:
    """A streaming completion whose every token's chunk lists its sampling mask (the whole
    262,144-id vocabulary: temperature 1, no top-k or top-p), written on the server's loop."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": tokens, "n": n,
            "stream": True, "logprobs": True, "top_logprobs": 5, "sampling_mask": "non_zero_list",
            "temperature": 1.0, "top_k": 0, "top_p": 1.0, "ignore_eos": True}  # fmt: skip
    return json.dumps(body).encode()


CASES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "alone": ("", lambda: b""),
    "chat, 1.9M-char message": ("/v1/chat/completions", lambda: chat_message(1_900_000)),
    "completions, 16 MB of token ids": ("/v1/completions", lambda: completions_body(SIXTEEN_MB)),
    "completions, 16 MB of empty lists": ("/v1/completions", lambda: completions_lists(SIXTEEN_MB)),
    "completions, 16 MB text prompt": ("/v1/completions", lambda: completions_text(SIXTEEN_MB)),
    "stream, listed masks, n 2 x 24 tokens": ("/v1/completions", lambda: masked_stream(2, 24)),
}


VOCAB = 262_144  # the default model's: a token's whole mask when nothing is masked


def masked_chunk(mask: np.ndarray) -> dict:
    """A chat stream's chunk for one token with logprobs, top_logprobs 5 and a listed mask."""
    top = [{"token": f" w{i}", "logprob": -1.25 * i, "token_id": 1000 + i, "bytes": [32, 119, 48 + i]}
           for i in range(5)]  # fmt: skip
    entry = {"token": " the", "logprob": -0.6931, "sampling_logprob": -0.6931,
             "bytes": [32, 116, 104, 101], "token_id": 506, "text_offset": 17, "top_logprobs": top,
             "sampling_mask_count": len(mask), "sampling_mask": mask}  # fmt: skip
    return {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk", "created": 1,
            "model": MODEL, "choices": [{"index": 0, "delta": {"content": " the"},
            "logprobs": {"content": [entry]}, "finish_reason": None}]}  # fmt: skip


def json_event(payload: dict) -> bytes:
    """An SSE event as the server wrote it with Python's json (before orjson)."""
    from girandole.api.http.finite_json import dumps

    text = dumps(payload, ensure_ascii=False, separators=(",", ":"))
    breaks = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
    return b"data: " + text.translate(breaks).encode("utf-8") + b"\n\n"


def median_ms(write: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        write()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000


def json_writer_table(repeats: int) -> str:
    """Median ms of each writer for one masked token's JSON (the same bytes' value)."""
    # imported here: the server runs (other cases) may time another checkout's server
    from girandole.api.http.finite_json import compact_bytes, dumps
    from girandole.api.http.sse import sse_event

    mask = np.arange(VOCAB, dtype=np.int32)
    cases = {
        "the mask alone (`{sampling_mask: [...]}`)": (
            lambda: dumps({"sampling_mask": mask}, ensure_ascii=False, separators=(",", ":")),
            lambda: compact_bytes({"sampling_mask": mask}),
        ),
        "a masked stream's event (sse_event, top 5)": (
            lambda: json_event(masked_chunk(mask)),
            lambda: sse_event(masked_chunk(mask)),
        ),
        "the same event, an empty mask": (
            lambda: json_event(masked_chunk(mask[:0])),
            lambda: sse_event(masked_chunk(mask[:0])),
        ),
    }
    event = masked_chunk(mask)
    assert json.loads(sse_event(event)[6:]) == json.loads(json_event(event)[6:])
    rows = []
    for name, (before, now) in cases.items():
        old, new = median_ms(before, repeats), median_ms(now, repeats)
        rows.append(
            [name, f"{len(now()) / 1e6:.2f}", f"{old:.3f}", f"{new:.3f}", f"{old / new:.0f}x"]
        )
    header = ["one token's JSON", "MB", "json ms (before)", "orjson ms (now)", "faster"]
    return markdown_table(header, rows)


async def stream_gaps(client: httpx.AsyncClient, url: str, headers: dict, started: asyncio.Event,
                      seconds: float) -> list[float]:  # fmt: skip
    """Chunk arrival gaps of one streaming completion, read for `seconds` after its first."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "stream": True,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    gaps: list[tuple[float, float]] = []  # (gap, when it began)
    last = None
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        end = None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            if last is None:
                started.set()
                end = now + seconds
            else:
                gaps.append((now - last, last))
            last = now
            if end is not None and now > end:
                break
    return gaps


async def ping_latencies(url: str, stop: asyncio.Event) -> list[float]:
    """Latencies of GET /health, one every 20 ms until `stop`: how long the server's event loop
    takes to answer anything, apart from how fast the engine makes tokens."""
    out: list[float] = []
    async with httpx.AsyncClient(timeout=300) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            await client.get(url + "/health")
            out.append(time.perf_counter() - t0)
            await asyncio.sleep(0.02)
    return out


async def run_case(url: str, headers: dict, path: str, body: bytes, seconds: float):
    async with httpx.AsyncClient(timeout=300) as client:
        started = asyncio.Event()
        stream = asyncio.create_task(stream_gaps(client, url, headers, started, seconds))
        await started.wait()
        stop = asyncio.Event()
        pings = asyncio.create_task(ping_latencies(url, stop))
        await asyncio.sleep(0.5)
        status, took, message = "-", 0.0, ""
        t0 = time.perf_counter()
        if path:  # sent by curl, another process: this one's loop only reads the stream
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                f.write(body)
                f.flush()
                t0 = time.perf_counter()  # from curl's start: writing the file is this loop's
                proc = await asyncio.create_subprocess_exec(
                    "curl", "-sS", "-X", "POST", url + path, "--data-binary", "@" + f.name,
                    "-H", "Content-Type: application/json",
                    *[x for k, v in headers.items() for x in ("-H", f"{k}: {v}")],
                    "-w", "\n%{http_code}", stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, _ = await proc.communicate()
                took = time.perf_counter() - t0
            text, _, status = out.decode().rpartition("\n")
            if status != "200":
                try:
                    message = json.loads(text)["error"]["message"][:60]
                except (ValueError, KeyError, TypeError):
                    message = text[:60]
        gaps = await stream
        stop.set()
        ping = max(await pings, default=0.0)
    return status, took, message, [(g, at - t0) for g, at in gaps], ping


async def main_async(args: argparse.Namespace, url: str, headers: dict) -> None:
    rows = []
    for name, (path, make) in CASES.items():
        if args.only and args.only not in name:
            continue
        body = make()
        for _ in range(args.repeats):
            status, took, message, gaps, ping = await run_case(
                url, headers, path, body, args.seconds
            )
            gaps.sort()
            p50 = gaps[len(gaps) // 2][0] if gaps else 0.0
            worst, at = gaps[-1] if gaps else (0.0, 0.0)
            ms = [f"{x * 1000:.0f}" for x in (p50, worst)]
            rows.append([name, f"{len(body) / 1e6:.1f}", status, message, f"{took:.2f}", *ms,
                         f"{at:+.2f}", f"{ping * 1000:.0f}"])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
    print()
    header = [
        "big request",
        "MB",
        "status",
        "error",
        "its time s",
        "gap p50 ms",
        "gap max ms",
        "max gap at s",
        "ping max ms",
    ]
    print(markdown_table(header, rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one with the default model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seconds", type=float, default=6.0, help="stream read after its first chunk")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", default=None, help="run the cases whose name contains this")
    p.add_argument("--json-writer", action="store_true",
                   help="only time one masked chunk's JSON, in this process (no server)")  # fmt: skip
    args = p.parse_args()
    if args.json_writer:
        print(json_writer_table(max(args.repeats, 21)))
        return
    proc = None
    key = args.api_key
    if args.url:
        url = args.url.rstrip("/")
    else:
        key = key or "stall-key"
        proc, url, data = start_girandole(key, "girandole-stall-")
        print(f"server log: {data / 'server.log'}")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        asyncio.run(main_async(args, url, headers))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
