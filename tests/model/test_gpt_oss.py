"""gpt-oss (GptOssForCausalLM): tiny random checkpoints, dense and with MXFP4 experts as the
released models ship them, against transformers' implementation: attention sinks, alternating
sliding-window layers, YaRN rope, biased router and experts with the clamped SwiGLU."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import (
    check_chunked_paged_logits,
    check_paged_greedy_matches_generate,
    hf_logits,
    paged_greedy,
    write_tiny_gpt_oss,
)
from safetensors.torch import save_file

from girandole.model.attention import Attention
from girandole.model.kernels import paged_attention
from girandole.model.loader import load_model
from girandole.model.loader.fused_experts import FP4_VALUES, dequantize_mxfp4

PROMPTS = [
    [1, 17, 42, 99, 5, 250, 7, 7, 31, 64, 128, 3],
    [1, 200],
    [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
]
ATOL = 1e-4


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16] uint8, scales [..., K/32]
    uint8): each group's power-of-two scale puts its largest magnitude at most 6, each value
    the nearest E2M1 code."""
    groups = w.float().unflatten(-1, (-1, 32))
    amax = groups.abs().amax(-1).clamp(min=2.0**-100)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def write_mxfp4(hf, folder) -> None:
    """Save `hf` as the released checkpoints store gpt-oss: experts as MXFP4 blocks and scales
    ([E, out, in/32, 16], Linear layout). The HF model's experts are replaced by the values
    transformers' own MXFP4 conversion reads back, so it is the reference for the file."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = {}
    for name, t in hf.state_dict().items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            blocks, scales = quantize_mxfp4(t.transpose(1, 2))  # [E, out, in]
            with torch.no_grad():
                dq = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
                t.copy_(dq)
            state[f"{name}_blocks"] = blocks.contiguous()
            state[f"{name}_scales"] = scales.contiguous()
        else:
            state[name] = t.contiguous()
    save_file(state, str(folder / "model.safetensors"))
    cfg = hf.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt-oss")
    hf = write_tiny_gpt_oss(folder)
    model, config = load_model(folder, mode="reference", device="cpu")
    return folder, hf, model, config


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt-oss-mxfp4")
    hf = write_tiny_gpt_oss(folder, seed=1)
    (folder / "model.safetensors").unlink()
    write_mxfp4(hf, folder)
    model, config = load_model(folder, mode="reference", device="cpu")
    return folder, hf, model, config


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))


def test_config_fields(dense):
    _folder, hf, model, config = dense
    assert config.architecture == "gpt_oss"
    assert config.num_moe_layers == 3 and config.moe_top_k == 2
    windows = [layer.self_attn.attn.sliding_window for layer in model.layers]
    assert windows == [4, None, 4]
    assert model.rotary.attention_factor == pytest.approx(0.1 * torch.log(torch.tensor(4.0)) + 1)
    assert 2 in config.eos_token_ids


def test_logits_match_transformers(dense):
    _folder, hf, model, _config = dense
    for ids in PROMPTS:
        torch.testing.assert_close(_logits(model, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_swiglu_clamp_is_exercised(dense):
    """The experts' gate/up values pass swiglu_limit somewhere on the prompts (else the clamp
    would go untested)."""
    _folder, _hf, model, _config = dense
    seen = []
    hooks = [
        e.gate_up.register_forward_hook(lambda _m, _i, out: seen.append(out.abs().max()))
        for layer in model.layers
        for e in layer.mlp.experts
    ]
    try:
        _logits(model, PROMPTS[2])
    finally:
        for h in hooks:
            h.remove()
    assert max(seen) > 7.0


def test_sinks_matter(dense):
    """Zeroed sinks change the logits: the sinks are read, not ignored."""
    _folder, hf, model, _config = dense
    ids = PROMPTS[0]
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [a.sinks.clone() for a in layers]
    try:
        for a in layers:
            a.sinks.zero_()
        without = _logits(model, ids)
    finally:
        for a, s in zip(layers, saved):
            a.sinks.copy_(s)
    assert (without - hf_logits(hf, ids)).abs().max() > 1e-2


def test_paged_cache_matches_transformers(dense):
    """A flattened batch of prompts, chunked continuations, then the engine's decode paths."""
    _folder, hf, model, _config = dense
    check_chunked_paged_logits(model, hf, PROMPTS, ATOL)


