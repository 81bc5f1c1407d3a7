"""Sliding-window layers keep only their window in the KV cache (engine/kv_groups.py,
engine/kv_cache.py): the engine generates token for token what it generates with every position
kept, on tiny Gemma 3 (five sliding layers, one global) and Mistral-style (every layer sliding)
checkpoints whose window is shorter than the prompts: batched, chunked prefill, prefix-cache
hits, preemption, speculation, seeded sampling. And the blocks a window has passed go back."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from girandole import LLM, SamplingParams
from girandole.engine.kv_cache import NULL_BLOCK
from girandole.engine.kv_groups import bytes_per_block

# The GPU path's test runs the Triton kernels in the interpreter (read when they are imported).
os.environ["TRITON_INTERPRET"] = "1"

WINDOW = 12
BS = 4


def _root_conftest():
    """tests/conftest.py (its tiny tokenizer writer) by path."""
    spec = importlib.util.spec_from_file_location(
        "_girandole_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
    )
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    if not hasattr(module, "write_tiny_tokenizer"):
        spec.loader.exec_module(module)
    return module


def write_tiny_sliding(
    folder: Path, kind: str, seed: int = 0, layer_types: list[str] | None = None
) -> Path:
    """A random tiny `kind` ("gemma3": layers 0-4 slide, layer 5 is global, or `layer_types`;
    "mistral": every layer slides) with the tiny tokenizer, window WINDOW, saved as
    safetensors."""
    import transformers as tf
    from tokenizers import Tokenizer

    _root_conftest().write_tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    common = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=0,
        sliding_window=WINDOW,
        head_dim=16,
    )
    torch.manual_seed(seed)
    if kind == "gemma3":
        layers = dict(num_hidden_layers=6)
        if layer_types:
            layers = dict(num_hidden_layers=len(layer_types), layer_types=layer_types)
        config = tf.Gemma3TextConfig(
            **common, **layers, num_key_value_heads=1, tie_word_embeddings=False
        )
        model = tf.Gemma3ForCausalLM(config)
    else:
        config = tf.MistralConfig(**common, num_hidden_layers=2, num_key_value_heads=2)
        model = tf.MistralForCausalLM(config)
    model = model.float().eval()
    with torch.no_grad():  # identity norms and small logits would make greedy ties
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module", params=["gemma3", "mistral"])
def tiny_dir(request, tmp_path_factory) -> Path:
    return write_tiny_sliding(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


_rng = random.Random(0)
# Prompts longer than the window (and one shorter), token ids of the tiny vocabulary.
PROMPT_IDS = [[1] + [_rng.randrange(3, 300) for _ in range(n)] for n in (40, 7, 29, 55, 18)]


def make_llm(path: Path, windowed: bool, **kw) -> LLM:
    kw.setdefault("kv_cache_gb", 0.002)
    return LLM(
        model=str(path),
        mode="reference",
        device="cpu",
        block_size=BS,
        sliding_window_cache=windowed,
        **kw,
    )


def greedy(n: int = 24) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Every request at once; checks that each step leaves the sequences it ran no
    sliding-window block wholly before the window of the step's first query."""
    engine, kv = llm.engine, llm.engine.kv_cache
    for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", ids, p)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        starts = {id(s): s.num_computed_tokens for s in engine.scheduler.running}
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        for seq in engine.scheduler.running:
            start = starts.get(id(seq))
            if start is None or seq.num_computed_tokens <= start:
                continue  # admitted, preempted or not scheduled in this step
            for w, table in zip(kv.windows, seq.block_tables):
                if w is not None:
                    first = max(0, start - w + 1) // BS
                    assert table[:first] == [NULL_BLOCK] * first
    assert kv.num_used_blocks == 0
    return [out[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def kept(tiny_dir) -> LLM:
    """The engine that keeps every position of every layer (the layout before windows)."""
    return make_llm(tiny_dir, windowed=False)


@pytest.fixture(scope="module")
def baseline(kept) -> list[list[int]]:
    return run(kept, PROMPT_IDS, [greedy()] * len(PROMPT_IDS))


def test_layout(tiny_dir, kept):
    llm = make_llm(tiny_dir, windowed=True)
    windows = llm.engine.runner.kv_windows
    if "gemma3" in tiny_dir.name:  # a group per layer, the global one first
        assert windows == [None] + [WINDOW] * 5
    else:
        assert windows == [WINDOW]
    assert kept.engine.runner.kv_windows == [None]
    # The same bytes in blocks of one layer's K/V (Gemma) or of both layers' (Mistral).
    assert abs(llm.engine.runner.num_blocks - len(windows) * kept.engine.runner.num_blocks) < 8


def held_bytes(llm: LLM) -> int:
    runner = llm.engine.runner
    return llm.engine.kv_cache.num_used_blocks * bytes_per_block(
        runner.kv_groups, BS, runner.kv_dtype
    )


def test_greedy_same_tokens_in_fewer_bytes(tiny_dir, kept, baseline):
    """Token for token what the engine that keeps every position gives; a dozen tokens into
    the decode, well under the bytes it holds."""
    llm = make_llm(tiny_dir, windowed=True)
    engines = [kept.engine, llm.engine]
    for engine in engines:
        for i, ids in enumerate(PROMPT_IDS):
            engine.add_request(f"b{i}", ids, greedy())
    outs: list[dict[str, list[int]]] = [{}, {}]
    for step in range(200):
        for engine, out in zip(engines, outs):
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        if step == 12:
            assert len(llm.engine.scheduler.running) == len(PROMPT_IDS)
            assert held_bytes(llm) < 0.7 * held_bytes(kept)
        if not any(e.has_unfinished_requests() for e in engines):
            break
    assert outs[0] == outs[1]
    assert [outs[1][f"b{i}"] for i in range(len(PROMPT_IDS))] == baseline


@pytest.mark.parametrize("step_tokens", [5, 32])
def test_chunked_prefill(tiny_dir, baseline, step_tokens):
    """Chunks shorter than the window, and longer (a chunk's early queries read blocks that
    its end has left behind)."""
    llm = make_llm(tiny_dir, windowed=True, max_num_batched_tokens=step_tokens, max_num_seqs=3)
    assert run(llm, PROMPT_IDS, [greedy()] * len(PROMPT_IDS)) == baseline


def test_prefix_cache_hits(tiny_dir, kept):
    """A prompt that extends a finished one reuses its global blocks and the sliding blocks of
    the window at the match point; the output is what the cache-less engine gives."""
    llm = make_llm(tiny_dir, windowed=True)
    base = PROMPT_IDS[3]
    longer = [base + [7, 8, 9, 10, 11], base[:30] + [5] * 9, base + base[:6]]
    want = run(kept, longer, [greedy(12)] * 3)
    run(llm, [base], [greedy(4)])
    hits = llm.engine.kv_cache.num_prefix_hits
    assert run(llm, longer, [greedy(12)] * 3) == want
    assert llm.engine.kv_cache.num_prefix_hits - hits >= 3 * 28


def test_preemption(tiny_dir, baseline):
    """A cache that holds one long sequence, not every sequence at once."""
    probe = make_llm(tiny_dir, windowed=True, kv_cache_gb=0.0001)
    runner = probe.engine.runner
    num_blocks = 120 if len(runner.kv_windows) > 1 else 12
    gb = num_blocks * bytes_per_block(runner.kv_groups, BS, runner.kv_dtype) / (1 << 30)
    llm = make_llm(
        tiny_dir, windowed=True, kv_cache_gb=gb, max_num_batched_tokens=16, max_num_seqs=4
    )
    assert llm.engine.max_model_len > max(len(p) for p in PROMPT_IDS) + 24
    assert llm.engine.kv_cache.num_blocks == num_blocks
    assert run(llm, PROMPT_IDS, [greedy()] * len(PROMPT_IDS)) == baseline
    assert llm.engine.scheduler.num_preemptions > 0


def test_speculation(tiny_dir, baseline):
    ngram = make_llm(tiny_dir, windowed=True, ngram_speculation_length=3)
    assert run(ngram, PROMPT_IDS, [greedy()] * len(PROMPT_IDS)) == baseline
    predicted = make_llm(tiny_dir, windowed=True)
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, speculation=b[:10] + b[11:])
        for b in baseline
    ]
    assert run(predicted, PROMPT_IDS, params) == baseline
    draft = make_llm(tiny_dir, windowed=True, draft_model=str(tiny_dir), draft_token_count=3)
    assert run(draft, PROMPT_IDS, [greedy()] * len(PROMPT_IDS)) == baseline


