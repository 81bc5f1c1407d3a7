"""Overlap scheduling on the GPU path (EngineConfig.overlap_scheduling), run on CPU under
Triton's interpreter: the engine schedules and launches step N+1 before it postprocesses step N,
and gives exactly what the synchronous engine gives: the same tokens, texts, finish and stop
reasons and usage, with staggered arrivals, chunked prefill, EOS / stop tokens / stop strings
ending rows mid-batch, aborts, and rows that fall back to the synchronous step."""

from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
pytest.importorskip("triton")

from girandole import SamplingParams  # noqa: E402
from girandole.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from girandole.sampling.grammar import GrammarSpec  # noqa: E402

EOS = 2  # the tiny tokenizer's </s>
LONG = [(i * 13) % 250 + 3 for i in range(37)]  # prefilled in chunks of 16 tokens
PROMPTS = [[5, 9, 14, 22, 31], LONG, [7, 8, 9], [40, 41, 42, 43, 44, 45], LONG[:20]]


def _engine(model_dir, overlap: bool | None, **kwargs) -> LLMEngine:
    kwargs.setdefault("gpu_path", True)
    kwargs.setdefault("kv_cache_gb", 0.01)
    return LLMEngine(
        EngineConfig(
            model=str(model_dir),
            mode="reference",
            device="cpu",
            block_size=4,
            max_num_batched_tokens=16,
            max_num_seqs=8,
            overlap_scheduling=overlap,
            **kwargs,
        )
    )


@pytest.fixture(scope="module")
def engines(tinier_llama_dir):
    return _engine(tinier_llama_dir, False), _engine(tinier_llama_dir, True)


def _drive(
    engine: LLMEngine,
    arrivals: dict[int, list],
    aborts: dict[int, list] | None = None,
    pauses: dict[int, list] | None = None,
):
    """Run requests that arrive at given steps (and aborts at given steps) to completion;
    `pauses`: (request id, "pause" or "resume") at given steps (backpressure).
    Returns per request: tokens, text, finish reason, stop reason, usage; and every output."""
    aborts = aborts or {}
    pauses = pauses or {}
    got: dict[str, dict] = {}
    log: list = []

    def record(out):
        log.append(out)
        r = got.setdefault(out.request_id, {"tokens": [], "text": ""})
        assert "finish" not in r, f"{out.request_id}: output after its last"
        r["tokens"] += out.new_token_ids
        r["text"] += out.new_text
        if out.prompt_logprobs is not None:
            r["prompt_logprobs"] = len(out.prompt_logprobs)
        if out.finished:
            r["finish"] = (out.finish_reason, out.stop_reason)
            r["usage"] = (out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens)

    step = 0
    last = max([*arrivals, *aborts, *pauses])
    while step <= last or engine.has_unfinished_requests():
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
        for rid in aborts.get(step, []):
            out = engine.abort(rid)
            if out is not None:
                record(out)
        for rid, action in pauses.get(step, []):
            getattr(engine, action)(rid)
        for out in engine.step():
            record(out)
        step += 1
        assert step < 500
    for rid, r in got.items():  # usage counts what was emitted, never a dropped token
        # (a grammar's own stop token is emitted but not counted, as in the synchronous step)
        assert len(r["tokens"]) == r["usage"][1] or rid == "grammar", rid
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0
    return got, log


def _both(engines, arrivals, aborts=None):
    sync, overlap = engines
    before = overlap.num_overlapped_steps
    want, _ = _drive(sync, arrivals, aborts)
    got, _ = _drive(overlap, arrivals, aborts)
    assert got == want
    return want, overlap.num_overlapped_steps - before


def _probe(engines, prompt, n=10) -> list[int]:
    """What the engines generate greedily for `prompt` (both run it: their prefix caches stay
    alike, so that cached-token counts compare)."""
    rid = f"probe-{_probe.count}"
    _probe.count += 1
    want, _ = _drive(engines[0], {0: [(rid, prompt, _greedy(n))]})
    got, _ = _drive(engines[1], {0: [(rid, prompt, _greedy(n))]})
    assert got == want
    return want[rid]["tokens"]


_probe.count = 0


