"""Helpers for the model tests: tiny random HF checkpoints, and running a model the way the
engine does (a flattened multi-sequence batch over a small paged KV cache)."""

from __future__ import annotations

from pathlib import Path

import torch

from girandole.model.attention import Attention
from girandole.model.context import ForwardContext, NativeSlots, PaddedDecode, forward_context

VOCAB = 300


def tiny_hf_config(kind: str, **overrides):
    """A transformers config with tiny sizes for one architecture variant (`overrides`: config
    fields to set otherwise)."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    gemma3 = {**common, "num_hidden_layers": 7, "num_key_value_heads": 1, **overrides}
    common.update(overrides)
    if kind == "llama":
        return tf.LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if kind == "llama3":  # rope scaling "llama3", tied embeddings (as Llama 3.2 1B)
        return tf.LlamaConfig(
            **common,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    if kind == "mistral":  # sliding window shorter than the test prompts
        return tf.MistralConfig(**common, sliding_window=5, head_dim=16)
    if kind == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    if kind == "qwen3_moe":  # 8 experts, top 2 renormalised; layer 1 dense (mlp_only_layers)
        return tf.Qwen3MoeConfig(
            **common,
            head_dim=16,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
        )
    if kind == "mixtral":  # 4 experts, top 2; a sliding window shorter than the test prompts
        return tf.MixtralConfig(
            **{**common, "intermediate_size": 48},
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=5,
        )
    if kind == "gemma3":
        return tf.Gemma3TextConfig(
            **gemma3,
            head_dim=32,
            sliding_window=5,
            query_pre_attn_scalar=24,
        )
    raise ValueError(kind)


def write_tiny_hf(kind: str, folder: Path, seed: int = 0, **overrides):
    """Write a random tiny checkpoint (config.json + model.safetensors); returns the HF model.
    `overrides`: config fields (tiny_hf_config)."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_hf_config(kind, **overrides)
    cls = tf.Gemma3ForCausalLM if kind == "gemma3" else tf.AutoModelForCausalLM
    model = cls.from_config(config) if cls is tf.AutoModelForCausalLM else cls(config)
    model = model.float().eval()
    with torch.no_grad():  # random init leaves norms at their identity value: perturb them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model


def write_tiny_gpt_oss(folder: Path, seed: int = 0):
    """A random tiny GptOss model saved to `folder` (fp32 safetensors); returns it. Sinks,
    biases and norms are perturbed well away from their init, and the experts' weights scaled
    up so that the SwiGLU's clamp at swiglu_limit cuts some values."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=3,  # sliding, full, sliding
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,  # shorter than the test prompts
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 64,
            "truncate": False,
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("sinks"):
                p.normal_(0, 1.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith("experts.gate_up_proj"):
                p.normal_(0, 0.5)
            elif name.endswith("experts.down_proj") or name.endswith("router.weight"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def attention_layers(model) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


class PagedRunner:
    """Runs a model over a paged KV cache as the engine does: one flattened batch per step.
    `native`: the CPU engine's view for the native paged attention kernel (every row through
    it, as the runner's NativeSlots); else the torch path, one sequence at a time."""

    def __init__(
        self,
        model,
        num_blocks: int = 64,
        block_size: int = 4,
        seed: int = 0,
        native: bool = False,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.native = native
        layers = attention_layers(model)
        device = next(model.buffers(), torch.empty(0)).device
        for layer in layers:
            shape = (num_blocks * block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, device=device)
            layer.v_cache = torch.zeros(shape, device=device)
        gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=gen).tolist()  # scattered blocks
        self.blocks: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def close(self) -> None:
        for layer in attention_layers(self.model):
            layer.k_cache = layer.v_cache = None

    def _slot(self, seq: int, pos: int) -> int:
        blocks = self.blocks.setdefault(seq, [])
        while len(blocks) * self.block_size <= pos:
            blocks.append(self.free.pop())
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def step(
        self, new_tokens: dict[int, list[int]], decode: bool = False, lora=None
    ) -> torch.Tensor:
        """Append `new_tokens` per sequence id; returns float32 logits [T, V] for all new rows.
        `lora`: the forward's LoRABatch (model/lora.py), if any."""
        ids, positions, slots, qlens, ctxs, ctx_slots = [], [], [], [], [], []
        for seq, toks in new_tokens.items():
            start = self.lens.get(seq, 0)
            for j, tok in enumerate(toks):
                ids.append(tok)
                positions.append(start + j)
                slots.append(self._slot(seq, start + j))
            self.lens[seq] = start + len(toks)
            qlens.append(len(toks))
            ctxs.append(self.lens[seq])
            ctx_slots.append(torch.tensor([self._slot(seq, p) for p in range(self.lens[seq])]))
        ctx = ForwardContext(
            slot_mapping=torch.tensor(slots),
            query_lens=qlens,
            context_lens=ctxs,
            context_slots=ctx_slots,
            lora=lora,
        )
        if self.native:
            ctx.native = NativeSlots.build(qlens, ctx_slots, torch.tensor(positions))
        elif decode:
            assert all(q == 1 for q in qlens)
            ctx.padded_decode = PaddedDecode.build(ctx_slots, torch.device("cpu"))
        with torch.inference_mode(), forward_context(ctx):
            hidden = self.model(torch.tensor(ids), torch.tensor(positions))
            return self.model.compute_logits(hidden)


