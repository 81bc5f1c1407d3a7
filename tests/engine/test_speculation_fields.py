"""Speculative decoding against the request fields it meets, on a tiny random Llama: whatever is
proposed (a prediction right, wrong, partly right or running past every limit; n-gram lookup; a
draft model), a request's tokens, finish, logprobs and top logprobs are those of plain decoding,
for greedy and for seeded sampling with every logit processor, with LoRA adapters, and under
preemption. Seeded sampling is compared token for token: each emitted token consumes its
position's own uniform, as plain decoding does (girandole.sampling.rejection)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from girandole import LLM, SamplingParams

HERE = Path(__file__).resolve().parent


def _module(name: str, path: Path):
    """A test helper module by path (pytest imports test folders with importlib)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return",
    "It kept its keys and values in pages",
]
MAX_TOKENS = 24


def make_llm(path, **kw) -> LLM:
    kw = {"mode": "reference", "device": "cpu", "block_size": 4, "kv_cache_gb": 0.01, **kw}
    kw.setdefault("target_itl_ms", None)  # the same batches (and so draws) every run
    return LLM(model=str(path), **kw)


def run(
    llm: LLM,
    params: list[SamplingParams],
    adapters: list[str | None] | None = None,
    prompts: list[int] | None = None,
) -> list[dict]:
    """Request i: PROMPTS[prompts[i]] (default: i, cycling) with params[i] (and adapters[i]),
    all at once; per request its tokens, text, finish, stop reason, logprobs and last
    speculation counts."""
    engine = llm.engine
    results = []
    for i, p in enumerate(params):
        adapter = adapters[i] if adapters else None
        prompt = PROMPTS[prompts[i] if prompts else i % len(PROMPTS)]
        ids = llm.tokenizer.encode(prompt)
        engine.add_request(f"r{i}", ids, p, adapter=adapter)
        results.append(
            {"tokens": [], "text": "", "finish": None, "stop": None, "lp": [], "spec": {}}
        )
    while engine.has_unfinished_requests():
        for out in engine.step():
            r = results[int(out.request_id[1:])]
            r["tokens"] += out.new_token_ids
            r["text"] += out.new_text
            r["lp"] += out.logprobs or []
            r["spec"] = out.speculation
            if out.finished:
                r["finish"], r["stop"] = out.finish_reason, out.stop_reason
    assert engine.kv_cache.num_used_blocks == 0  # rejected positions' blocks came back too
    return results


def proposals(tokens: list[int]) -> dict[str, list[int]]:
    """Predictions of an output: itself and more, one wrong in a stretch, one with an EOS (id 2
    in the tiny tokenizer) early, one shifted by a token, and one wrong throughout."""
    return {
        "right": tokens + tokens,
        "partly": tokens[:5] + [7, 7, 7] + tokens[8:],
        "eos": tokens[:3] + [2] + tokens[3:],
        "shifted": tokens[1:],
        "wrong": [(t + 1) % 300 for t in tokens],
    }


def assert_same(plain: dict, spec: dict, what) -> None:
    """The same tokens, text, finish and logprobs (each token's, and its top alternatives)."""
    for key in ("tokens", "text", "finish", "stop"):
        assert spec[key] == plain[key], (what, key)
    assert len(spec["lp"]) == len(plain["lp"]), what
    for a, b in zip(plain["lp"], spec["lp"]):
        assert b.token_id == a.token_id, what
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5), what
        assert b.sampling_logprob == pytest.approx(a.sampling_logprob, abs=1e-5), what
        assert [t for t, _ in b.top_logprobs] == [t for t, _ in a.top_logprobs], what
        for (_, x), (_, y) in zip(a.top_logprobs, b.top_logprobs):
            assert y == pytest.approx(x, abs=1e-5), what


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


# Every logit processor and stop condition, greedy and seeded (a temperature high enough that
# the sampled tokens often differ from the greedy ones the predictions propose).
FIELDS = [
    dict(temperature=0),
    dict(temperature=0, stop_token_ids=[2], min_tokens=12),
    dict(temperature=0, frequency_penalty=1.2, presence_penalty=0.5, repetition_penalty=1.3),
    dict(temperature=1.0),
    dict(temperature=0.8, top_k=5, min_p=0.05),
    dict(temperature=0.9, top_p=0.8, typical_p=0.9),
    dict(temperature=1.1, frequency_penalty=0.8, presence_penalty=-0.4, repetition_penalty=1.2),
    dict(temperature=1.0, logit_bias={5: 4.0, 9: -100.0, 40: 2.5}),
    dict(temperature=1.0, min_tokens=MAX_TOKENS - 2, stop_token_ids=[2, 40]),
]


