"""Decode steps as recorded native kernel calls (girandole/engine/cpu_graphs.py): a graph's step
is bitwise the eager forward's, for the default model (Gemma 3: post norms, local and global
rotary tables, sliding-window KV groups) and tiny Llama (rotary without QK norm), Qwen 2 (QKV
bias) and Qwen 3 (QK norm) checkpoints and mixtures of experts (tiny Qwen3-MoE, Mixtral and
gpt-oss: the block one recorded call; a Qwen3-MoE with native experts: its router, route and
experts as three native calls); generation with graphs equals generation without, through re-recording
when the context outgrows a graph's slot buffers, router replay's routing included; steps a
graph cannot run stay eager."""

from __future__ import annotations

import pytest
import torch

from girandole import LLM, SamplingParams
from girandole.engine import cpu_graphs
from girandole.model import kernels
from girandole.model.context import forward_context
from girandole.model.moe import SparseMoE

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="native kernels unavailable here (x86 with AVX512 VNNI and BF16, C compiler)",
)


def _llm(model=None, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_gb", 0.05)
    return LLM(model=None if model is None else str(model), mode="fast", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def default_llm():
    return _llm(max_num_seqs=8)


def _step_both_ways(llm: LLM, prompts: list[list[int]]) -> None:
    engine, runner = llm.engine, llm.engine.runner
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ids = [f"s{i}-{len(prompts)}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    engine.step()  # the prompts (chunked or not) and their first tokens
    while engine.scheduler.waiting:
        engine.step()
    batch = engine.scheduler.schedule()
    assert batch.num_new_tokens == [1] * len(prompts)
    tokens, pos, ctx = runner.prepare(batch.seqs, batch.num_new_tokens)
    assert runner.cpu_graphs is not None and runner.cpu_graphs.can_run(tokens, ctx)
    with torch.inference_mode():
        with forward_context(ctx):
            eager = runner.model(tokens, pos)
        graph = runner.cpu_graphs.run(tokens, pos, ctx)
    assert torch.equal(graph, eager)
    for rid in ids:
        engine.abort(rid)
    engine.step()


PROMPTS = [[2, 9, 27, 81, 50, 7, 11], [5 + i for i in range(40)], [7, 7, 8]]


@pytest.mark.parametrize("rows", [1, 3])
def test_default_model_step_is_the_eager_step(default_llm, rows):
    from girandole.model.quant import ConcatLinear

    assert len(default_llm.engine.runner.kv_groups) > 1  # local and global layers' groups
    # half its layers store v in Q8_0 beside q and k in Q5_0: those QKVs are recorded by part
    qkvs = [layer.self_attn.qkv for layer in default_llm.engine.runner.model.layers]
    assert sum(isinstance(q, ConcatLinear) for q in qkvs) == 9
    _step_both_ways(default_llm, PROMPTS[:rows])


@pytest.mark.parametrize("which", ["llama", "qwen2", "qwen3"])
def test_tiny_models_step_is_the_eager_step(which, tiny_llama_dir, tiny_qwen2_dir, tiny_qwen3_dir):
    path = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "qwen3": tiny_qwen3_dir}[which]
    llm = _llm(path, block_size=4)
    if which == "qwen2":  # the QKV bias is added in the graph as in the eager forward
        assert llm.engine.runner.model.layers[0].self_attn.qkv.bias is not None
    _step_both_ways(llm, PROMPTS)
    _step_both_ways(llm, PROMPTS[:1])


def test_attention_sinks_step_is_the_eager_step(tiny_llama_dir):
    """gpt-oss's attention sinks (one logit per query head) given to a tiny Llama's layers:
    the graph's attention calls take them as the eager native kernel does."""
    llm = _llm(tiny_llama_dir, block_size=4)
    g = torch.Generator().manual_seed(0)
    for layer in llm.engine.runner.model.layers:
        attn = layer.self_attn.attn
        attn.sinks = torch.randn(attn.num_heads, generator=g) * 2
    assert cpu_graphs.supported(llm.engine.runner.model)
    _step_both_ways(llm, PROMPTS)


def _generate(llm: LLM, prompts: list[str], max_tokens: int = 24):
    params = [
        SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=3, ignore_eos=True),
        SamplingParams(
            temperature=0.9, seed=7, max_tokens=max_tokens * 2 // 3, logprobs=3, ignore_eos=True
        ),
        SamplingParams(
            temperature=0.7, top_p=0.9, seed=3, max_tokens=max_tokens // 3, ignore_eos=True
        ),
    ]
    outs = llm.generate(prompts, params[: len(prompts)])
    return [(o.token_ids, [(lp.logprob, lp.top_logprobs) for lp in o.logprobs or []]) for o in outs]


def test_generation_equals_eager_through_re_recording(default_llm, monkeypatch):
    """Three requests of different lengths (the batch shrinks as they finish: graphs of 3, 2
    and 1 rows), graphs re-recorded as the slots outgrow them: the same tokens and log
    probabilities as with --enforce-eager."""
    monkeypatch.setattr(cpu_graphs, "MIN_SLOT_CAPACITY", 16)
    monkeypatch.setattr(cpu_graphs, "SLOT_HEADROOM", 16)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    graphs = default_llm.engine.runner.cpu_graphs
    graphs.graphs.clear()
    recorded = []
    real = cpu_graphs.CpuDecodeGraph.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        recorded.append((self.rows, self.capacity))

    monkeypatch.setattr(cpu_graphs.CpuDecodeGraph, "__init__", spy)
    with_graphs = _generate(default_llm, prompts)
    assert {rows for rows, _ in recorded} == {1, 2, 3}
    assert len(recorded) > 3  # some row count re-recorded for more slots
    eager = _llm(max_num_seqs=8, enforce_eager=True)
    assert eager.engine.runner.cpu_graphs is None
    assert _generate(eager, prompts) == with_graphs


def test_prefill_steps_stay_eager(default_llm):
    engine, runner = default_llm.engine, default_llm.engine.runner
    engine.add_request("p", [2, 5, 9, 11], SamplingParams(max_tokens=2))
    batch = engine.scheduler.schedule()  # a prefill
    tokens, _, ctx = runner.prepare(batch.seqs, batch.num_new_tokens)
    assert not runner.cpu_graphs.can_run(tokens, ctx)
    engine.abort("p")
    engine.step()


def test_caches_bound_anew_are_recorded_anew(default_llm):
    """A graph points into the KV caches it was recorded with: where the runner's layers hold
    other cache tensors, the graphs are recorded again (and the old tensors left alone)."""
    runner = default_llm.engine.runner
    _step_both_ways(default_llm, PROMPTS[:2])
    # the graph the step just ran: the most recently used. Not looked up by the thread count of
    # now: the engine's count follows the machine's load (cpu_threads.py) and may have moved
    # since the step (under CI's two workers it did: KeyError (2, 1))
    (rows, _), first = next(reversed(runner.cpu_graphs.graphs.items()))
    assert rows == 2
    attns = runner.attn_layers
    old = [(a.k_cache, a.v_cache) for a in attns]
    try:
        for a in attns:
            a.k_cache, a.v_cache = a.k_cache.clone(), a.v_cache.clone()
        untouched = [t.clone() for pair in old for t in pair]
        _step_both_ways(default_llm, PROMPTS[:2])
        (rows, _), latest = next(reversed(runner.cpu_graphs.graphs.items()))
        assert rows == 2 and latest is not first
        assert all(g is not first for g in runner.cpu_graphs.graphs.values())
        assert all(torch.equal(t, u) for t, u in zip((t for p in old for t in p), untouched))
    finally:  # back to the original tensors, with what the step wrote
        for a, (k, v) in zip(attns, old):
            k.copy_(a.k_cache)
            v.copy_(a.v_cache)
            a.k_cache, a.v_cache = k, v


def test_draft_model_proposes_through_graphs(tiny_llama_dir):
    """A draft model's proposals after the first are one-token decode steps: on CPU they run
    as graphs too. The model drafting for itself: every proposal accepted (the graph's greedy
    token is the verifying forward's), and the tokens of plain decoding."""
    prompts = [[2, 9, 27, 81, 50, 7, 11], [5 + i for i in range(20)]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = _llm(tiny_llama_dir, block_size=4).generate(prompts, params)
    spec = _llm(tiny_llama_dir, block_size=4, draft_model=str(tiny_llama_dir), draft_token_count=3)
    draft_runner = spec.engine.speculator.draft.runner
    assert draft_runner.cpu_graphs is not None
    engine = spec.engine
    tokens: dict[str, list[int]] = {}
    counts: dict[str, dict[str, int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            counts[out.request_id] = out.speculation
    assert [tokens[str(i)] for i in range(len(prompts))] == [o.token_ids for o in plain]
    assert draft_runner.cpu_graphs.graphs  # recorded and used
    for c in counts.values():
        assert c["accepted"] == c["proposed"] > 0


def test_verify_steps_run_as_graphs(tiny_llama_dir):
    """A step that verifies proposed tokens (here a prediction of the output) has several rows
    of one sequence: it runs as a graph of that many rows, with the tokens and log
    probabilities of plain decoding."""
    llm = _llm(tiny_llama_dir, block_size=4, max_num_seqs=4)
    prompts = [[2, 9, 27, 81, 50, 7, 11], [5 + i for i in range(20)]]
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True)
    plain = llm.generate(prompts, params)
    llm.engine.runner.cpu_graphs.graphs.clear()
    predicted = [
        SamplingParams(
            temperature=0, max_tokens=20, logprobs=2, ignore_eos=True, speculation=o.token_ids
        )
        for o in plain
    ]
    spec = llm.generate(prompts, predicted)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]

    # (sampling_logprob is the verifier's own float64 figure: compared are the reported ones)
    def reported(outs):
        return [[(r.token_id, r.logprob, r.top_logprobs) for r in o.logprobs] for o in outs]

    assert reported(spec) == reported(plain)
    assert max(m for m, _ in llm.engine.runner.cpu_graphs.graphs) > len(prompts)  # verify rows


def test_graphs_are_kept_per_thread_count_and_the_tokens_do_not_change(default_llm):
    """The engine's thread count follows the machine's load (engine/cpu_threads.py), and its
    requests' tokens and logprobs must not follow it: every kernel's numbers are the same at any
    count. A graph recorded at one count is kept beside the other's."""
    engine = default_llm.engine
    threads = engine.cpu_threads
    adaptive, most = threads.adaptive, threads.threads
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    prompts = PROMPTS[:2]

    def reported(outs):
        return [[(r.token_id, r.logprob, r.top_logprobs) for r in o.logprobs] for o in outs]

    threads.adaptive = False
    try:
        threads._set(1)
        one = reported(default_llm.generate(prompts, params))
        threads._set(2)
        two = reported(default_llm.generate(prompts, params))
    finally:
        threads._set(most)
        threads.adaptive = adaptive
    assert one == two
    assert {(2, 1), (2, 2)} <= set(engine.runner.cpu_graphs.graphs)


@pytest.fixture(scope="module")
def moe_llms(tiny_qwen3_moe_dir):
    """A tiny Qwen3-MoE with graphs and without (--enforce-eager)."""
    return _llm(tiny_qwen3_moe_dir, block_size=4), _llm(
        tiny_qwen3_moe_dir, block_size=4, enforce_eager=True
    )


@pytest.mark.parametrize("which", ["qwen3_moe", "qwen3_moe_64", "mixtral", "gpt_oss"])
def test_moe_step_is_the_eager_step(which, request):
    """A mixture-of-experts layer's attention, norms and residual adds are recorded as a dense
    layer's; its feed-forward, where its router and experts run natively (the Qwen3-MoE with
    experts 64 wide), as the router's, the route's and the experts' native calls, else as one
    call of the block's forward: bitwise the eager step, for one row (the block's lone-token
    path) and three (its sorted dispatch). gpt-oss too: its sinks, QKV and output biases,
    sliding-window groups and YaRN tables as recorded for dense models, its MoE block (biased
    router, clamped SwiGLU experts with biases) one call."""
    fixture = {"qwen3_moe": "tiny_qwen3_moe_dir", "qwen3_moe_64": "tiny_wide_qwen3_moe_dir",
               "mixtral": "tiny_mixtral_dir", "gpt_oss": "tiny_gpt_oss_dir"}[which]  # fmt: skip
    llm = _llm(request.getfixturevalue(fixture), block_size=4)
    layers = llm.engine.runner.model.layers
    assert all(isinstance(layer.mlp, SparseMoE) for layer in layers)
    _step_both_ways(llm, PROMPTS)
    _step_both_ways(llm, PROMPTS[:1])
    native = which == "qwen3_moe_64"
    assert native == all(layer.mlp.native_experts() is not None for layer in layers)
    graphs = llm.engine.runner.cpu_graphs.graphs.values()
    for graph in graphs:
        calls = [fn for fn, _ in graph.calls]
        assert calls.count(kernels.loader.library().moe_route) == (len(layers) if native else 0)
        assert calls.count(cpu_graphs._run_block) == (0 if native else len(layers))
    assert len(graphs) >= 2  # 3 rows, then 1


def _graph_steps(monkeypatch) -> list[tuple[int, bool]]:
    """Records each graph step: its rows, and whether its context asked for the routing (router
    replay)."""
    steps: list[tuple[int, bool]] = []
    real = cpu_graphs.CpuDecodeGraph.run

    def spy(self, ids, positions, ctx):
        steps.append((ids.shape[0], ctx.routing is not None))
        return real(self, ids, positions, ctx)

    monkeypatch.setattr(cpu_graphs.CpuDecodeGraph, "run", spy)
    return steps


def test_moe_generation_equals_eager(moe_llms, monkeypatch):
    graphs, eager = moe_llms
    assert graphs.engine.runner.cpu_graphs is not None
    assert eager.engine.runner.cpu_graphs is None
    steps = _graph_steps(monkeypatch)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    assert _generate(graphs, prompts) == _generate(eager, prompts)
    assert len(steps) > 10  # the decode steps ran as graphs


def test_moe_routing_matrix_through_graph_steps(moe_llms, monkeypatch):
    """include_routing_matrix: the MoE calls of a graph step append their expert ids to the
    step's routing list as the eager forward does; every generated token's routing (and the
    prompt's, eager) equals that of the eager engine's, also where the output was predicted
    (verify steps: several rows of one sequence in a graph)."""
    graphs, eager = moe_llms
    steps = _graph_steps(monkeypatch)
    base = dict(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0, routing_matrix=True)
    params = SamplingParams(**base, prompt_logprobs=0)
    prompts = PROMPTS[:2]
    outs = graphs.generate(prompts, params)
    assert steps and all(asked for _, asked in steps)  # decode steps as graphs, with routing

    def routing(outs):
        return [[r.routing.tolist() for r in o.prompt_logprobs[1:] + o.logprobs] for o in outs]

    got, want = routing(outs), routing(eager.generate(prompts, params))
    assert got == want
    layers = len(graphs.engine.runner.model.layers)
    assert all(len(r) == layers for o in got for r in o)

    steps.clear()
    predicted = [SamplingParams(**base, speculation=o.token_ids) for o in outs]
    spec = graphs.generate(prompts, predicted)
    assert max(rows for rows, _ in steps) > len(prompts)  # verify rows in a graph
    assert [[r.routing.tolist() for r in o.logprobs] for o in spec] == [
        [r.routing.tolist() for r in o.logprobs] for o in outs
    ]