def test_paged_greedy_matches_transformers_generate(dense):
    _folder, hf, model, _config = dense
    check_paged_greedy_matches_generate(model, hf, PROMPTS, max_new=8)


@pytest.mark.skipif(
    not paged_attention.supported(16, torch.zeros(1), None), reason="no native kernels here"
)
def test_native_paged_attention_with_sinks(dense, monkeypatch):
    """The CPU engine's path: every attention row through the native kernel, sinks included
    (sliding and full layers, prefill chunks and decode rows). Logits equal transformers',
    greedy tokens equal the torch path's (one sequence at a time), and every layer call went
    through the kernel with its sinks."""
    _folder, hf, model, _config = dense
    calls = []
    kernel = paged_attention.paged_attention

    def counted(*args, **kwargs):
        calls.append(args[8] if len(args) > 8 else kwargs.get("sinks"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(paged_attention, "paged_attention", counted)
    check_chunked_paged_logits(model, hf, PROMPTS, ATOL, native=True)
    assert len(calls) == 2 * len(model.layers) and all(s is not None for s in calls)
    native = paged_greedy(model, PROMPTS, max_new=8, native=True)
    torch_path = paged_greedy(model, PROMPTS, max_new=8)
    assert native == torch_path


def test_fast_mode_close_to_reference(dense):
    folder, _hf, ref, _config = dense
    fast, _ = load_model(folder, mode="fast", device="cpu", use_cache=False)
    ids = PROMPTS[2]
    a, b = _logits(ref, ids), _logits(fast, ids)
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_mxfp4_dequantization_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), dtype=torch.uint8)
    scales = torch.randint(117, 137, (3, 8, 4), dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales)  # [3, 8, 128]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [3, 128, 8]
    assert torch.equal(ours, theirs.transpose(1, 2))


def test_mxfp4_checkpoint_matches_transformers(mxfp4):
    _folder, hf, model, _config = mxfp4
    for ids in PROMPTS:
        torch.testing.assert_close(_logits(model, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_mxfp4_fast_mode_close_to_reference(mxfp4):
    """Fast mode's quantized experts (and bf16 activations) stay close; a row whose router
    sits near a tie may pick another expert there, so one row may drift further."""
    folder, _hf, ref, _config = mxfp4
    fast, _ = load_model(folder, mode="fast", device="cpu", use_cache=False)
    ids = PROMPTS[0]
    cos = torch.nn.functional.cosine_similarity(_logits(ref, ids), _logits(fast, ids), dim=-1)
    assert cos.median() > 0.999
    assert cos.min() > 0.95


def test_mxfp4_missing_scales_is_a_clear_error(mxfp4, tmp_path):
    from safetensors.torch import load_file

    folder = mxfp4[0]
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="down_proj_blocks has no .*down_proj_scales"):
        load_model(tmp_path, mode="reference", device="cpu")


@pytest.mark.parametrize(
    "extra",
    [{"truncate": False}, {}, {"beta_fast": 16.0, "beta_slow": 2.0},
     {"mscale": 1.0, "mscale_all_dim": 0.5}, {"attention_factor": 1.3}],
)  # fmt: skip
def test_yarn_matches_transformers(extra):
    """YaRN's frequencies and cos/sin factor as transformers computes them, for the variants
    its parameters allow (gpt-oss's truncate false; Qwen's defaults; DeepSeek's mscale)."""
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from girandole.model.layers import rope_attention_factor, rope_inv_freq

    scaling = {
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        **extra,
    }
    config = tf.Qwen3Config(
        hidden_size=64, num_attention_heads=4, head_dim=64, max_position_embeddings=131072,
        rope_parameters=scaling,
    )  # fmt: skip
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    torch.testing.assert_close(rope_inv_freq(64, 150000.0, scaling), inv_freq, atol=0, rtol=1e-6)
    assert rope_attention_factor(scaling) == pytest.approx(factor, rel=1e-7)
