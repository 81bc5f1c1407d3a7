"""Hugging Face checkpoints: a folder with config.json and *.safetensors (sharded or not)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from girandole.model.config import ModelConfig
from girandole.model.gemma3 import LOCAL_ROPE_THETA, SLIDING_WINDOW_PATTERN
from girandole.model.loader.fused_experts import FUSED_EXPERTS, ExpertSlice, split_fused_experts
from girandole.model.pooling_config import decoder_embedding
from girandole.model.spec import (
    REQUIRED,
    ArchSpec,
    check_token_id,
    config_number,
    validate_spec,
)
from girandole.sampling.params import SamplingParams

log = logging.getLogger(__name__)

MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gpt_oss": "gpt_oss",
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
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.sinks": "attn_sinks.weight",  # gpt-oss
    "mlp.router.weight": "ffn_gate_inp.weight",  # gpt-oss's router, with a bias
    "mlp.router.bias": "ffn_gate_inp.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
# Mixture-of-experts layers: the router and each expert's projections (model/moe.py's names).
_MOE_NAME = re.compile(
    r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight"
)
_EXPERT_PROJECTIONS = {
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
    "w1": "ffn_gate",  # Mixtral's names
    "w3": "ffn_up",
    "w2": "ffn_down",
}
_ROUTER_NAMES = ("mlp.gate.weight", "block_sparse_moe.gate.weight")
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
    if rest in _ROUTER_NAMES:
        return f"blk.{i}.ffn_gate_inp.weight"
    expert = _MOE_NAME.fullmatch(rest)
    if expert is not None:
        e, proj = expert.groups()
        return f"blk.{i}.exp.{e}.{_EXPERT_PROJECTIONS[proj]}.weight"
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
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: weight_map must be an object, got {weight_map!r}")
            files = sorted(set(map(str, weight_map.values())))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {folder}")
        self.arch = arch
        self.handles = []
        self.names: dict[str, tuple[Any, str]] = {}
        fused: dict[str, Any] = {}  # gpt-oss's all-experts tensors: HF name -> handle
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
                if arch == "gpt_oss" and FUSED_EXPERTS.fullmatch(hf_name):
                    fused[hf_name] = h
                    continue
                name = _gguf_name(hf_name, arch)
                if name is not None:
                    self.names[name] = (h, hf_name)
        # one slice per expert and projection, read on its own (loader/fused_experts.py)
        self.experts: dict[str, ExpertSlice] = split_fused_experts(fused, str(folder))

    def __contains__(self, name: str) -> bool:
        return name in self.names or name in self.experts

    def qtype(self, name: str) -> str:
        if name in self.experts:
            return self.experts[name].qtype
        h, hf_name = self.names[name]
        dtype = h.get_slice(hf_name).get_dtype()
        return {"F32": "F32", "F16": "F16", "BF16": "BF16"}.get(dtype, dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from the file's header, without reading it."""
        if name in self.experts:
            return self.experts[name].shape()
        h, hf_name = self.names[name]
        return tuple(h.get_slice(hf_name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name in self.experts:
            return self.experts[name].get()
        h, hf_name = self.names[name]
        t = h.get_tensor(hf_name).float()
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1.0  # Gemma's (1 + w) RMSNorm; GGUF files store w + 1
        return t


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; ValueError naming the file otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value


def _int(cfg: dict[str, Any], key: str, source: Path, default: Any = REQUIRED) -> Any:
    return config_number(cfg.get(key), int, f"{source}: {key}", default)


def _float(cfg: dict[str, Any], key: str, source: Path, default: Any = REQUIRED) -> Any:
    return config_number(cfg.get(key), float, f"{source}: {key}", default)


def _rope(cfg: dict[str, Any], source: Path, key: str | None = None) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5 `rope_parameters` or 4.x rope_theta/rope_scaling."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"{source}: rope_parameters must be an object, got {params!r}")
    if params and key is not None and key in params:
        params = params[key]
        if not isinstance(params, dict):
            raise ValueError(f"{source}: rope_parameters.{key} must be an object, got {params!r}")
    if params and "rope_theta" in params:
        theta = _float(params, "rope_theta", source)
        scaling = params if params.get("rope_type", "default") != "default" else None
        return theta, scaling
    theta = _float(cfg, "rope_theta", source, 10000.0)
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"{source}: rope_scaling must be an object, got {scaling!r}")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) == "default":
        scaling = None
    return theta, scaling


# Sampling defaults a generation_config.json may set (the request fields they stand in for).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty")


