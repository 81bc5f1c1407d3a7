"""Mixture-of-experts GGUF files as llama.cpp writes them (tests/model/moe_gguf_helpers.py): a
tiny Qwen3-MoE in a Q4_K_M-like mix (experts' gate/up Q4_K, down Q6_K, attention Q8_0/Q6_K/Q5_0,
embeddings Q8_0, output Q6_K) and a tiny Mixtral (`llama` with experts; Q8_0, Q5_0 and F16
experts; permuted Q/K), stacked and, as older Mixtral files, one tensor per expert. Their logits
equal transformers' on the same (dequantized) weights, transformers' own GGUF reader gets the
same from the Qwen3-MoE file and llama.cpp close to it from both, greedy generation through the
engine equals transformers', fast mode keeps the Q4_K experts' levels, and bad expert tensors and
unsupported routing keys are named."""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from moe_gguf_helpers import write_moe_gguf

from girandole import LLM, SamplingParams
from girandole.model.context import ForwardContext, forward_context
from girandole.model.kernels import wq_gemm
from girandole.model.loader import load_model
from girandole.model.moe import SparseMoE
from girandole.model.quant import Int4Linear, Int4x2Linear, Q6KLinear

IDS = [1, 17, 42, 99, 5, 250, 7, 7, 31, 64, 128, 3]
PROMPTS = ["Once upon a time there was a small engine", "def main():\n    return"]
MAX_NEW = 6
Q4_K_M = {
    "ffn_gate_exps": "Q4_K",
    "ffn_up_exps": "Q4_K",
    "ffn_down_exps": "Q6_K",
    "attn_q": "Q8_0",
    "attn_k": "Q8_0",
    "attn_v": "Q6_K",
    "attn_output": "Q5_0",  # its inputs (64) are too few for a K-quant block
    "token_embd": "Q8_0",
    "output": "Q6_K",
}
MIXTRAL_MIX = {
    "ffn_gate_exps": "Q8_0",
    "ffn_up_exps": "Q5_0",
    "ffn_down_exps": "F16",  # its inputs (48) are not whole blocks of 32
    "attn_q": "Q8_0",
    "attn_k": "Q5_0",
}


def tiny_qwen3_moe_256(folder: Path):
    """tests/conftest.py's tiny Qwen3-MoE made 256 wide (the K-quants' block), in memory: its
    config with hidden_size and moe_intermediate_size 256, random weights spread as conftest's
    writer spreads them (routers x30, LM head x8)."""
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(folder)
    config.hidden_size = config.moe_intermediate_size = 256
    torch.manual_seed(0)
    hf = tf.Qwen3MoeForCausalLM(config).float().eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
        for layer in hf.model.layers:
            layer.mlp.gate.weight.mul_(30.0)
    return hf


@pytest.fixture(scope="module")
def qwen3_moe_gguf(tiny_qwen3_moe_dir, tmp_path_factory):
    """(GGUF path, transformers reference) of the 256-wide tiny Qwen3-MoE in a Q4_K_M-like mix,
    with the tiny tokenizer."""
    hf = tiny_qwen3_moe_256(tiny_qwen3_moe_dir)
    path = tmp_path_factory.mktemp("qwen3-moe-gguf") / "tiny-qwen3moe.gguf"
    write_moe_gguf(hf, "qwen3moe", path, Q4_K_M, tokenizer=tiny_qwen3_moe_dir)
    return path, hf


