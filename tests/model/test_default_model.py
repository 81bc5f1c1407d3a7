"""The real default model (Gemma 3 270M Q4_K_M GGUF): configuration, greedy continuations
identical to transformers' fp32 run, and fast mode against reference mode on prose."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from model_helpers import paged_greedy

from girandole.model.evaluate import TeacherForced, compare, teacher_forced

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent.parent / "data"
GREEDY = DATA / "gemma3_270m_greedy.json"
TEXTS = ("pride_and_prejudice_ch1.txt", "declaration_of_independence.txt")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "<start_of_turn>user\nWhat is the tallest mountain in the world?<end_of_turn>\n"
    "<start_of_turn>model\n",
    "1, 2, 3, 5, 8, 13,",
    "The theory of relativity states that",
]
NEW_TOKENS = 32


def transformers_greedy(prompt_ids: list[list[int]]) -> list[list[int]]:
    """transformers' own fp32 greedy run on the GGUF (it dequantizes every tensor)."""
    from transformers import AutoModelForCausalLM

    from girandole.model.default import default_model_path

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            gen = hf.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
            )
            outs.append(gen[0, len(ids) :].tolist())
    return outs


def test_config(default_reference):
    _model, config = default_reference
    assert config.architecture == "gemma3"
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (262144, 640, 18)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 1, 256)
    assert config.max_position == 32768
    assert config.bos_token_id == 2 and config.add_bos_token
    assert config.eos_token_ids == [1, 106]
    assert config.name == "Gemma 3 270m"


def test_attention_layers(default_fast):
    from girandole.model.attention import Attention

    model, _ = default_fast
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(layers) == 18
    windows = [layer.sliding_window for layer in layers]
    assert windows == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]
    assert all(layer.scale == 256**-0.5 for layer in layers)


def test_greedy_matches_transformers(default_reference):
    """Reference mode, batched paged prefill + decode, against the stored transformers run
    (regenerate live with GIRANDOLE_LIVE_TRANSFORMERS=1)."""
    model, _ = default_reference
    expected = json.loads(GREEDY.read_text())
    prompt_ids = [case["prompt_ids"] for case in expected]
    want = [case["transformers_greedy"] for case in expected]
    if os.environ.get("GIRANDOLE_LIVE_TRANSFORMERS"):
        want = transformers_greedy(prompt_ids)
    got = paged_greedy(model, prompt_ids, NEW_TOKENS)
    assert got == want


def test_fast_greedy_close_to_reference(default_fast, default_reference):
    """Fast mode picks the same greedy tokens as transformers' fp32 run, except where the
    reference itself has a near-tie (top two logits within 0.2): each difference is explained.
    0.2: the decode rows' int8 activations move the reference's top two logits by ~0.1-0.3 here,
    so which near-tie a run meets first follows float32 rounding elsewhere: the AVX2 build (its
    prompt rows summed in another order than the AVX512 build's) keeps prompts 2 and 4 on the
    reference past the gaps of 0.041 and 0.006 where the AVX512 order left them, and leaves
    prompt 4 at a gap of 0.175 eight tokens later."""
    model, _ = default_fast
    ref_model, _ = default_reference
    expected = json.loads(GREEDY.read_text())
    got = paged_greedy(model, [c["prompt_ids"] for c in expected], NEW_TOKENS)
    same_prefix = []
    for out, case in zip(got, expected):
        ref = case["transformers_greedy"]
        n = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), len(ref))
        same_prefix.append(n)
        if n == len(ref):
            continue
        ids = case["prompt_ids"] + ref[:n]
        with torch.inference_mode():
            hidden = ref_model(torch.tensor(ids), torch.arange(len(ids)))
            top2 = ref_model.compute_logits(hidden[-1:])[0].topk(2)
        gap = float(top2.values[0] - top2.values[1])
        assert gap < 0.2, (same_prefix, n, gap)
        assert out[n] in top2.indices.tolist(), (n, out[n], top2.indices.tolist())
    assert sum(n == NEW_TOKENS for n in same_prefix) >= len(expected) // 2, same_prefix


@pytest.fixture(scope="module")
def prose_ids():
    from girandole.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    docs = [tok.encode((DATA / name).read_text()) for name in TEXTS]
    assert sum(len(d) for d in docs) >= 2000
    return docs


@pytest.fixture(scope="module")
def reference_on_prose(default_reference, prose_ids) -> TeacherForced:
    """Reference mode teacher-forced over the prose, once: both accuracy tests compare to it."""
    return teacher_forced(default_reference[0], prose_ids)


def test_fast_mode_accuracy_on_prose(reference_on_prose, default_fast, prose_ids):
    """Teacher-forced over ~2,700 tokens: top-1 agreement >= 97 %, perplexity within 3 %,
    for the prefill path (many rows: bf16 matmuls), and for the decode path (packed kernels)
    on the first text (~1,070 tokens; the benchmark reports it on both)."""
    import girandole.model.quant as quant

    ref = reference_on_prose
    prefill = compare(ref, teacher_forced(default_fast[0], prose_ids))
    saved = quant.DENSE_MIN_ROWS
    quant.DENSE_MIN_ROWS = 1 << 30  # force the decode-path kernels for every row count
    try:
        n = len(prose_ids[0]) - 1  # the reference run's entries for the first text
        first = TeacherForced(ref.nll[:n], ref.top1[:n])
        decode = compare(first, teacher_forced(default_fast[0], prose_ids[:1], chunk=16))
    finally:
        quant.DENSE_MIN_ROWS = saved
    for stats in (prefill, decode):
        assert stats["top1_agreement"] >= 0.97, stats
        assert abs(stats["ppl_rel_diff"]) <= 0.03, stats


def test_engine_accuracy_on_prose_with_float16_kv_cache(reference_on_prose, prose_ids):
    """The fast engine's own path over the same texts (prompt logprobs: 512-token chunks whose
    queries read the earlier chunks' keys from the paged cache, float16 by default on CPU):
    within the same bounds of reference mode."""
    from girandole import LLM, SamplingParams
    from girandole.model import kernels

    llm = LLM(max_model_len=4096)
    assert llm.engine.runner.kv_dtype == (torch.float16 if kernels.available() else torch.float32)
    outs = llm.generate(prose_ids, SamplingParams(max_tokens=1, prompt_logprobs=1))
    entries = [r for out in outs for r in out.prompt_logprobs[1:]]
    engine = TeacherForced(
        torch.tensor([-r.logprob for r in entries], dtype=torch.float64),
        torch.tensor([r.top_logprobs[0][0] for r in entries]),
    )
    stats = compare(reference_on_prose, engine)
    assert stats["tokens"] == sum(len(d) - 1 for d in prose_ids)
    assert stats["top1_agreement"] >= 0.97, stats
    assert abs(stats["ppl_rel_diff"]) <= 0.03, stats