def field_names(fields: dict) -> str:
    return ",".join(fields)


@pytest.mark.parametrize("fields", FIELDS, ids=field_names)
def test_predictions_never_change_tokens_or_logprobs(llm, fields):
    """Each prediction of the plain output, for every processor: the same tokens and the same
    logprobs (accepted tokens' logprobs come from the verifying forward) as plain decoding."""
    kw = dict(max_tokens=MAX_TOKENS, logprobs=3, **fields)
    plain_params = [SamplingParams(seed=11 + i, **kw) for i in range(len(PROMPTS))]
    plain = run(llm, plain_params)
    # every prompt with every prediction, in one batch
    names = list(proposals([1]))
    cases = [(i, name) for i in range(len(PROMPTS)) for name in names]
    params = [
        SamplingParams(seed=11 + i, speculation=proposals(plain[i]["tokens"])[name], **kw)
        for i, name in cases
    ]
    outs = run(llm, params, prompts=[i for i, _ in cases])
    for (i, name), o in zip(cases, outs):
        assert_same(plain[i], o, (name, i))
        assert o["spec"]["prediction_matched"] <= len(o["tokens"])
    assert sum(o["spec"]["accepted"] for o in outs) > 0  # proposals were verified, some kept


@pytest.mark.parametrize(
    "limit",
    [
        dict(max_tokens=7),
        dict(max_tokens=1),
        dict(stop_token_ids="at 6"),
        dict(stop="text at 9"),
        dict(stop="text at 3", max_tokens=MAX_TOKENS, logprobs=0),
    ],
    ids=["max_tokens", "max_tokens_1", "stop_token", "stop_string", "stop_string_logprobs"],
)
@pytest.mark.parametrize("temperature", [0, 0.9])
def test_limits_inside_an_accepted_run(llm, limit, temperature):
    """A prediction that runs well past max_tokens, a stop token or a stop string: the output
    ends exactly where plain decoding's does, and only the proposals used count."""
    kw = dict(max_tokens=MAX_TOKENS, temperature=temperature, ignore_eos=True)
    free = run(llm, [SamplingParams(seed=5 + i, **kw) for i in range(len(PROMPTS))])
    for i, f in enumerate(free):
        tokens, limited = f["tokens"], {**kw, **limit}
        if limit.get("stop_token_ids") == "at 6":
            limited["stop_token_ids"] = [tokens[6]]
        elif isinstance(limit.get("stop"), str):
            at = int(limit["stop"].split()[-1])
            text = llm.tokenizer.decode(tokens[at : at + 2])
            if not text.strip():
                continue
            limited["stop"] = [text.strip()[:3]]
        plain = run(llm, [SamplingParams(seed=5 + i, **limited)], prompts=[i])[0]
        spec = run(llm, [SamplingParams(seed=5 + i, speculation=tokens * 3, **limited)],
                   prompts=[i])[0]  # fmt: skip
        assert_same(plain, spec, (i, limited))
        assert plain["finish"] == ("stop" if {"stop", "stop_token_ids"} & set(limit) else "length")
        counts = spec["spec"]
        # every proposal was used: each step's accepted ones, up to the stop, were output
        assert counts["accepted"] == counts["proposed"] == counts["prediction_matched"]
        assert counts["accepted"] < max(1, len(spec["tokens"]))