def test_seeded_sampling(tiny_dir, kept):
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=i, ignore_eos=True)
        for i in range(len(PROMPT_IDS))
    ]
    want = run(kept, PROMPT_IDS, params)
    llm = make_llm(tiny_dir, windowed=True, max_num_batched_tokens=16)
    assert run(llm, PROMPT_IDS, params) == want


def test_gpu_path_reads_each_groups_block_tables(tiny_dir, baseline, tmp_path, monkeypatch):
    """The GPU path (Triton kernels under TRITON_INTERPRET, decode steps through the CUDA
    graphs' padded static buffers) with windows: every layer reads its group's block table
    (null blocks behind the window), token for token the CPU path's greedy output."""
    pytest.importorskip("triton")
    path, windows = tiny_dir, [WINDOW]
    if "gemma3" in tiny_dir.name:
        # Three layers, not six: local, global, local (a group each, the global one first);
        # the interpreter runs each kernel in Python, once per layer.
        local, full = "sliding_attention", "full_attention"
        path = write_tiny_sliding(tmp_path, "gemma3", layer_types=[local, full, local])
        windows = [None, WINDOW, WINDOW]
    llm = make_llm(path, windowed=True, gpu_path=True, max_num_seqs=8)
    runner = llm.engine.runner
    assert runner.gpu_path and runner.graphs is not None
    assert runner.kv_windows == windows
    assert runner.graphs.buffers.block_tables.shape[0] == len(runner.kv_groups)
    graph_steps = 0
    run_graphs = runner.graphs.run

    def counted(*args):
        nonlocal graph_steps
        graph_steps += 1
        return run_graphs(*args)

    monkeypatch.setattr(runner.graphs, "run", counted)
    # Three of the prompts (two past the window, one within it) and 12 tokens: the interpreter
    # runs each kernel in Python (the whole set took 40-115 s of the suite), and the prefill's
    # cost goes with its tokens: the shortest ones past the window (19 and 30 tokens: windows
    # past 2 and 4 blocks at the first decode step) rather than the 41 and 56
    chosen = [4, 1, 2]
    prompts = [PROMPT_IDS[i] for i in chosen]
    want = [baseline[i][:12] for i in chosen]
    if path != tiny_dir:
        want = run(make_llm(path, windowed=False), prompts, [greedy(12)] * len(prompts))
    assert run(llm, prompts, [greedy(12)] * len(prompts)) == want
    assert graph_steps > 10


