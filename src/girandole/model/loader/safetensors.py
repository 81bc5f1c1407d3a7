"""Hugging Face checkpoints: a folder with config.json and *.safetensors (sharded or not)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from girandole.model.config import ModelConfig
from girandole.model.gemma3 import LOCAL_ROPE_THETA, SLIDING_WINDOW_PATTERN
from girandole.model.spec import ArchSpec

MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def _gguf_name(hf_name: str, arch: str) -> str | None:
    if hf_name == "lm_head.weight" or hf_name == "language_model.lm_head.weight":
        return "output.weight"
    for prefix in _PREFIXES:
        if hf_name.startswith(prefix):
            name = hf_name[len(prefix) :]
            break
    else:
        return None
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        return None
    i, rest = m.groups()
    if rest == "post_attention_layernorm.weight":
        rest_gguf = "post_attention_norm.weight" if arch == "gemma3" else "ffn_norm.weight"
    else:
        rest_gguf = _LAYER_NAMES.get(rest)
        if rest_gguf is None:
            return None
    return f"blk.{i}.{rest_gguf}"


class SafetensorsWeights:
    def __init__(self, folder: Path, arch: str) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {folder}")
        self.arch = arch
        self.handles = []
        self.names: dict[str, tuple[Any, str]] = {}
        for f in files:
            path = folder / f
            if not path.exists():
                raise FileNotFoundError(f"safetensors shard listed in the index is missing: {path}")
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise ValueError(f"not a valid safetensors file: {path} ({exc})") from exc
            self.handles.append(h)
            for hf_name in h.keys():
                name = _gguf_name(hf_name, arch)
                if name is not None:
                    self.names[name] = (h, hf_name)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def qtype(self, name: str) -> str:
        h, hf_name = self.names[name]
        dtype = h.get_slice(hf_name).get_dtype()
        return {"F32": "F32", "F16": "F16", "BF16": "BF16"}.get(dtype, dtype)

    def get(self, name: str) -> torch.Tensor:
        h, hf_name = self.names[name]
        t = h.get_tensor(hf_name).float()
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1.0  # Gemma's (1 + w) RMSNorm; GGUF files store w + 1
        return t


def _rope(cfg: dict[str, Any], key: str | None = None) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5 `rope_parameters` or 4.x rope_theta/rope_scaling."""
    params = cfg.get("rope_parameters")
    if params and key is not None and key in params:
        params = params[key]
    if params and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = params if params.get("rope_type", "default") != "default" else None
        return theta, scaling
    theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) == "default":
        scaling = None
    return theta, scaling


def read_safetensors(folder: str | os.PathLike) -> tuple[ArchSpec, ModelConfig, SafetensorsWeights]:
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type == "gemma3" and "text_config" in cfg:
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
        model_type = "gemma3_text"
    arch = MODEL_TYPES.get(model_type or "")
    if arch is None:
        raise ValueError(
            f"unsupported model_type {model_type!r} in {folder / 'config.json'} "
            f"(supported: {', '.join(sorted(MODEL_TYPES))})"
        )
    hidden = int(cfg["hidden_size"])
    num_heads = int(cfg["num_attention_heads"])
    num_layers = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    default_tie = arch == "gemma3"
    spec = ArchSpec(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=10000.0,
        max_position=max_pos,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", default_tie)),
        hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
    )
    if arch == "gemma3":
        spec.rope_theta, spec.rope_scaling = _rope(cfg, "full_attention")
        local = cfg.get("rope_local_base_freq")
        if local:
            spec.rope_local_theta = float(local)
        elif "sliding_attention" in (cfg.get("rope_parameters") or {}):
            spec.rope_local_theta = _rope(cfg, "sliding_attention")[0]
        else:
            spec.rope_local_theta = LOCAL_ROPE_THETA
        window = int(cfg.get("sliding_window") or 512)
        types = cfg.get("layer_types")
        if types is None:
            pattern = int(cfg.get("sliding_window_pattern") or SLIDING_WINDOW_PATTERN)
            types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(num_layers)
            ]
        spec.sliding_windows = [window if t == "sliding_attention" else None for t in types]
        spec.query_pre_attn_scalar = float(cfg.get("query_pre_attn_scalar") or head_dim)
        spec.final_logit_softcap = cfg.get("final_logit_softcapping")
        spec.attn_logit_softcap = cfg.get("attn_logit_softcapping")
        spec.hidden_act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    else:
        spec.rope_theta, spec.rope_scaling = _rope(cfg)
        window = cfg.get("sliding_window")
        use = cfg.get("use_sliding_window", model_type == "mistral")
        types = cfg.get("layer_types")
        if window and use:
            if types is not None:
                spec.sliding_windows = [
                    int(window) if t == "sliding_attention" else None for t in types
                ]
            else:
                spec.sliding_windows = [int(window)] * num_layers
        else:
            spec.sliding_windows = [None] * num_layers

    gen_path = folder / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    chat_template = tok_cfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if chat_template is None and jinja.exists():
        chat_template = jinja.read_text()
    if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in chat_template}
        chat_template = named.get("default") or next(iter(named.values()), None)

    eos: list[int] = []
    for source in (generation_config.get("eos_token_id"), cfg.get("eos_token_id")):
        for i in source if isinstance(source, list) else [source]:
            if i is not None and int(i) not in eos:
                eos.append(int(i))
    bos = generation_config.get("bos_token_id", cfg.get("bos_token_id"))
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is None:
        add_bos = arch in ("llama", "gemma3") and bos is not None

    config = ModelConfig.from_spec(
        spec,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos,
        add_bos_token=bool(add_bos),
        name=folder.name,
        generation_config=generation_config,
        chat_template=chat_template,
    )
    return spec, config, SafetensorsWeights(folder, arch)
