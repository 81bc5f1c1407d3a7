"""Tiny mixture-of-experts GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes
them (Qwen3-MoE as `qwen3moe`, Mixtral as `llama` with an expert count; each layer's experts
stacked into `ffn_{gate,up,down}_exps` [experts, out, in], the router `ffn_gate_inp` kept F32),
from a transformers MoE model and its folder's byte-level BPE tokenizer."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize, quantize
from model_helpers import _HF_TO_GGUF, _permute_rope

CONTROL, NORMAL = 3, 1  # llama.cpp's token types


def root_conftest():
    """tests/conftest.py as a module (`import conftest` here finds tests/model/conftest.py)."""
    name = "_girandole_root_conftest"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look themselves up
        spec.loader.exec_module(module)
    return sys.modules[name]


def random_k_blocks(shape: tuple[int, ...], qtype: str, seed: int) -> np.ndarray:
    """Random Q4_K or Q6_K blocks (gguf-py quantizes neither) for a weight of `shape` ([..., in],
    in a multiple of 256): random levels under a fixed small float16 scale, about as big as the
    tiny models' initial weights and centred on zero. Returns the blocks' bytes
    [..., in / 256 * block bytes]."""
    rng = np.random.default_rng(seed)
    if shape[-1] % 256:
        raise ValueError(f"{qtype} needs inputs in multiples of 256, got {shape}")
    rows, blocks = int(np.prod(shape[:-1])), shape[-1] // 256
    if qtype == "Q4_K":  # d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of levels
        b = rng.integers(0, 256, size=(rows * blocks, 144), dtype=np.uint8)
        # mins equal to scales (bytes 4-7 as 0-3; the shared bytes' high nibble as the low
        # one) and dmin = 7.5 d: each weight d * sc * (q - 7.5)
        b[:, 8:12] = b[:, 4:8]
        b[:, 12:16] = (b[:, 12:16] & 0x0F) * 0x11
        b[:, 0:2] = np.array([1e-4], dtype=np.float16).view(np.uint8)
        b[:, 2:4] = np.array([7.5e-4], dtype=np.float16).view(np.uint8)
    elif qtype == "Q6_K":  # 192 bytes of levels, 16 int8 scales, float16 d
        b = rng.integers(0, 256, size=(rows * blocks, 210), dtype=np.uint8)
        b[:, 208:210] = np.array([2e-5], dtype=np.float16).view(np.uint8)
    else:
        raise ValueError(qtype)
    return b.reshape(*shape[:-1], -1)


def _store(w, name: str, data: torch.Tensor, qtype: str | None, seed: int) -> torch.Tensor:
    """Add tensor `name` ([..., in] float32 `data`) in `qtype` (None: F32; F16; a type gguf-py
    quantizes; Q4_K/Q6_K: random blocks instead of `data`); returns the values the file holds."""
    arr = data.numpy().astype(np.float32)
    if qtype is None:
        w.add_tensor(name, arr)
        return data
    if qtype == "F16":
        w.add_tensor(name, arr.astype(np.float16))
        return torch.from_numpy(arr.astype(np.float16).astype(np.float32))
    qt = gguf.GGMLQuantizationType[qtype]
    raw = (
        random_k_blocks(arr.shape, qtype, seed) if qtype in ("Q4_K", "Q6_K") else quantize(arr, qt)
    )
    w.add_tensor(name, raw, raw_dtype=qt)
    return torch.from_numpy(np.array(dequantize(raw, qt), dtype=np.float32).reshape(arr.shape))


def add_bpe_tokenizer(w, folder: Path) -> None:
    """The folder's tokenizer.json (byte-level BPE, <s>/</s>) as a `gpt2` GGUF tokenizer."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([CONTROL if t in specials else NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_add_bos_token(True)


def write_moe_gguf(
    hf_model,
    arch: str,
    path: Path,
    qtypes: dict[str, str],
    tokenizer: Path | None = None,
    per_expert: bool = False,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> None:
    """Write a transformers Qwen3-MoE (`arch` "qwen3moe") or Mixtral ("llama") as a GGUF.
    `qtypes` maps a GGUF tensor suffix ("ffn_gate_exps", "attn_q", ...) to a type: F16, a type
    gguf-py quantizes, or Q4_K/Q6_K (random blocks: those weights are replaced); others stay F32.
    The model's weights are replaced in place by the file's values, so it is the transformers
    reference for exactly the file's weights. `tokenizer`: a folder whose tokenizer.json goes in
    (else placeholder tokens); `per_expert`: Mixtral's older layout, one tensor per expert
    (`blk.{i}.ffn_gate.{e}.weight`); `extra(writer)`: more metadata."""
    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-moe")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if extra is not None:
        extra(w)
    if tokenizer is not None:
        add_bpe_tokenizer(w, tokenizer)
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)

    seed = 0
    for hf_name, tensor in hf_model.state_dict().items():
        seed += 1
        data = tensor.detach().float().clone()
        if hf_name == "lm_head.weight":
            name = "output.weight"
        elif hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        else:
            parts = hf_name.split(".")
            i, rest = parts[2], ".".join(parts[3:])
            if rest == "mlp.gate.weight":  # the router: llama.cpp never quantizes it
                w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", data.numpy())
                continue
            if rest.startswith("mlp.experts."):
                _experts(w, i, rest, tensor, qtypes, per_expert, seed)
                continue
            rest, kind = rest.rsplit(".", 1)
            gname = "ffn_norm" if rest == "post_attention_layernorm" else _HF_TO_GGUF[rest]
            name = f"blk.{i}.{gname}.{kind}"
        suffix = name.split(".")[-2]
        qtype = qtypes.get(suffix) if data.dim() == 2 else None
        if arch == "llama" and suffix in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if suffix == "attn_q" else cfg.num_key_value_heads
            held = _unpermute_rope(_store(w, name, _permute_rope(data, heads), qtype, seed), heads)
        else:
            held = _store(w, name, data, qtype, seed)
        with torch.no_grad():
            tensor.copy_(held)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of _permute_rope (interleaved rows -> rotate-half)."""
    return w.reshape(n_head, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _experts(w, i: str, rest: str, tensor, qtypes, per_expert: bool, seed: int) -> None:
    """transformers' fused expert parameters (gate_up_proj [E, 2I, H], gate rows first;
    down_proj [E, H, I]) as llama.cpp's stacked tensors, values written back into them."""
    data = tensor.detach().float().clone()
    if rest == "mlp.experts.gate_up_proj":
        inter = data.shape[1] // 2
        parts = {"ffn_gate": data[:, :inter], "ffn_up": data[:, inter:]}
    else:
        parts = {"ffn_down": data}
    held = []
    for k, (proj, values) in enumerate(parts.items()):
        qtype = qtypes.get(f"{proj}_exps")
        if per_expert:
            held.append(torch.stack([
                _store(w, f"blk.{i}.{proj}.{e}.weight", v.contiguous(), qtype, seed * 100 + e)
                for e, v in enumerate(values)
            ]))  # fmt: skip
        else:
            held.append(
                _store(w, f"blk.{i}.{proj}_exps.weight", values.contiguous(), qtype, seed + k)
            )
    with torch.no_grad():
        tensor.copy_(torch.cat(held, dim=1))
