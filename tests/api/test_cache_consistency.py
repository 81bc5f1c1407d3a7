"""The prefix cache changes nothing a client can see but `cached_tokens`: a prompt served from
cached blocks (whole, in part, or not at all) gives the same tokens and logprobs as one computed
cold (`prompt_cache_max_len: 0`), and echoed prompt logprobs (scoring, as lm-eval does it) are
never read from cached blocks, whose positions have no logits."""

from __future__ import annotations

import uuid

import pytest
from api_helpers import post

# Longer than a few 16-token blocks, so that a repeat is mostly a cache hit.
PREFIX = "The quick brown fox jumps over the lazy dog. " * 8


def completion(server, body: dict) -> dict:
    r = post(server, body)
    assert r.status_code == 200, r.text
    return r.json()


def cached_tokens(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def generated(body: dict) -> tuple[str, list[int], list[float]]:
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    return choice["text"], [e["token_id"] for e in entries], [e["logprob"] for e in entries]


def scores(logprobs: dict) -> tuple[list[int], list[float | None]]:
    """Token ids and logprobs of either logprobs format."""
    if "content" in logprobs:
        return [e["token_id"] for e in logprobs["content"]], [
            e["logprob"] for e in logprobs["content"]
        ]
    return logprobs["token_ids"], logprobs["token_logprobs"]


def test_a_cache_hit_whole_or_partial_generates_what_a_cold_run_does(server):
    prompt = f"[{uuid.uuid4().hex[:8]}] {PREFIX}"
    greedy = {"max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    cold = completion(server, {"prompt": prompt, **greedy, "prompt_cache_max_len": 0})
    hit = completion(server, {"prompt": prompt, **greedy})
    assert cached_tokens(cold) == 0 and cached_tokens(hit) >= 64
    assert generated(hit)[:2] == generated(cold)[:2]
    assert generated(hit)[2] == pytest.approx(generated(cold)[2], abs=1e-5)
    # a longer prompt: its first blocks are cached, the rest computed
    longer = {"prompt": prompt + " And then the cat", **greedy}
    partial = completion(server, longer)
    partial_cold = completion(server, {**longer, "prompt_cache_max_len": 0})
    assert 64 <= cached_tokens(partial) < partial["usage"]["prompt_tokens"]
    assert cached_tokens(partial_cold) == 0
    assert generated(partial)[:2] == generated(partial_cold)[:2]
    assert generated(partial)[2] == pytest.approx(generated(partial_cold)[2], abs=1e-5)
    # a seeded sampled request too: the hit draws the same tokens
    sampled = {"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 77}
    assert (
        completion(server, sampled)["choices"][0]["text"]
        == completion(server, {**sampled, "prompt_cache_max_len": 0})["choices"][0]["text"]
    )


# each logprobs format once, one scoring only (max_tokens 0), one generating after the echo
@pytest.mark.parametrize(("logprobs", "max_tokens"), [(1, 0), (True, 2)])
def test_echoed_prompt_logprobs_on_a_cached_prompt_equal_a_cold_run(server, logprobs, max_tokens):
    prompt = f"[{uuid.uuid4().hex[:8]}] {PREFIX}"
    warm = completion(server, {"prompt": prompt, "max_tokens": 1})  # caches the prompt's blocks
    assert cached_tokens(completion(server, {"prompt": prompt, "max_tokens": 1})) >= 64
    body = {"prompt": prompt, "echo": True, "logprobs": logprobs, "max_tokens": max_tokens,
            "temperature": 0}  # fmt: skip
    scored = completion(server, body)
    cold = completion(server, {**body, "prompt_cache_max_len": 0})
    # every prompt position was computed (no cached block has logits), and is reported so
    assert cached_tokens(scored) == 0
    n_prompt = warm["usage"]["prompt_tokens"]
    lp, lp_cold = scored["choices"][0]["logprobs"], cold["choices"][0]["logprobs"]
    ids, values = scores(lp)
    assert (ids, values[0]) == (scores(lp_cold)[0], scores(lp_cold)[1][0])
    assert len(values) == n_prompt + max_tokens
    if logprobs is True:
        assert values[0] == 0.0  # no context: a number, as Fireworks' schema requires
    else:
        assert values[0] is None and lp["top_logprobs"][0] is None  # OpenAI's convention
    assert values[1:] == pytest.approx(scores(lp_cold)[1][1:], abs=1e-5)
    assert all(v < 0 for v in values[1:n_prompt])


@pytest.mark.parametrize("logprobs", [1, True])
def test_echo_last_scores_its_tokens_on_a_cached_prefix(server, logprobs):
    """`echo_last: N` scores only the prompt's last N tokens: the positions before them come
    from the prefix cache (they were all computed, and all went through the LM head, before),
    and the scores equal a cold whole-prompt echo's last N."""
    prompt = f"[{uuid.uuid4().hex[:8]}] {PREFIX}"
    completion(server, {"prompt": prompt, "max_tokens": 1})  # caches the prompt's blocks
    body = {"prompt": prompt, "echo_last": 5, "logprobs": logprobs, "max_tokens": 0}
    scored = completion(server, body)
    whole = completion(server, {**body, "echo_last": None, "echo": True,
                                "prompt_cache_max_len": 0})  # fmt: skip
    assert cached_tokens(scored) >= 64 and cached_tokens(whole) == 0
    ids, values = scores(scored["choices"][0]["logprobs"])
    whole_ids, whole_values = scores(whole["choices"][0]["logprobs"])
    assert ids == whole_ids[-5:]
    assert values == pytest.approx(whole_values[-5:], abs=1e-4)
    assert all(v < 0 for v in values)


def test_echo_last_zero_echoes_and_scores_nothing(server):
    """`echo: true` with `echo_last: 0` echoes no prompt token, so it computes no prompt logprobs
    and its prompt may come from the cache as any other's."""
    prompt = f"[{uuid.uuid4().hex[:8]}] {PREFIX}"
    completion(server, {"prompt": prompt, "max_tokens": 1})
    body = {"prompt": prompt, "echo": True, "echo_last": 0, "logprobs": True, "max_tokens": 2,
            "temperature": 0}  # fmt: skip
    got = completion(server, body)
    assert cached_tokens(got) >= 64
    assert len(got["choices"][0]["logprobs"]["content"]) == 2
    plain = completion(server, {**body, "echo": False, "echo_last": None})
    assert got["choices"][0]["text"] == plain["choices"][0]["text"]
