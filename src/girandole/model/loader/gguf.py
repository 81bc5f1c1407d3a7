"""GGUF checkpoints: metadata -> ArchSpec/ModelConfig, tensors -> float32 (dequantized)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from girandole.model.config import ModelConfig
from girandole.model.gemma3 import LOCAL_ROPE_THETA, default_sliding_windows
from girandole.model.loader.gguf_file import open_gguf
from girandole.model.loader.gguf_moe import expert_tensors, moe_architecture, read_moe_fields
from girandole.model.spec import (
    REQUIRED,
    SUPPORTED_ARCHITECTURES,
    ArchSpec,
    check_token_id,
    config_number,
    validate_spec,
)

# Tokens that end a turn in chat-tuned vocabularies; each one present is an extra stop id.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>")


# llama.cpp's names of the dense architectures this loader reads (its MoE ones: gguf_moe.py).
GGUF_ARCHITECTURES = tuple(a for a in SUPPORTED_ARCHITECTURES if a not in ("qwen3_moe", "mixtral"))


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's Q/K row permutation (interleaved -> rotate-half rope)."""
    rows = w.shape[0]
    if rows % (2 * n_head):  # Builder checks shapes first; this guards other readers
        raise ValueError(f"{rows} rows cannot be {n_head} rotary heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFWeights:
    """Tensors of a GGUF file under their own (GGUF) names, dequantized on request; `extra`:
    more tensors (views of the file) under names of their own (a MoE file's experts)."""

    def __init__(self, reader, spec: ArchSpec, extra: dict | None = None) -> None:
        self.reader = reader
        self.spec = spec
        self.tensors = {t.name: t for t in reader.tensors} | (extra or {})
        # convert_hf_to_gguf permutes Llama's (and so Mixtral's) Q/K rows
        self.permuted_qk = spec.architecture in ("llama", "mixtral")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def qtype(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in Linear layout ([out, in]), from the header alone."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))  # GGUF: [in, out]

    def get(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        shape = self.shape(name)
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise ValueError(f"cannot read tensor {name} ({t.tensor_type.name}): {exc}") from exc
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        if not arr.flags.writeable or not arr.flags.c_contiguous:  # a view of the file
            arr = np.array(arr, copy=True, order="C")
        out = torch.from_numpy(arr)
        spec = self.spec
        try:
            if self.permuted_qk and out.dim() >= 1:
                if re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", name):
                    out = _unpermute(out, spec.num_heads)
                elif re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", name):
                    out = _unpermute(out, spec.num_kv_heads)
        except ValueError as exc:
            raise ValueError(f"tensor {name} of shape {list(shape)}: {exc}") from exc
        return out

    def int8_groups(self, name: str):
        """(int8 [N, K], float32 scale [N, K/32]) of a Q8_0 tensor without dequantizing it
        (a quarter of the memory for a 262k-row embedding table), else None."""
        t = self.tensors[name]
        if t.tensor_type.name != "Q8_0" or len(t.shape) != 2:
            return None
        cols, rows = (int(d) for d in t.shape.tolist())
        b = np.asarray(t.data, dtype=np.uint8).reshape(-1, 34)
        scale = torch.from_numpy(_f16(b, 0)).reshape(rows, cols // 32)
        q = torch.from_numpy(np.ascontiguousarray(b[:, 2:34]).view(np.int8)).reshape(rows, cols)
        return q, scale

    def q6_k_parts(self, name: str):
        """A Q6_K tensor's levels, scales and d as stored (decode_q6_k), else None."""
        t = self.tensors[name]
        if t.tensor_type.name != "Q6_K" or len(t.shape) != 2:
            return None
        cols, rows = (int(d) for d in t.shape.tolist())
        parts = decode_q6_k(t.data, rows, cols)
        spec = self.spec
        if self.permuted_qk and re.fullmatch(r"blk\.\d+\.attn_[qk]\.weight", name):
            heads = spec.num_heads if ".attn_q." in name else spec.num_kv_heads
            parts = tuple(_unpermute(x, heads) for x in parts)
        return parts

    def int_groups(self, name: str):
        """Exact integer groups of 32 (see decode_int_groups) of a Q4_0/Q4_1/Q4_K/Q5_0/Q8_0
        tensor, or None for other types."""
        t = self.tensors[name]
        qtype = t.tensor_type.name
        if qtype not in INT_GROUP_QTYPES or len(t.shape) != 2:
            return None
        cols, rows = (int(d) for d in t.shape.tolist())
        q, scale, offset = decode_int_groups(t.data, qtype, rows, cols)
        spec = self.spec
        if self.permuted_qk and re.fullmatch(r"blk\.\d+\.attn_[qk]\.weight", name):
            heads = spec.num_heads if ".attn_q." in name else spec.num_kv_heads
            q, scale, offset = (_unpermute(x, heads) for x in (q, scale, offset))
        return q, scale, offset


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """float32 values of a tensor's data, bit for bit as `gguf.quants.dequantize` gives them.
    Q6_K (Llama's and Qwen's embedding tables and v/ffn_down in Q4_K_M files) is decoded here:
    gguf's numpy code takes 16 rows at a time and spent 22-36 s on Llama-3.2-1B's 128k-row
    table, this 2.7 s."""
    if qtype.name == "Q6_K" and data.dtype == np.uint8 and data.size % Q6_K_BYTES == 0:
        return _dequantize_q6_k(data).numpy()
    if qtype.name == "Q4_K" and data.dtype == np.uint8 and data.size % Q4_K_BYTES == 0:
        return _dequantize_q4_k(data)
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(data, qtype)


Q6_K_BYTES = 210  # a block of 256 weights: ql[128], qh[64], int8 scales[16], float16 d
Q6_K_CHUNK = 8192  # blocks decoded at once (bounds the temporaries: about 30 MB)


def _dequantize_q6_k(data: np.ndarray) -> torch.Tensor:
    """float32 [blocks * 256] of Q6_K blocks, ggml's dequantize_row_q6_K in whole-block tensor
    ops (the same two float32 products as gguf's: d * scale, then times the level; torch's
    uint8 ops are ~8x numpy's here). In each half of a block (128 weights): ql byte l's low
    nibble is weight l, byte l + 32's is l + 32, their high nibbles l + 64 and l + 96; qh byte
    l's bit pairs 0-1, 2-3, 4-5, 6-7 are those four weights' top two bits; level - 32 times the
    scale of its 16 weights."""
    b = np.asarray(data, dtype=np.uint8).reshape(-1, Q6_K_BYTES)  # a read-only view of the file
    n = b.shape[0]
    out = torch.empty(n, 256)
    for a in range(0, n, Q6_K_CHUNK):
        level, sc, d = _q6_k_fields(b[a : a + Q6_K_CHUNK])
        m = level.shape[0]
        scale = d.float() * sc.float()  # [m, 16]
        product = scale.reshape(m, 16, 1) * (level.to(torch.int8) - 32).reshape(m, 16, 16).float()
        out[a : a + m] = product.reshape(m, 256)
    return out.reshape(-1)


def _q6_k_fields(b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K blocks [m, 210] -> (levels uint8 [m, 256] in 0..63, scales int8 [m, 16], d float16
    [m, 1]): weight i is d * scales[i // 16] * (levels[i] - 32)."""
    blk = torch.from_numpy(np.array(b, dtype=np.uint8, copy=True))
    m = blk.shape[0]
    ql = blk[:, :128].reshape(m, 2, 64)
    qh = blk[:, 128:192].reshape(m, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    low = torch.stack([ql & 15, ql >> 4], dim=2).reshape(m, 2, 4, 32)
    level = (low | (((qh >> shifts) & 3) << 4)).reshape(m, 256)
    sc = blk[:, 192:208].contiguous().view(torch.int8)
    d = blk[:, 208:210].contiguous().view(torch.float16)
    return level, sc, d


def decode_q6_k(data: np.ndarray, rows: int, cols: int):
    """A Q6_K tensor [rows, cols] as the file stores it: (levels uint8 [rows, cols] in 0..63,
    scales int8 [rows, cols/16], d float16 [rows, cols/256]), w = d * scale * (level - 32) per
    16 inputs (a scale) and 256 (a d); the levels' bytes once, no float copy."""
    b = np.asarray(data, dtype=np.uint8).reshape(-1, Q6_K_BYTES)
    parts = [_q6_k_fields(b[a : a + Q6_K_CHUNK]) for a in range(0, b.shape[0], Q6_K_CHUNK)]
    level, sc, d = (torch.cat(p) for p in zip(*parts))
    return level.reshape(rows, cols), sc.reshape(rows, cols // 16), d.reshape(rows, cols // 256)


Q4_K_BYTES = 144  # a block of 256 weights: float16 d and dmin, 6-bit scales and mins, 4-bit levels


def _dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    """float32 values of Q4_K blocks from their integer groups (decode_int_groups): q * (d * sc)
    - dmin * m, the same float32 operations as gguf's, bit for bit, at a fraction of its time
    (a MoE file's hundreds of Q4_K experts in reference mode or on the GPU)."""
    b = np.asarray(data, dtype=np.uint8).reshape(-1, Q4_K_BYTES)
    out = np.empty((b.shape[0], 256), dtype=np.float32)
    for a in range(0, b.shape[0], Q6_K_CHUNK):
        chunk = b[a : a + Q6_K_CHUNK]
        q, scale, offset = decode_int_groups(chunk, "Q4_K", chunk.shape[0] * 8, 32)
        out[a : a + chunk.shape[0]] = (q.float() * scale + offset).reshape(-1, 256).numpy()
    return out.reshape(-1)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)[:, 0]


INT_GROUP_QTYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q8_0")


def decode_int_groups(data: np.ndarray, qtype: str, rows: int, cols: int):
    """Exact groups of 32 of an integer GGUF type: (q [rows, cols] int32 levels (0..15 for
    4-bit types, 0..31 for Q5_0, 0..255 for Q8_0), scale, offset [rows, cols/32] float32)
    with value = q * scale + offset."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1)
    if qtype in ("Q4_0", "Q4_1"):
        size = 18 if qtype == "Q4_0" else 20
        b = blocks.reshape(-1, size)
        scale = _f16(b, 0)
        offset = -8.0 * scale if qtype == "Q4_0" else _f16(b, 2)
        qs = b[:, size - 16 :]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [n_blocks, 32]
    elif qtype == "Q5_0":
        b = blocks.reshape(-1, 22)
        scale = _f16(b, 0)
        offset = -16.0 * scale
        qh = b[:, 2:6].copy().view(np.uint32)  # [n_blocks, 1]
        high = ((qh >> np.arange(32, dtype=np.uint32)[None, :]) & 1).astype(np.uint8)
        qs = b[:, 6:22]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1) | (high << 4)
    elif qtype == "Q8_0":
        b = blocks.reshape(-1, 34)
        scale = _f16(b, 0)
        offset = -128.0 * scale
        q = b[:, 2:34].view(np.int8).astype(np.int32) + 128
    elif qtype == "Q4_K":
        from gguf.quants import Q4_K

        b = blocks.reshape(-1, 144)
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, m = Q4_K.get_scale_min(b[:, 4:16])
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, 32)
        scale = (d[:, None] * sc.astype(np.float32)).reshape(-1)
        offset = -(dmin[:, None] * m.astype(np.float32)).reshape(-1)
    else:
        raise ValueError(f"no integer group decoding for {qtype}")
    groups = cols // 32
    q_t = torch.from_numpy(np.ascontiguousarray(q, dtype=np.int32)).reshape(rows, cols)
    scale_t = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).reshape(rows, groups)
    off_t = torch.from_numpy(np.ascontiguousarray(offset, dtype=np.float32)).reshape(rows, groups)
    return q_t, scale_t, off_t


def _eos_ids(reader, tokens: list[str] | None, vocab: int, source: str) -> list[int]:
    ids: list[int] = []
    for key in (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ):
        v = _field(reader, key)
        if v is not None and check_token_id(v, vocab, source, key) not in ids:
            ids.append(v)
    if tokens is not None:
        for tok in END_OF_TURN_TOKENS:
            try:
                i = tokens.index(tok)
            except ValueError:
                continue
            if i not in ids and i < vocab:
                ids.append(i)
    return ids


def read_gguf(path: str | os.PathLike) -> tuple[ArchSpec, ModelConfig, GGUFWeights]:
    path = Path(path)
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise ValueError(f"GGUF file has no general.architecture: {path}")
    moe_arch = moe_architecture(arch, lambda key: _field(reader, f"{arch}.{key}"), path.name)
    if moe_arch is None and arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported model architecture {arch!r} in {path.name} "
            f"(supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    source = f"GGUF file {path.name}"

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    def number(key: str, kind: type, default: Any = REQUIRED) -> Any:
        """The metadata value `{arch}.{key}` as an int or float, named in any error."""
        return config_number(a(key), kind, f"{source}: {arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"GGUF file has no token_embd.weight tensor: {path}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = number("vocab_size", int, None) or (len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[1])
    hidden = number("embedding_length", int)
    # A MoE file whose layers are all MoE may leave out the dense width.
    ffn_default = REQUIRED if moe_arch is None else number("expert_feed_forward_length", int, None)
    num_heads = number("attention.head_count", int)
    kv = a("attention.head_count_kv")
    if kv is not None and not np.isscalar(kv):  # per-layer counts: one for all is supported
        if len(set(kv)) != 1:
            raise ValueError(f"{source}: per-layer {arch}.attention.head_count_kv {kv} differ")
        num_kv = int(kv[0])
    else:
        num_kv = number("attention.head_count_kv", int, num_heads)
    derived_head_dim = a("attention.key_length") is None
    head_dim = number("attention.key_length", int, hidden // num_heads if num_heads > 0 else 0)
    num_layers = number("block_count", int)
    ctx = number("context_length", int, 4096)

    rope_scaling = None
    scaling_type = a("rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise ValueError(f"unsupported rope scaling {scaling_type!r} in {path.name}")
        rope_scaling = {"rope_type": "linear", "factor": number("rope.scaling.factor", float)}

    spec = ArchSpec(
        architecture=moe_arch or arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=number("feed_forward_length", int, ffn_default),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", float, 1e-6),
        rope_theta=number("rope.freq_base", float, 10000.0),
        max_position=ctx,
        rope_scaling=rope_scaling,
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
    )
    window = number("attention.sliding_window", int, None)
    if arch == "gemma3":
        spec.sliding_windows = default_sliding_windows(num_layers, window or 512)
        spec.rope_local_theta = LOCAL_ROPE_THETA
        spec.query_pre_attn_scalar = float(head_dim)
        spec.hidden_act = "gelu_pytorch_tanh"
        spec.final_logit_softcap = number("final_logit_softcapping", float, None)
        spec.attn_logit_softcap = number("attn_logit_softcapping", float, None)
    else:
        spec.sliding_windows = [window or None] * num_layers
    if moe_arch is not None:
        read_moe_fields(spec, arch, number, a, set(tensors), source)
    keys = {name: f"{arch}.{key}" for name, key in _GGUF_KEYS.items()}
    validate_spec(spec, source, keys, derived_head_dim=derived_head_dim)
    value_dim = number("attention.value_length", int, head_dim)
    if value_dim != head_dim:  # one head size for the K and V caches
        raise ValueError(
            f"{source}: {arch}.attention.value_length ({value_dim}) must equal "
            f"{arch}.attention.key_length ({head_dim})"
        )

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        check_token_id(bos, spec.vocab_size, source, "tokenizer.ggml.bos_token_id")
    config = ModelConfig.from_spec(
        spec,
        bos_token_id=bos,
        eos_token_ids=_eos_ids(reader, tokens, spec.vocab_size, source),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", bos is not None)),
        name=str(_field(reader, "general.name", path.stem)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
    experts = expert_tensors(tensors, spec, source) if moe_arch is not None else None
    return spec, config, GGUFWeights(reader, spec, experts)


# ArchSpec field -> its GGUF metadata key (after "{arch}."), for error messages.
_GGUF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_layers": "block_count",
    "num_heads": "attention.head_count",
    "num_kv_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "max_position": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "rope_scaling": "rope.scaling",
    "sliding_window": "attention.sliding_window",
    "final_logit_softcap": "final_logit_softcapping",
    "attn_logit_softcap": "attn_logit_softcapping",
    "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
}