def test_pressure_with_prefix_hits_duplicates_and_a_draft(tiny_dir, kept):
    """A cache that holds about one long sequence, under everything at once: requests that share
    a prefix and repeat (as n > 1 sends one request per choice), more than fit, and a draft
    model proposing tokens: preempted sequences come back through prefix-cache hits of their
    own and their neighbours' blocks, and every output is the ample cache's."""
    prompts = PROMPT_IDS + [PROMPT_IDS[0], PROMPT_IDS[3]] + [PROMPT_IDS[0][:33] + [5, 6, 7]]
    params = [greedy()] * len(prompts)
    want = run(kept, prompts, params)
    probe = make_llm(tiny_dir, windowed=True, kv_cache_gb=0.0001)
    runner = probe.engine.runner
    num_blocks = 120 if len(runner.kv_windows) > 1 else 12
    gb = num_blocks * bytes_per_block(runner.kv_groups, BS, runner.kv_dtype) / (1 << 30)
    for extra in ({}, {"draft_model": str(tiny_dir), "draft_token_count": 3}):
        llm = make_llm(
            tiny_dir, windowed=True, kv_cache_gb=gb, max_num_batched_tokens=16, max_num_seqs=4,
            **extra,
        )  # fmt: skip
        assert llm.engine.max_model_len > max(len(p) for p in prompts) + 24
        kv, matched = llm.engine.kv_cache, []
        match_prefix = kv.match_prefix

        def counted(seq, limit=None, match_prefix=match_prefix, matched=matched):
            match_prefix(seq, limit)
            if seq.num_preemptions:  # a preempted sequence back: its tokens found again
                matched.append(seq.num_computed_tokens)

        kv.match_prefix = counted
        assert run(llm, prompts, params) == want
        assert llm.engine.scheduler.num_preemptions > 0 and sum(matched) > 0