@pytest.mark.parametrize("source", ["ngram", "draft"])
@pytest.mark.parametrize("fields", [FIELDS[0], FIELDS[2], FIELDS[4], FIELDS[7]], ids=field_names)
def test_server_wide_proposers_keep_every_field(tiny_llama_dir, llm, source, fields):
    """n-gram lookup and a draft model (the model itself: its proposals are the greedy tokens)
    beside requests with a prediction: tokens and logprobs as plain decoding's, a stop string
    and max_tokens included."""
    kw = dict(max_tokens=MAX_TOKENS, logprobs=2, stop=["ba"], **fields)
    params = [SamplingParams(seed=3 + i, **kw) for i in range(len(PROMPTS))]
    plain = run(llm, params)
    extra = (
        dict(ngram_speculation_length=3)
        if source == "ngram"
        else dict(draft_model=str(tiny_llama_dir), draft_token_count=3)
    )
    spec_llm = make_llm(tiny_llama_dir, **extra)
    mixed = [
        SamplingParams(seed=3 + i, speculation=plain[i]["tokens"] if i % 2 else None, **kw)
        for i in range(len(PROMPTS))
    ]
    outs = run(spec_llm, mixed)
    for i, (p, o) in enumerate(zip(plain, outs)):
        assert_same(p, o, (source, i))
    assert sum(o["spec"]["proposed"] for o in outs) > 0
    if source == "draft":
        assert spec_llm.engine.speculator.draft.kv_cache.num_used_blocks == 0


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """A random PEFT adapter of the tiny Llama (tests/lora's writer)."""
    from transformers import AutoModelForCausalLM

    helpers = _module("_speculation_lora_helpers", HERE.parent / "lora" / "lora_helpers.py")
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).float().eval()
    folder = tmp_path_factory.mktemp("speculation-adapter") / "a1"
    helpers.write_peft_adapter(hf, folder, rank=8, alpha=16, seed=10, std=0.3)
    return folder


@pytest.mark.parametrize("source", ["prediction", "ngram", "draft"])
def test_adapter_rows_verify_with_their_adapter(tiny_llama_dir, adapter_dir, source):
    """Rows of a LoRA adapter beside base rows: the verifying forward runs each row's adapter
    over its proposed positions, so each gets its plain output (the draft model, the base
    model, proposes the base model's tokens: wrong for the adapter's rows, and harmless)."""
    extra = {
        "prediction": {},
        "ngram": dict(ngram_speculation_length=3),
        "draft": dict(draft_model=str(tiny_llama_dir)),
    }[source]
    llm = make_llm(tiny_llama_dir, **extra)
    llm.engine.loras.register(llm.engine.loras.read("a1", adapter_dir))
    adapters = [None, "a1"] * len(PROMPTS)
    kw = dict(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    plain_llm = make_llm(tiny_llama_dir)
    plain_llm.engine.loras.register(plain_llm.engine.loras.read("a1", adapter_dir))
    plain = run(plain_llm, [SamplingParams(**kw)] * len(adapters), adapters)
    assert plain[0]["tokens"] != plain[1]["tokens"]  # the adapter matters
    params = [
        SamplingParams(speculation=p["tokens"] if source == "prediction" else None, **kw)
        for p in plain
    ]
    outs = run(llm, params, adapters)
    for i, (p, o) in enumerate(zip(plain, outs)):
        assert_same(p, o, (source, adapters[i], i))
    assert sum(o["spec"]["accepted"] for o in outs) > 0


@pytest.mark.parametrize("source", ["prediction", "draft"])
def test_preempted_speculating_rows(tiny_llama_dir, source):
    """Room for about 80 tokens and six requests of 40: rows that speculate are preempted and
    recomputed, seeded sampling and greedy alike, and their tokens stay plain decoding's."""
    probe = make_llm(tiny_llama_dir)
    per_token = probe.engine.runner.num_blocks * 4 / (0.01 * (1 << 30))
    gb = 80 / per_token / (1 << 30)
    extra = dict(draft_model=str(tiny_llama_dir), draft_token_count=3) if source == "draft" else {}
    llm = make_llm(tiny_llama_dir, kv_cache_gb=gb, **extra)
    kinds = [dict(temperature=0), dict(temperature=0.9, top_k=8, seed=1)] * 3
    base = [SamplingParams(max_tokens=40, ignore_eos=True, **k) for k in kinds]
    plain = run(make_llm(tiny_llama_dir), base)
    params = [
        SamplingParams(
            max_tokens=40, ignore_eos=True,
            speculation=p["tokens"][:20] + [9] + p["tokens"][20:] if source == "prediction" else None,
            **k,
        )
        for k, p in zip(kinds, plain)
    ]  # fmt: skip
    outs = run(llm, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o["tokens"] for o in outs] == [p["tokens"] for p in plain]
    assert sum(o["spec"]["accepted"] for o in outs) > 0
