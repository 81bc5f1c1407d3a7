"""GGUF files (F32 and quantized tensors, llama.cpp's conventions) match transformers on the
same, dequantized, weights."""

from __future__ import annotations

import pytest
import torch
from model_helpers import hf_logits, paged_greedy, write_tiny_gguf, write_tiny_hf

from girandole.model.loader import load_model

PROMPTS = [[1, 17, 42, 99, 5, 250, 7, 7, 31, 64, 128, 3], [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11]]
MIXED = {
    "attn_q": "Q5_0",
    "attn_k": "Q8_0",
    "attn_v": "Q8_0",
    "attn_output": "Q4_0",
    "ffn_gate": "Q5_0",
    "ffn_up": "Q8_0",
    "ffn_down": "Q4_0",
    "token_embd": "Q8_0",
}
CASES = {
    "llama-f32": ("llama", {}),
    "llama-q": ("llama", MIXED),
    "llama3-rope-q": ("llama3", MIXED),
    "gemma3-f32": ("gemma3", {}),
    "gemma3-q": ("gemma3", MIXED),
    "qwen2-q": ("qwen2", MIXED),
    "qwen3-q": ("qwen3", MIXED),
}
ARCH = {"llama3": "llama"}


@pytest.fixture(scope="module", params=list(CASES.values()), ids=list(CASES))
def tiny_gguf(request, tmp_path_factory):
    kind, qtypes = request.param
    folder = tmp_path_factory.mktemp(f"gguf-{kind}")
    hf = write_tiny_hf(kind, folder / "hf", seed=1)
    if kind == "gemma3":  # GGUF has no query_pre_attn_scalar: llama.cpp uses head_dim
        hf.config.query_pre_attn_scalar = hf.config.head_dim
        for layer in hf.model.layers:
            layer.self_attn.scaling = hf.config.head_dim**-0.5
    arch = ARCH.get(kind, kind)
    path = folder / f"tiny-{arch}.gguf"
    write_tiny_gguf(hf, arch, path, qtypes)
    return arch, path, hf


def test_gguf_reference_logits_match_transformers(tiny_gguf):
    kind, path, hf = tiny_gguf
    model, config = load_model(path, mode="reference", device="cpu")
    assert config.architecture == kind
    assert config.bos_token_id == 1 and config.eos_token_ids[0] == 2
    assert config.name == f"tiny-{kind}"
    assert config.max_position == hf.config.max_position_embeddings
    for ids in PROMPTS:
        with torch.inference_mode():
            ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))
        torch.testing.assert_close(ours, hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_gguf_paged_greedy(tiny_gguf):
    _kind, path, hf = tiny_gguf
    model, _ = load_model(path, mode="reference", device="cpu")
    outs = paged_greedy(model, PROMPTS, max_new=6)
    for ids, out in zip(PROMPTS, outs):
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        assert out == gen[0, len(ids) :].tolist()


def test_gguf_fast_mode_close_to_reference(tiny_gguf):
    _kind, path, _hf = tiny_gguf
    ref, _ = load_model(path, mode="reference", device="cpu")
    fast, _ = load_model(path, mode="fast", device="cpu", use_cache=False)
    ids = PROMPTS[0]
    with torch.inference_mode():
        a = ref.compute_logits(ref(torch.tensor(ids), torch.arange(len(ids))))
        b = fast.compute_logits(fast(torch.tensor(ids), torch.arange(len(ids))))
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_llama_gguf_loads_in_transformers_too(tiny_gguf):
    """Independent check of the file conventions (Q/K permutation): transformers reads our
    test file and gets the same logits as the HF model it came from."""
    kind, path, hf = tiny_gguf
    if kind != "llama":
        pytest.skip("transformers' GGUF reader needs a full Gemma vocabulary")
    if hf.config.rope_parameters.get("rope_type", "default") != "default":
        pytest.skip("transformers' GGUF reader ignores rope_freqs (llama3 rope scaling)")
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = PROMPTS[0]
    torch.testing.assert_close(hf_logits(other, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_gpu_form_runs_and_is_close(tiny_gguf):
    """Fast mode as built for CUDA (bf16 dense weights, no CPU packed kernels), run here on
    the CPU: the same model code as the GPU will run."""
    from girandole.model.layers import DenseLinear
    from girandole.model.loader import build_model, read_checkpoint

    _kind, path, _hf = tiny_gguf
    spec, _config, weights = read_checkpoint(path)
    gpu_form = build_model(spec, weights, "fast", torch.device("cuda"))
    linears = [m for m in gpu_form.modules() if isinstance(m, DenseLinear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    ref, _ = load_model(path, mode="reference", device="cpu")
    ids = PROMPTS[0]
    with torch.inference_mode():
        a = ref.compute_logits(ref(torch.tensor(ids), torch.arange(len(ids))))
        b = gpu_form.compute_logits(gpu_form(torch.tensor(ids), torch.arange(len(ids))))
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
