"""One request's failure inside the engine ends that request alone: the others in the same
batch finish, with exactly the tokens they get when run by themselves."""

from __future__ import annotations

import pytest

from girandole import SamplingParams
from girandole.engine.engine import EngineConfig, LLMEngine

PROMPTS = {"a": [1, 5, 9, 12], "b": [1, 7, 3], "c": [1, 2, 4, 8, 16]}
PARAMS = {
    "a": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    "b": SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True),
    "c": SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True),
}


class ExplodingGrammar:
    """A grammar whose matcher throws when asked for its token mask (as a corrupted matcher
    would): the sampler raises for the whole batch, and the engine must single it out."""

    is_terminated = False

    def fill_bitmask(self, bitmask, row: int) -> None:
        raise RuntimeError("matcher exploded")

    def accept(self, token: int) -> bool:
        return True


class ExplodingDetokenizer:
    """Wraps a request's detokenizer; decoding its next token throws."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def add(self, tokens):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "detokenizer exploded")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def exploding_detokenizer(seq) -> None:
    seq.detokenizer = ExplodingDetokenizer(seq.detokenizer)


def make_engine(path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), mode="reference", device="cpu"))


def run(engine: LLMEngine, ids: list[str], sabotage=None) -> dict[str, dict]:
    """Run requests `ids` together; `sabotage(engine)` is called once all have started."""
    for rid in ids:
        engine.add_request(rid, PROMPTS[rid], PARAMS[rid])
    got = {rid: {"tokens": [], "finish": None, "extra": {}} for rid in ids}
    started = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            g = got[out.request_id]
            g["tokens"] += out.new_token_ids
            if out.finished:
                g["finish"], g["extra"] = out.finish_reason, out.extra
        if not started and all(len(g["tokens"]) >= 2 for g in got.values()):
            started = True
            if sabotage is not None:
                sabotage(engine)
    return got


@pytest.fixture(scope="module")
def alone(tiny_llama_dir) -> dict[str, list[int]]:
    engine = make_engine(tiny_llama_dir)
    return {rid: run(engine, [rid])[rid]["tokens"] for rid in ("b", "c")}


@pytest.mark.parametrize(
    "sabotage, message",
    [
        (lambda e: setattr(e.seqs["a"], "grammar", ExplodingGrammar()), "matcher exploded"),
        (lambda e: exploding_detokenizer(e.seqs["a"]), "detokenizer exploded"),
    ],
    ids=["sampler", "detokenizer"],
)
def test_one_request_fails_alone(tiny_llama_dir, alone, sabotage, message):
    engine = make_engine(tiny_llama_dir)
    got = run(engine, ["a", "b", "c"], sabotage)
    assert got["a"]["finish"] == "abort"
    assert message in got["a"]["extra"]["error"]
    assert len(got["a"]["tokens"]) < 12
    for rid in ("b", "c"):
        assert got[rid]["finish"] == "length"
        assert got[rid]["tokens"] == alone[rid], rid
    assert engine.stats()["kv_blocks_used"] == 0
    # the engine keeps serving
    assert run(engine, ["b"])["b"]["tokens"] == alone["b"]


def sabotage_first_request(llm, sabotage) -> None:
    """`sabotage(engine, request_id)` right after the first request of the next call is added."""
    add = llm.engine.add_request
    done = []

    def add_then_sabotage(request_id, *args, **kwargs):
        add(request_id, *args, **kwargs)
        if not done:
            done.append(request_id)
            sabotage(llm.engine, request_id)

    llm.engine.add_request = add_then_sabotage


def test_llm_generate_says_why_a_request_failed(tiny_llama_dir):
    from girandole import LLM

    llm = LLM(model=str(tiny_llama_dir), mode="reference")
    prompts = [PROMPTS["a"], PROMPTS["b"]]
    params = [PARAMS["a"], PARAMS["b"]]
    alone = llm.generate([PROMPTS["b"]], PARAMS["b"])[0]
    sabotage_first_request(llm, lambda e, rid: exploding_detokenizer(e.seqs[rid]))
    failed, fine = llm.generate(prompts, params)
    assert failed.finish_reason == "abort" and "detokenizer exploded" in failed.error
    assert fine.error is None and fine.token_ids == alone.token_ids


@pytest.mark.parametrize("method", ["generate", "embed"])
def test_llm_call_with_a_request_aborted_outside_it_raises(tiny_llama_dir, method):
    """engine.abort from elsewhere returns the request's last output itself, so no step ever
    shows it finished: the call raised nothing and waited forever."""
    from girandole import LLM

    llm = LLM(model=str(tiny_llama_dir), mode="reference")
    sabotage_first_request(llm, lambda e, rid: e.abort(rid))
    with pytest.raises(RuntimeError, match="prompt 0 ended without a result"):
        getattr(llm, method)([PROMPTS["a"], PROMPTS["b"]])
    assert llm.engine.stats()["kv_blocks_used"] == 0