def check_chunked_paged_logits(
    model, hf_model, prompts: list[list[int]], atol: float, native: bool = False
) -> None:
    """Several sequences in one flattened batch over the paged cache, then the rest of each
    prompt as a second (chunked) batch: every row's logits equal transformers' within atol.
    `native`: as PagedRunner's."""
    runner = PagedRunner(model, native=native)
    try:
        first = {i: p[: max(1, len(p) - 3)] for i, p in enumerate(prompts)}
        rest = {i: p[len(first[i]) :] for i, p in enumerate(prompts) if len(p) > len(first[i])}
        for batch, offset in ((first, lambda i: 0), (rest, lambda i: len(first[i]))):
            logits = runner.step(batch)
            row = 0
            for i, ids in batch.items():
                expect = hf_logits(hf_model, prompts[i])[offset(i) : offset(i) + len(ids)]
                torch.testing.assert_close(logits[row : row + len(ids)], expect, atol=atol, rtol=0)
                row += len(ids)
    finally:
        runner.close()


def paged_greedy(
    model, prompts: list[list[int]], max_new: int, native: bool = False
) -> list[list[int]]:
    """Greedy continuations of several prompts at once: one batched prefill, batched decodes.
    `native`: as PagedRunner's."""
    blocks = sum(len(p) + max_new for p in prompts) // 4 + 8
    runner = PagedRunner(model, num_blocks=blocks, native=native)
    try:
        logits = runner.step(dict(enumerate(prompts)))
        ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
        nxt = logits[ends].argmax(-1).tolist()
        outs = [[t] for t in nxt]
        for _ in range(max_new - 1):
            logits = runner.step({i: [o[-1]] for i, o in enumerate(outs)}, decode=True)
            for i, t in enumerate(logits.argmax(-1).tolist()):
                outs[i].append(t)
        return outs
    finally:
        runner.close()


# ---------------------------------------------------------------------------------------------
# Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them


