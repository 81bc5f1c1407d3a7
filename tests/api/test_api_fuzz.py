"""Fuzzing the HTTP API: schemathesis cases drawn from the server's own OpenAPI document (valid
and invalid bodies for every operation), then hand-written hostile bodies (huge numbers, deep
nesting, invalid UTF-8, wrong types, 10 MB prompts). No case may get a 5xx, and the server must
keep serving. The counts of cases are printed (`pytest -s` shows them).

Runs against the tiny-model open server (context 64, 64 KiB bodies) for the schema cases, and
against the default-model server (16 MiB bodies) for the 10 MB prompts.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_helpers import MODEL  # noqa: E402
from schema_fuzz import fuzz_share  # noqa: E402


def test_schemathesis_cases_get_no_5xx(open_server):
    # drawing the cases (hypothesis, schemathesis) takes the time, not the server: every other
    # operation in a second process, on the other core
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        second = pool.submit(fuzz_share, open_server.url, 1, 2)
        counts, failures, operations = fuzz_share(open_server.url, 0, 2)
        more_counts, more_failures, _ = second.result()
    counts.update(more_counts)
    failures += more_failures
    assert operations >= 6
    total = sum(counts.values())
    print(f"\nschemathesis: {total} cases over {operations} operations")
    for label, n in sorted(counts.items()):
        print(f"  {n:4d}  {label}")
    assert not failures, "\n".join(failures[:20])
    assert httpx.get(open_server.url + "/health").status_code == 200
    assert total >= 200


def _hostile_bodies(model: str) -> list[tuple[str, bytes]]:
    def j(body) -> bytes:
        return json.dumps(body).encode()

    deep = "[" * 100_000 + "]" * 100_000
    cases = [
        ("huge int max_tokens", j({"model": model, "prompt": "a", "max_tokens": 10**400})),
        (
            "huge float temperature",
            b'{"model": "%s", "prompt": "a", "temperature": 1e999}' % model.encode(),
        ),
        ("NaN top_p", b'{"model": "%s", "prompt": "a", "top_p": NaN}' % model.encode()),
        ("negative n", j({"model": model, "prompt": "a", "n": -1})),
        ("huge n", j({"model": model, "prompt": "a", "n": 10**9})),
        ("huge seed", j({"model": model, "prompt": "a", "seed": 2**200})),
        ("huge token id", j({"model": model, "prompt": [2**63], "max_tokens": 1})),
        ("negative token id", j({"model": model, "prompt": [-5], "max_tokens": 1})),
        ("deep nesting prompt", b'{"model": "%s", "prompt": %s}' % (model.encode(), deep.encode())),
        ("deep nesting body", deep.encode()),
        ("deep object", ('{"a":' * 50_000 + "1" + "}" * 50_000).encode()),
        ("invalid utf-8", b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe\xc3"}'),
        ("lone surrogate", b'{"model": "%s", "prompt": "\\ud800x"}' % model.encode()),
        (
            "lone surrogate in a key",
            b'{"model": "%s", "prompt": "a", "metadata": {"\\ud800": "x"}}' % model.encode(),
        ),
        ("nul bytes", j({"model": model, "prompt": "a\x00b"})),
        ("prompt wrong type", j({"model": model, "prompt": {"a": 1}})),
        ("prompt list of mixed", j({"model": model, "prompt": ["a", 1, None]})),
        ("empty prompt list", j({"model": model, "prompt": []})),
        ("model wrong type", j({"model": 5, "prompt": "a"})),
        ("model huge", j({"model": "a" * 100_000, "prompt": "a"})),
        ("stop huge list", j({"model": model, "prompt": "a", "stop": ["x"] * 10_000})),
        (
            "logit_bias huge",
            j({"model": model, "prompt": "a", "logit_bias": {str(i): 1 for i in range(10_000)}}),
        ),
        ("logit_bias bad key", j({"model": model, "prompt": "a", "logit_bias": {"x": 1e308}})),
        ("body is a list", b"[1, 2, 3]"),
        ("body is a string", b'"hello"'),
        ("body is null", b"null"),
        ("empty body", b""),
        ("truncated json", b'{"model": "' + model.encode() + b'", "prompt": "a'),
        ("duplicate keys", b'{"model": "%s", "prompt": "a", "prompt": 5}' % model.encode()),
        ("messages wrong", j({"model": model, "messages": "hi"})),
    ]
    return cases


def _post_all(server, cases, paths=("/v1/completions", "/v1/chat/completions")) -> list[str]:
    failures = []
    for path in paths:
        for name, body in cases:
            r = httpx.post(
                server.url + path, content=body, timeout=120,
                headers={"content-type": "application/json", **server.headers},
            )  # fmt: skip
            if r.status_code >= 500:
                failures.append(f"{path} {name}: {r.status_code} {r.text[:200]}")
    return failures


def test_hostile_bodies_get_no_5xx(open_server):
    cases = _hostile_bodies("accounts/testing/models/tiny-eos")
    failures = _post_all(open_server, cases)
    print(f"\nhostile bodies: {2 * len(cases)} cases")
    assert not failures, "\n".join(failures)
    r = httpx.post(
        open_server.url + "/v1/completions",
        json={"model": "accounts/testing/models/tiny-eos", "prompt": "hi", "max_tokens": 2},
        timeout=120,
    )
    assert r.status_code == 200  # still serving


@pytest.mark.slow
def test_ten_megabyte_prompts_are_refused_quickly(server):
    import time

    prompt = "hello world, this is a prompt. " * (10_000_000 // 31)
    cases = [
        ("10 MB prompt", json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1}).encode()),
        (
            "10 MB prompt list",
            json.dumps({"model": MODEL, "prompt": [prompt[:5_000_000]] * 2}).encode(),
        ),
        (
            "10 MB chat",
            json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
            ).encode(),
        ),
        (
            "10 MB unknown field",
            json.dumps({"model": MODEL, "prompt": "a", "junk": prompt}).encode(),
        ),
        ("20 MB prompt", json.dumps({"model": MODEL, "prompt": prompt * 2}).encode()),
    ]
    start = time.monotonic()
    codes = []
    for path in ("/v1/completions", "/v1/chat/completions"):
        for _name, body in cases:
            r = httpx.post(
                server.url + path, content=body, timeout=120,
                headers={"content-type": "application/json", **server.headers},
            )  # fmt: skip
            codes.append(r.status_code)
    print(f"\n10 MB bodies: {len(codes)} cases in {time.monotonic() - start:.1f} s: {codes}")
    assert all(400 <= c < 500 for c in codes), codes
    assert time.monotonic() - start < 60  # refused before tokenizing (10 MB: ~10 s a prompt)
    ok = httpx.post(
        server.url + "/v1/completions", headers=server.headers,
        json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, timeout=120,
    )  # fmt: skip
    assert ok.status_code == 200