@pytest.fixture(scope="module")
def mixtral_hf(tiny_mixtral_dir):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir).float().eval()


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_gguf(request, tmp_path_factory):
    """(architecture, GGUF path, transformers reference) of one tiny MoE file."""
    if request.param == "qwen3_moe":
        return "qwen3_moe", *request.getfixturevalue("qwen3_moe_gguf")
    hf = copy.deepcopy(request.getfixturevalue("mixtral_hf"))
    path = tmp_path_factory.mktemp("mixtral-gguf") / "tiny-mixtral.gguf"
    write_moe_gguf(hf, "llama", path, MIXTRAL_MIX, request.getfixturevalue("tiny_mixtral_dir"))
    return "mixtral", path, hf


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_reference_logits_match_transformers(moe_gguf):
    arch, path, hf = moe_gguf
    model, config = load_model(path, mode="reference", device="cpu", use_cache=False)
    assert config.architecture == arch
    moe = model.layers[0].mlp
    assert len(moe.experts) == hf.config.num_local_experts
    assert moe.top_k == 2 and moe.norm_topk_prob
    torch.testing.assert_close(logits(model, IDS), hf_logits(hf, IDS), atol=1e-4, rtol=0)


def test_older_mixtral_file_with_one_tensor_per_expert(mixtral_hf, tiny_mixtral_dir, tmp_path):
    """Mixtral files converted before llama.cpp stacked the experts (`blk.{i}.ffn_gate.{e}`)."""
    hf = copy.deepcopy(mixtral_hf)
    path = tmp_path / "tiny-mixtral-per-expert.gguf"
    write_moe_gguf(hf, "llama", path, MIXTRAL_MIX, tiny_mixtral_dir, per_expert=True)
    model, _ = load_model(path, mode="reference", device="cpu", use_cache=False)
    torch.testing.assert_close(logits(model, IDS), hf_logits(hf, IDS), atol=1e-4, rtol=0)


def test_fast_mode_keeps_the_q4_k_experts_packed(qwen3_moe_gguf):
    path, _hf = qwen3_moe_gguf
    ref, _ = load_model(path, mode="reference", device="cpu", use_cache=False)
    fast, _ = load_model(path, mode="fast", device="cpu", use_cache=False)
    expert = fast.layers[1].mlp.experts[7]
    assert isinstance(expert.gate_up, Int4Linear)  # the file's 4-bit levels as they are
    # Q6_K: its own format where the linears take the VNNI layout, else int8 groups of 32
    assert isinstance(expert.down, Q6KLinear if wq_gemm.vnni_default() else Int4x2Linear)
    a, b = logits(ref, IDS), logits(fast, IDS)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_transformers_reads_the_same_qwen3_moe_file(qwen3_moe_gguf):
    """An independent reader of the file's layout (experts stacked [E, out, in], gate and up
    apart): transformers' GGUF loader, given the model's config (it does not read
    expert_feed_forward_length), gets the same logits from the file."""
    import transformers as tf

    path, hf = qwen3_moe_gguf
    other = tf.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=hf.config, dtype=torch.float32
    ).eval()
    torch.testing.assert_close(hf_logits(other, IDS), hf_logits(hf, IDS), atol=1e-5, rtol=0)


def test_llama_cpp_computes_the_same_logits(moe_gguf):
    """llama.cpp itself (llama-cpp-python, the benchmarks' peer; skipped where it is not
    installed) reads each stacked file to the same greedy choices, and logits within its own
    rounding (float16 KV cache, activations quantized against Q4_K/Q6_K/Q8_0 weights: up to 1.3 %
    of the largest logit on the Qwen3-MoE file, 0.1 % on the Mixtral one): an independent reader
    of the layout (expert order, gate and up apart, Mixtral's permuted Q/K). Finer points (the
    top-k renormalisation moves these logits by 0.6 %) are the transformers tests' to check."""
    llama_cpp = pytest.importorskip("llama_cpp")
    arch, path, _hf = moe_gguf
    model, _ = load_model(path, mode="reference", device="cpu", use_cache=False)
    ours = logits(model, IDS)
    other = llama_cpp.Llama(
        model_path=str(path), n_ctx=32, logits_all=True, n_threads=2, verbose=False
    )
    other.eval(IDS)
    theirs = torch.from_numpy(np.array(other.scores[: len(IDS)], dtype=np.float32))
    other.close()
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    share = {"qwen3_moe": 0.02, "mixtral": 0.004}[arch]
    torch.testing.assert_close(theirs, ours, atol=share * float(ours.abs().max()), rtol=0)