def check_paged_greedy_matches_generate(model, hf_model, prompts: list[list[int]], max_new: int):
    """Greedy decoding over the paged cache gives transformers' generate's tokens."""
    ours = paged_greedy(model, prompts, max_new=max_new)
    for ids, out in zip(prompts, ours):
        with torch.no_grad():
            gen = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=None
            )
        assert out == gen[0, len(ids) :].tolist()


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute (rotate-half -> interleaved rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def write_tiny_gguf(hf_model, arch: str, path: Path, qtypes: dict[str, str]) -> None:
    """Write `hf_model` as a GGUF (`arch` "llama", "gemma3", "qwen2" or "qwen3"). `qtypes` maps a GGUF tensor
    suffix (e.g. "attn_q") to a quantization type name; others stay F32. The HF model's
    weights are replaced in place by their quantized-then-dequantized values, so it is the
    transformers reference for exactly the weights in the file."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = cfg.rope_parameters.get("full_attention", cfg.rope_parameters).get("rope_theta")
    w.add_rope_freq_base(float(theta))
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)

    rope = cfg.rope_parameters
    if rope.get("rope_type") == "llama3":  # llama.cpp stores the scaling as frequency divisors
        import math

        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))

    state = hf_model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output"
        elif hf_name == "model.embed_tokens.weight":
            name = "token_embd"
        elif hf_name == "model.norm.weight":
            name = "output_norm"
        else:
            parts = hf_name.split(".")
            i, rest = parts[2], ".".join(parts[3:-1])
            if rest == "post_attention_layernorm":
                gname = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
            else:
                gname = _HF_TO_GGUF[rest]
            name = f"blk.{i}.{gname}"
        suffix = name.split(".")[-1]
        kind = hf_name.rsplit(".", 1)[1]  # weight or bias
        data = tensor.detach().float().clone()
        qtype = qtypes.get(suffix) if kind == "weight" and data.dim() == 2 else None
        if qtype is not None:
            qt = gguf.GGMLQuantizationType[qtype]
            raw = quantize(data.numpy(), qt)
            data = torch.from_numpy(np.array(dequantize(raw, qt), dtype=np.float32))
            with torch.no_grad():
                tensor.copy_(data)  # the HF reference now holds exactly the file's values
        out = data
        if arch == "gemma3" and "norm" in name:
            out = out + 1.0
        if arch == "llama" and suffix in ("attn_q", "attn_k"):
            n = cfg.num_attention_heads if suffix == "attn_q" else cfg.num_key_value_heads
            out = _permute_rope(out, n)
        arr = out.numpy().astype(np.float32)
        if qtype is not None:
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(f"{name}.{kind}", quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(f"{name}.{kind}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def sink_attention_reference(q, k, v, q_pos, scale, window, sinks):
    """float64 attention of query rows q [T, H, D] at positions q_pos [T] of one sequence whose
    keys are k, v [ctx, Hkv, D] (by position), each head's sink logit one more softmax column
    without a value (transformers' eager_attention_forward for gpt-oss)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(heads // kv_heads, 1)
    vv = v.double().repeat_interleave(heads // kv_heads, 1)
    s = torch.einsum("thd,nhd->thn", q.double(), kk) * scale
    diff = q_pos[:, None] - torch.arange(len(k))[None, :]
    seen = diff >= 0
    if window:
        seen &= diff < window
    s = s.masked_fill(~seen[:, None, :], float("-inf"))
    column = sinks.double()[None, :, None].expand(len(q), heads, 1)
    p = torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("thn,nhd->thd", p, vv)


def compile_for_hopper(module: str, expression: str):
    """JSON `expression` evaluated, in a process without TRITON_INTERPRET, where `t` is the kernels
    module `girandole.model.kernels.<module>`: for the tests that compile Triton kernels to sm_90
    cubins (what the interpreter does not check: constexpr branches, tile shapes, shared memory).
    Skips where triton's CUDA backend has no bundled ptxas."""
    import json
    import os
    import subprocess
    import sys

    import pytest

    nvidia = pytest.importorskip("triton.backends.nvidia")
    if not (Path(nvidia.__file__).parent / "bin" / "ptxas").is_file():
        pytest.skip("triton's CUDA backend has no bundled ptxas here")
    import girandole

    script = (
        "import json\n"
        f"from girandole.model.kernels import {module} as t\n"
        f"print(json.dumps({expression}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    src = str(Path(girandole.__file__).parents[1])  # this checkout's sources
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
