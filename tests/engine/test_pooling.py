"""Pooling requests in the engine: the mean of the final-norm hidden states, as transformers
computes them; the same vector whatever the batch, the chunking or a preemption; generation
rows in the same steps unchanged; no KV block kept and nothing added to the prefix cache."""

from __future__ import annotations

import pytest
import torch

from girandole import LLM, SamplingParams
from girandole.engine.pooling import PoolingParams

TEXTS = [
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def main():\n    return",
    "It kept its keys and values in pages, shared prefixes between prompts, and never dropped",
]
ATOL = 1e-4


def make_llm(path, **kw) -> LLM:
    kw.setdefault("mode", "reference")
    kw.setdefault("device", "cpu")
    return LLM(model=str(path), **kw)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


def hf_pooled(folder, ids: list[int], method: str = "mean") -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        hidden = model(torch.tensor([ids])).last_hidden_state[0]  # after the final norm
    return hidden.mean(0) if method == "mean" else hidden[-1]


@pytest.mark.parametrize("method", ["mean", "last"])
def test_matches_transformers(llm, tiny_llama_dir, method):
    ids = [llm.tokenizer.encode(t) for t in TEXTS]
    ours = llm.embed(ids, PoolingParams(method))
    for seq, vec in zip(ids, ours):
        expect = hf_pooled(tiny_llama_dir, seq, method)
        torch.testing.assert_close(torch.tensor(vec), expect, atol=ATOL, rtol=0)


def test_same_vector_alone_in_batches_chunked_and_preempted(llm, tiny_llama_dir):
    alone = [llm.embed(t)[0] for t in TEXTS]
    batched = llm.embed(TEXTS * 3)
    for i, vec in enumerate(batched):
        torch.testing.assert_close(torch.tensor(vec), torch.tensor(alone[i % 4]), atol=1e-5, rtol=0)
    # 8-token steps: every prompt in chunks
    small = make_llm(tiny_llama_dir, max_num_batched_tokens=8, max_num_seqs=4)
    for vec, ref in zip(small.embed(TEXTS), alone):
        torch.testing.assert_close(torch.tensor(vec), torch.tensor(ref), atol=1e-5, rtol=0)
    # preempted halfway through its prompt: recomputed from the start, pooled once
    engine = small.engine
    engine.add_request("p", small.tokenizer.encode(TEXTS[3]), SamplingParams(max_tokens=0),
                       pooling=PoolingParams())  # fmt: skip
    seq = engine.seqs["p"]
    engine.step()
    engine.step()
    assert 0 < seq.num_computed_tokens < seq.num_prompt_tokens
    engine.scheduler._preempt(seq)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert seq.num_preemptions == 1
    torch.testing.assert_close(
        torch.tensor(outputs[-1].embedding), torch.tensor(alone[3]), atol=1e-5, rtol=0
    )


def test_generation_rows_share_steps_and_stay_the_same(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate(TEXTS[0], params)[0].token_ids
    engine = llm.engine
    engine.add_request("gen", llm.tokenizer.encode(TEXTS[0]), params)
    tokens: list[int] = []
    for out in engine.step():  # the generation's prefill
        tokens += out.new_token_ids
    for i, text in enumerate(TEXTS * 2):
        ids = llm.tokenizer.encode(text)
        engine.add_request(f"emb-{i}", ids, SamplingParams(max_tokens=0), pooling=PoolingParams())
    embeddings = {}
    mixed_steps = 0  # steps that decoded the generation and finished pooling requests
    while engine.has_unfinished_requests():
        outputs = engine.step()
        for out in outputs:
            if out.request_id == "gen":
                tokens += out.new_token_ids
            elif out.finished:
                embeddings[out.request_id] = out.embedding
        ids = {o.request_id for o in outputs}
        mixed_steps += "gen" in ids and any(r.startswith("emb") for r in ids)
    assert tokens == expected
    assert len(embeddings) == 8 and all(len(v) == 64 for v in embeddings.values())
    assert mixed_steps >= 1


def test_no_blocks_kept_and_prefix_cache_untouched(llm):
    engine = llm.engine
    engine.kv_cache.reset_prefix_cache()
    llm.embed(TEXTS)
    assert engine.kv_cache.num_used_blocks == 0
    assert engine.kv_cache.hash_to_block == {}
    assert not engine.seqs
    # a generation with a pooled text as its prompt finds nothing cached
    out = llm.generate(TEXTS[1], SamplingParams(max_tokens=1))[0]
    assert out.num_cached_tokens == 0


def test_pooling_request_must_not_generate(llm):
    with pytest.raises(ValueError, match="max_tokens must be 0"):
        llm.engine.add_request(
            "x", [1, 2, 3], SamplingParams(max_tokens=4), pooling=PoolingParams()
        )


def test_scoring_only_the_last_prompt_tokens(llm):
    """prompt_logprobs_last (rerank's query likelihood): the same logprobs as scoring the whole
    prompt, for the last N tokens only."""
    ids = llm.tokenizer.encode(TEXTS[3])
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    full = llm.generate(ids, params)[0].prompt_logprobs
    engine = llm.engine
    engine.add_request("last", ids, SamplingParams(max_tokens=0, prompt_logprobs=0),
                       prompt_logprobs_last=5)  # fmt: skip
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    last = outputs[-1].prompt_logprobs
    assert len(last) == len(full) == len(ids)
    assert last[:-5] == [None] * (len(ids) - 5)
    for a, b in zip(last[-5:], full[-5:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5