def _sampling_default_error(key: str, value: Any) -> str | None:
    """Why `value` cannot be the default of SamplingParams field `key`, or None if it can."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "not a number"
    if key == "top_k" and not float(value).is_integer():
        return "not an integer"
    if key == "top_p" and value == 0:
        return None  # a nucleus of 0: greedy (as the server reads a request's top_p 0)
    try:
        SamplingParams(**{key: int(value) if key == "top_k" else value})
    except ValueError as exc:
        return str(exc)
    return None


def checked_generation_config(path: Path, vocab_size: int) -> dict[str, Any]:
    """generation_config.json with each sampling default or token id no request could use
    dropped, with a warning (the model still serves, on the built-in defaults); {} for a
    missing or unreadable file."""
    if not path.exists():
        return {}
    try:
        config = read_json_object(path)
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    for key in SAMPLING_KEYS:
        value = config.get(key)
        problem = None if value is None else _sampling_default_error(key, value)
        if problem is not None:
            log.warning("ignoring %s in %s: %r (%s)", key, path, value, problem)
            del config[key]
    for key in ("bos_token_id", "eos_token_id"):
        value = config.get(key)
        ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
        if value is not None and not all(_token_id_ok(i, vocab_size) for i in ids):
            log.warning(
                "ignoring %s in %s: %r (not token ids in [0, %d))", key, path, value, vocab_size
            )
            del config[key]
    return config


def _token_id_ok(value: Any, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


def read_safetensors(folder: str | os.PathLike) -> tuple[ArchSpec, ModelConfig, SafetensorsWeights]:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"model folder has no config.json: {folder}")
    cfg = read_json_object(cfg_path)
    top = cfg
    model_type = cfg.get("model_type")
    if model_type == "gemma3" and "text_config" in cfg:
        text = cfg["text_config"]
        if not isinstance(text, dict):
            raise ValueError(f"{cfg_path}: text_config must be an object, got {text!r}")
        cfg = {**text, "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
        model_type = "gemma3_text"
    arch = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise ValueError(
            f"unsupported model_type {model_type!r} in {cfg_path} "
            f"(supported: {', '.join(sorted(MODEL_TYPES))})"
        )
    hidden = _int(cfg, "hidden_size", cfg_path)
    num_heads = _int(cfg, "num_attention_heads", cfg_path)
    num_layers = _int(cfg, "num_hidden_layers", cfg_path)
    derived_head_dim = cfg.get("head_dim") is None
    head_dim = _int(cfg, "head_dim", cfg_path, hidden // num_heads if num_heads > 0 else 0)
    default_tie = arch == "gemma3"
    spec = ArchSpec(
        architecture=arch,
        vocab_size=_int(cfg, "vocab_size", cfg_path),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", cfg_path),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=_int(cfg, "num_key_value_heads", cfg_path, num_heads),
        head_dim=head_dim,
        rms_norm_eps=_float(cfg, "rms_norm_eps", cfg_path, 1e-6),
        rope_theta=10000.0,
        max_position=_int(cfg, "max_position_embeddings", cfg_path, 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", default_tie)),
        hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
    )
    types = cfg.get("layer_types")
    if types is not None and not isinstance(types, list):
        raise ValueError(f"{cfg_path}: layer_types must be a list, got {types!r}")
    if arch == "gemma3":
        spec.rope_theta, spec.rope_scaling = _rope(cfg, cfg_path, "full_attention")
        local = _float(cfg, "rope_local_base_freq", cfg_path, None)
        if local:
            spec.rope_local_theta = local
        elif "sliding_attention" in (cfg.get("rope_parameters") or {}):
            spec.rope_local_theta = _rope(cfg, cfg_path, "sliding_attention")[0]
        else:
            spec.rope_local_theta = LOCAL_ROPE_THETA
        window = _int(cfg, "sliding_window", cfg_path, None) or 512
        if types is None:
            pattern = _int(cfg, "sliding_window_pattern", cfg_path, None) or SLIDING_WINDOW_PATTERN
            types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(num_layers)
            ]
        spec.sliding_windows = [window if t == "sliding_attention" else None for t in types]
        spec.query_pre_attn_scalar = _float(cfg, "query_pre_attn_scalar", cfg_path, None) or float(
            head_dim
        )
        spec.final_logit_softcap = _float(cfg, "final_logit_softcapping", cfg_path, None)
        spec.attn_logit_softcap = _float(cfg, "attn_logit_softcapping", cfg_path, None)
        spec.hidden_act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    else:
        spec.rope_theta, spec.rope_scaling = _rope(cfg, cfg_path)
        window = _int(cfg, "sliding_window", cfg_path, None)
        # Mistral and Mixtral use the window whenever the config sets one; Qwen only with
        # use_sliding_window (as transformers reads them)
        use = cfg.get("use_sliding_window", model_type in ("mistral", "mixtral", "gpt_oss"))
        if types is None and model_type == "gpt_oss":  # transformers' default: alternating
            types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
            ]
        if window and use:
            if types is not None:
                spec.sliding_windows = [window if t == "sliding_attention" else None for t in types]
            else:
                spec.sliding_windows = [window] * num_layers
        else:
            spec.sliding_windows = [None] * num_layers
    if arch in ("qwen3_moe", "mixtral", "gpt_oss"):
        _read_moe(spec, cfg, cfg_path, arch)
    validate_spec(spec, str(cfg_path), _HF_KEYS, derived_head_dim=derived_head_dim)

    generation_config = checked_generation_config(
        folder / "generation_config.json", spec.vocab_size
    )
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = read_json_object(tok_cfg_path) if tok_cfg_path.exists() else {}
    chat_template = tok_cfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if chat_template is None and jinja.exists():
        chat_template = jinja.read_text()
    if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        chat_template = named.get("default") or next(iter(named.values()), None)
    if chat_template is not None and not isinstance(chat_template, str):
        log.warning("ignoring the chat_template of %s: not a string", tok_cfg_path)
        chat_template = None

    # config.json's token ids must be in the vocabulary, used or not (a broken file);
    # generation_config.json's are already checked.
    for key in ("bos_token_id", "eos_token_id"):
        value = cfg.get(key)
        for i in value if isinstance(value, list) else [value]:
            if i is not None:
                check_token_id(i, spec.vocab_size, str(cfg_path), key)
    eos: list[int] = []
    for value in (generation_config.get("eos_token_id"), cfg.get("eos_token_id")):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in eos:
                eos.append(i)
    bos = generation_config.get("bos_token_id", cfg.get("bos_token_id"))
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is None:
        add_bos = arch in ("llama", "mixtral", "gemma3") and bos is not None

    config = ModelConfig.from_spec(
        spec,
        bos_token_id=bos,
        eos_token_ids=eos,
        add_bos_token=bool(add_bos),
        name=folder.name,
        generation_config=generation_config,
        chat_template=chat_template,
    )
    # Qwen3-Embedding (its sentence-transformers files), Qwen3-Reranker (its name)
    config.embedding = decoder_embedding(folder, arch, top.get("_name_or_path"))
    if arch == "gemma3":
        from girandole.model.gemma3_vision import read_vision_config

        config.vision = read_vision_config(folder, top, spec.hidden_size)
        if config.vision is not None:
            for key in ("image_token_id", "boi_token_id", "eoi_token_id"):
                check_token_id(getattr(config.vision, key), spec.vocab_size, str(cfg_path), key)
    return spec, config, SafetensorsWeights(folder, arch)


def _read_moe(spec: ArchSpec, cfg: dict[str, Any], source: Path, arch: str) -> None:
    """The mixture-of-experts fields: Qwen3-MoE's num_experts (transformers 5 writes
    num_local_experts), moe_intermediate_size, norm_topk_prob, decoder_sparse_step and
    mlp_only_layers (dense layers); Mixtral's and gpt-oss's num_local_experts, every layer MoE,
    each expert intermediate_size wide (gpt-oss: with its SwiGLU's swiglu_alpha and
    swiglu_limit)."""
    experts = _int(cfg, "num_experts", source, None)
    spec.num_experts = experts if experts is not None else _int(cfg, "num_local_experts", source)
    spec.num_experts_per_tok = _int(cfg, "num_experts_per_tok", source)
    if arch in ("mixtral", "gpt_oss"):
        spec.moe_intermediate_size = spec.intermediate_size
        spec.moe_layers = [True] * spec.num_layers
        if arch == "gpt_oss":
            spec.swiglu_alpha = _float(cfg, "swiglu_alpha", source, 1.702)
            spec.swiglu_limit = _float(cfg, "swiglu_limit", source, 7.0)
            if not spec.swiglu_limit > 0:
                raise ValueError(f"{source}: swiglu_limit must be > 0, got {spec.swiglu_limit}")
        return
    spec.moe_intermediate_size = _int(cfg, "moe_intermediate_size", source)
    spec.norm_topk_prob = bool(cfg.get("norm_topk_prob", False))
    step = _int(cfg, "decoder_sparse_step", source, 1)
    if step <= 0:
        raise ValueError(f"{source}: decoder_sparse_step must be a positive integer, got {step}")
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
        raise ValueError(
            f"{source}: mlp_only_layers must be a list of layer numbers, got {dense!r}"
        )
    spec.moe_layers = [i not in dense and (i + 1) % step == 0 for i in range(spec.num_layers)]


# ArchSpec field -> its config.json key, for error messages.
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "rope_local_theta": "rope_local_base_freq",
    "rope_scaling": "rope_scaling",
    "sliding_windows": "layer_types",
    "sliding_window": "sliding_window",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "final_logit_softcap": "final_logit_softcapping",
    "attn_logit_softcap": "attn_logit_softcapping",
    "hidden_act": "hidden_act",
    "num_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "moe_intermediate_size": "moe_intermediate_size",
}