def test_engine_greedy_matches_transformers(moe_gguf):
    """The file served by the engine (its tokenizer from the GGUF, prompts in prefill chunks of
    8 tokens) generates transformers' greedy tokens."""
    _arch, path, hf = moe_gguf
    llm = LLM(
        model=str(path),
        mode="reference",
        device="cpu",
        block_size=4,
        kv_cache_gb=0.01,
        max_num_batched_tokens=8,
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None
            )
        assert out.token_ids == gen[0, len(ids) :].tolist()


def _fewer_experts(hf) -> None:
    experts = hf.model.layers[1].mlp.experts
    experts.down_proj = torch.nn.Parameter(experts.down_proj.data[:-1])


def _narrower_gate_up(hf) -> None:
    experts = hf.model.layers[0].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.data[:, :-2])


@pytest.mark.parametrize(
    "change, extra, message",
    [
        (
            _fewer_experts,
            None,
            r"tensor 'blk\.1\.ffn_down_exps\.weight' has shape \[3, 64, 48\] \(\[experts, out, "
            r"in\]\), but the model's metadata implies \[4, 64, 48\]",
        ),
        (
            _narrower_gate_up,
            None,
            r"tensor 'blk\.0\.ffn_gate_exps\.weight' has shape \[4, 47, 64\].*implies \[4, 48, 64\]",
        ),
        (
            lambda hf: setattr(hf.config, "num_experts_per_tok", 5),
            None,
            r"llama\.expert_used_count \(5\) must be at most llama\.expert_count \(4\)",
        ),
        (
            lambda hf: delattr(hf.model.layers[1].mlp.experts, "down_proj"),
            None,
            r"is missing tensor 'blk\.1\.ffn_down_exps\.weight'",
        ),
        (
            None,
            lambda w: w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID),
            r"llama\.expert_gating_func 2",
        ),
        (None, lambda w: w.add_expert_shared_count(1), r"llama\.expert_shared_count 1"),
    ],
    ids=["expert-count", "expert-rows", "used-count", "missing", "sigmoid-gating", "shared-expert"],
)
def test_bad_moe_gguf_is_named(mixtral_hf, tmp_path, change, extra, message):
    hf = copy.deepcopy(mixtral_hf)
    if change is not None:
        change(hf)
    path = tmp_path / "bad.gguf"
    write_moe_gguf(hf, "llama", path, {}, extra=extra)
    with pytest.raises(ValueError, match=message):
        load_model(path, mode="reference", use_cache=False)


def one_decode_row() -> ForwardContext:
    """An engine step's context as the MoE layer reads it: one decode row."""
    return ForwardContext(torch.zeros(0, dtype=torch.long), [], [], [], num_decode_rows=1)


def test_a_lone_tokens_packed_experts_run_on_their_kernels_without_module_calls(qwen3_moe_gguf):
    """A decode row alone (batch 1) calls its k experts' native kernels directly, not through
    the expert modules (their calls, reshapes and casts cost about as much as a one-row
    kernel), and gets what the modules give: sum_j w_j * expert_j(x) in expert order."""
    fast, _ = load_model(qwen3_moe_gguf[0], mode="fast", device="cpu", use_cache=False)
    moe = next(m for m in fast.modules() if isinstance(m, SparseMoE))
    assert moe.experts[0].down.native_bits  # the 256-wide file's experts run natively
    x = torch.randn(1, moe.router.shape[1], generator=torch.Generator().manual_seed(2))
    calls = []
    hooks = [e.register_forward_hook(lambda *a: calls.append(1)) for e in moe.experts]
    try:
        with forward_context(one_decode_row()):
            y = moe(x)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
    ids, weights = moe.route(x)
    want = torch.zeros_like(x)
    with forward_context(one_decode_row()):
        for w, e in sorted(zip(weights[0], ids[0].tolist()), key=lambda p: p[1]):
            want += moe.experts[e](x.to(torch.bfloat16)).float() * w
    assert torch.equal(y, want)