def _greedy(max_tokens, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_overlap_is_on_only_where_asked(engines, tinier_llama_dir):
    sync, overlap = engines
    assert overlap.overlap and not sync.overlap
    # the CPU path never overlaps, asked or not; the GPU path on CPU only when asked
    cpu = LLMEngine(EngineConfig(model=str(tinier_llama_dir), device="cpu", kv_cache_gb=0.01))
    assert not cpu.overlap
    assert not _engine(tinier_llama_dir, True, gpu_path=False).overlap
    assert not _engine(tinier_llama_dir, None).overlap  # None: on for CUDA only
    assert not _engine(tinier_llama_dir, True, ngram_speculation_length=3).overlap


def test_mixed_batch_equals_synchronous(engines):
    """Greedy and seeded rows (n=2 as two seeds of one prompt), staggered arrivals, a chunked
    prompt, different max_tokens, logprobs, and rows ended by EOS, a stop token and a stop
    string while their neighbours go on."""
    out0 = _probe(engines, PROMPTS[0], 4)  # out0[3]: a stop token
    out3 = _probe(engines, PROMPTS[3], 6)  # its text's 4th and 5th characters: a stop string
    stop_text = "".join(_texts(engines[0], out3))[3:5]
    seeded = dict(temperature=0.9, top_k=40, top_p=0.95)
    arrivals = {
        0: [
            ("greedy", PROMPTS[0], _greedy(9)),
            ("chunked", PROMPTS[1], SamplingParams(max_tokens=7, seed=1, **seeded)),
            ("n0", PROMPTS[2], SamplingParams(max_tokens=6, seed=10, **seeded)),
            ("n1", PROMPTS[2], SamplingParams(max_tokens=6, seed=11, **seeded)),
        ],
        2: [("stop-token", PROMPTS[0], _greedy(9, stop_token_ids=[out0[3]]))],
        3: [
            # EOS made likely: a seeded row that ends at a random step
            (
                "eos",
                PROMPTS[4],
                SamplingParams(temperature=1.0, seed=6, max_tokens=12, logit_bias={EOS: 4.0}),
            ),
            ("stop-string", PROMPTS[3], _greedy(10, stop=[stop_text])),
        ],
        5: [
            ("logprobs", PROMPTS[3], SamplingParams(max_tokens=5, seed=2, logprobs=2)),
            ("echo", PROMPTS[1], SamplingParams(max_tokens=2, seed=7, prompt_logprobs=1)),
            ("score", PROMPTS[0], SamplingParams(max_tokens=0, prompt_logprobs=1)),
        ],
    }
    want, overlapped = _both(engines, arrivals)
    assert overlapped > 5  # not vacuous: most steps overlapped
    assert want["greedy"]["finish"] == ("length", None) and len(want["greedy"]["tokens"]) == 9
    assert want["stop-token"]["finish"] == ("stop", out0[3])
    assert want["eos"]["finish"] == ("stop", EOS) and len(want["eos"]["tokens"]) < 12
    assert want["stop-string"]["finish"] == ("stop", stop_text)
    assert stop_text not in want["stop-string"]["text"]
    assert len(want["stop-string"]["tokens"]) < 10
    assert want["echo"]["prompt_logprobs"] == len(PROMPTS[1]) and len(want["echo"]["tokens"]) == 2
    assert want["score"]["prompt_logprobs"] == len(PROMPTS[0]) and want["score"]["tokens"] == []


def test_preemption_under_overlap(tinier_llama_dir):
    """A KV cache of a few dozen blocks: rows with a token in flight are preempted and
    recomputed (from the real token, placed by then); outputs still equal."""
    small = dict(kv_cache_gb=7.5e-6)  # 15 blocks of 4 tokens (512 bytes: one layer, one KV head)
    pair = (_engine(tinier_llama_dir, False, **small), _engine(tinier_llama_dir, True, **small))
    assert pair[1].kv_cache.num_blocks == 15
    # 8 tokens a row: the six rows still need twice the cache (about 100 tokens for 60 slots)
    params = [_greedy(8), SamplingParams(max_tokens=8, seed=3, temperature=0.9, top_k=20)]
    arrivals = {
        0: [(f"r{i}", PROMPTS[i % 4][:20], params[i % 2]) for i in range(4)],
        3: [(f"r{i}", PROMPTS[i % 4][:20], params[i % 2]) for i in range(4, 6)],
    }
    _, overlapped = _both(pair, arrivals)
    assert overlapped > 0
    assert pair[0].stats()["num_preemptions"] > 0 and pair[1].stats()["num_preemptions"] > 0


def test_a_row_paused_with_its_token_in_flight_goes_on_where_it_stopped(tinier_llama_dir):
    """Backpressure (engine/backpressure.py) pauses a row between steps, while its token is in
    flight; paused, it is parked for a newcomer's blocks, and once resumed it ends with exactly
    the tokens of a row never paused. A paused row that is aborted frees its blocks."""
    small = dict(kv_cache_gb=7.5e-6)  # 15 blocks of 4 tokens (512 bytes: one layer, one KV head)
    pair = (_engine(tinier_llama_dir, False, **small), _engine(tinier_llama_dir, True, **small))
    arrivals = {0: [("p", PROMPTS[0], _greedy(16)), ("q", PROMPTS[3], _greedy(16))]}
    want, _ = _drive(pair[0], arrivals)
    arrivals = {**arrivals, 6: [("late", PROMPTS[1][:30], _greedy(4))]}
    pauses = {3: [("p", "pause")], 12: [("p", "resume")]}
    for engine in pair:
        got, log = _drive(engine, arrivals, pauses=pauses)
        for rid in "pq":  # usage aside: a later run finds its prompt in the prefix cache
            assert {**got[rid], "usage": None} == {**want[rid], "usage": None}
        ends = [o.request_id for o in log if o.finished]
        assert ends.index("q") < ends.index("p")  # p waited
        assert engine.stats()["num_paused"] == 0
    parked = pair[1].stats()["num_preemptions"]
    assert parked > 0  # the newcomer took the paused row's blocks
    got, _ = _drive(pair[1], arrivals, aborts={8: ["p"]}, pauses={3: [("p", "pause")]})
    assert got["p"]["finish"][0] == "abort" and got["q"]["tokens"] == want["q"]["tokens"]


def _texts(engine: LLMEngine, tokens: list[int]) -> list[str]:
    return [engine.tokenizer.decode([t]) for t in tokens]


def test_stop_never_leaks_the_token_in_flight(engines, monkeypatch):
    """A row that ends at step N was already in step N+1: that token never comes out, in the
    stream or in usage, and the row's blocks are freed (checked by _drive). A row that ends by
    count (max_tokens) is known to end: it is never scheduled past its last token."""
    out = _probe(engines, PROMPTS[3])
    stop_text = "".join(_texts(engines[0], out))[3:5]
    params = _greedy(10, stop=[stop_text])
    arrivals = {0: [("s", PROMPTS[3], params), ("t", PROMPTS[0], _greedy(3))]}
    sync, overlap = engines
    sampled: list[str] = []  # request ids, once per launched step that samples them
    launch = overlap.runner.launch

    def counting(batch, inputs=None):
        step = launch(batch, inputs)
        sampled.extend(batch.seqs[i].request_id for i in step.sampling)
        return step

    monkeypatch.setattr(overlap.runner, "launch", counting)
    want, _ = _drive(sync, arrivals)
    got, log = _drive(overlap, arrivals)
    assert got == want
    streamed = [t for o in log if o.request_id == "s" for t in o.new_token_ids]
    assert streamed == want["s"]["tokens"] == out[: len(streamed)]
    assert len(streamed) < 10 and want["s"]["finish"] == ("stop", stop_text)
    assert sampled.count("s") == len(streamed) + 1  # one step past the stop, dropped
    assert sampled.count("t") == 3  # max_tokens: never one more


def test_abort_during_an_overlapped_step(tinier_llama_dir):
    # engines of its own: the shared ones keep alike prefix caches (cached-token counts)
    sync, overlap = _engine(tinier_llama_dir, False), _engine(tinier_llama_dir, True)
    arrivals = {
        0: [
            ("a", PROMPTS[0], _greedy(12)),
            ("b", PROMPTS[2], _greedy(12)),
            ("c", PROMPTS[3], SamplingParams(max_tokens=12, seed=4, temperature=0.8)),
        ]
    }
    # the overlapped engine: abort "b" while a step that sampled it is in flight
    for rid, prompt, params in arrivals[0]:
        overlap.add_request(rid, prompt, params)
    emitted: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    while not (overlap._inflight is not None and overlap.num_overlapped_steps and emitted["b"]):
        for o in overlap.step():
            emitted[o.request_id] += o.new_token_ids
    inflight_b = [
        i for i in overlap._inflight.sampling if overlap._inflight.batch.seqs[i].request_id == "b"
    ]
    assert inflight_b  # b's next token is on the device
    aborted = overlap.abort("b")
    assert aborted.finish_reason == "abort" and aborted.new_token_ids == []
    assert aborted.num_output_tokens == len(emitted["b"])  # the token in flight is not counted
    finished = {}
    while overlap.has_unfinished_requests():
        for o in overlap.step():
            assert o.request_id != "b"
            emitted[o.request_id] += o.new_token_ids
            if o.finished:
                finished[o.request_id] = o.num_output_tokens
    assert finished == {"a": 12, "c": 12}
    stats = overlap.stats()
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0
    # the others are what they are without the abort; b's tokens were its own
    want, _ = _drive(sync, {0: [(f"x{r}", p, s) for r, p, s in arrivals[0]]})
    assert emitted["a"] == want["xa"]["tokens"] and emitted["c"] == want["xc"]["tokens"]
    assert emitted["b"] == want["xb"]["tokens"][: len(emitted["b"])]


def test_fallback_rows_mixed_in(engines):
    """A grammar row and a predicted-output row need the previous token on the host: while
    they decode, steps run synchronously; free rows around them still match, and overlap
    resumes. min_tokens needs only the count (the placeholder keeps it): it overlaps."""
    spec = GrammarSpec("regex", "[0-9]{3}-[a-c]{2}")
    predicted = _probe(engines, PROMPTS[0], 8)
    predicted[5] = (predicted[5] + 1) % 300  # one miss: proposals rejected midway, then resync
    arrivals = {
        0: [
            ("free", PROMPTS[0], _greedy(14)),
            (
                "grammar",
                PROMPTS[2],
                SamplingParams(temperature=0.8, seed=3, max_tokens=20, grammar=spec),
            ),
        ],
        1: [
            ("penalty", PROMPTS[3], _greedy(6, frequency_penalty=0.7, presence_penalty=0.3)),
            (
                "repetition",
                PROMPTS[4],
                SamplingParams(max_tokens=5, seed=8, repetition_penalty=1.3),
            ),
            ("prediction", PROMPTS[0], _greedy(8, speculation=predicted)),
            (
                "min-tokens",
                PROMPTS[0],
                SamplingParams(max_tokens=8, seed=6, min_tokens=6, logit_bias={EOS: 4.0}),
            ),
        ],
    }
    want, overlapped = _both(engines, arrivals)
    assert want["free"]["finish"] == ("length", None) and len(want["free"]["tokens"]) == 14
    assert len(want["min-tokens"]["tokens"]) >= 6
    assert want["prediction"]["tokens"][:5] == predicted[:5]
    assert overlapped > 0  # once the fallback rows are done


def test_penalty_rows_overlap(engines, monkeypatch):
    """Presence, frequency and repetition penalties count the token in flight on the device;
    a grammar row arriving mid-way sends its first step to Sampler's host path, which waits
    for those tokens instead."""
    sync, overlap = engines
    strong = dict(frequency_penalty=1.5, presence_penalty=1.0, repetition_penalty=1.5)
    spec = GrammarSpec("regex", "[0-9]{3}-[a-c]{2}")
    arrivals = {
        0: [
            ("pen-greedy", PROMPTS[0], _greedy(16, **strong)),
            ("pen-seeded", PROMPTS[3], SamplingParams(max_tokens=16, seed=9, **strong)),
            ("free", PROMPTS[2], _greedy(16)),
        ],
        6: [("grammar", PROMPTS[2], SamplingParams(max_tokens=2, seed=3, grammar=spec))],
    }
    host_steps = []  # Sampler's host path taken with tokens in flight
    launch = overlap.runner.sampler.launch

    def watching(logits, rows, last=None):
        pending = launch(logits, rows, last)
        if last is not None and any(r.grammar is not None for r in rows):
            # the host path sampled with the real tokens in the placeholders' cells
            real = last.ids.tolist()
            host_steps.append([rows[i].token_ids[-1] for i in last.rows] == real)
        return pending

    monkeypatch.setattr(overlap.runner.sampler, "launch", watching)
    want, overlapped = _both(engines, arrivals)
    assert overlapped >= 10 and host_steps and all(host_steps)
    # the penalties bite: without them the greedy row repeats itself
    assert len(set(want["pen-greedy"]["tokens"])) == 16


def test_overlapped_steps_are_counted_in_stats(engines):
    assert "num_overlapped_steps" in engines[1].stats()
    assert engines[1].stats()["num_overlapped_steps"] == engines[1].num_overlapped_steps


def test_serve_no_overlap_scheduling_flag():
    import argparse
    import dataclasses

    from girandole.api.server import add_serve_parser, settings_from_args
    from girandole.deploy.backend import EngineOptions, ReplicaSpec

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    default = settings_from_args(parser.parse_args(["serve"]))
    off = settings_from_args(parser.parse_args(["serve", "--no-overlap-scheduling"]))
    assert default.overlap_scheduling is None and off.overlap_scheduling is False
    spec = ReplicaSpec("accounts/a/deployments/d", None, 1.0, None)
    for settings, want in ((default, None), (off, False)):
        options = EngineOptions.from_settings(settings)
        assert options.overlap_scheduling is want
        config = dataclasses.replace(spec, options=options).engine_config()
        assert config.overlap_scheduling is want
