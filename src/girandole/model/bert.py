"""BERT-family encoders: BertModel (bge, gte, e5, all-MiniLM) and XLM-RoBERTa / RoBERTa, bare or
with a sequence-classification head (cross-encoder rerankers: bge-reranker, ms-marco MiniLM).

Post-norm transformer layers with bidirectional attention over a padded batch: no KV cache, no
rotary; learned absolute positions (RoBERTa's start after its padding id) and token types (the
second text of a pair is type 1 in BERT; RoBERTa has one type). float32 throughout: these
models are small, and an embedding must match the reference vector, not a sampled token.

Weights are read under their Hugging Face names, with the `bert.` / `roberta.` prefix of a
task model's checkpoint stripped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from girandole.model.spec import config_number

# config.json architectures -> (model family, classification head or None)
ENCODER_ARCHITECTURES: dict[str, tuple[str, str | None]] = {
    "BertModel": ("bert", None),
    "XLMRobertaModel": ("roberta", None),
    "RobertaModel": ("roberta", None),
    "BertForSequenceClassification": ("bert", "pooler"),
    "XLMRobertaForSequenceClassification": ("roberta", "roberta"),
    "RobertaForSequenceClassification": ("roberta", "roberta"),
}
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
_PREFIXES = ("bert.", "roberta.", "model.")


def encoder_architecture(folder: Path) -> str | None:
    """The folder's encoder architecture (a key of ENCODER_ARCHITECTURES), or None when its
    config.json names none (a decoder, or no config)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(archs, list) and archs and archs[0] in ENCODER_ARCHITECTURES:
        return archs[0]
    return None


@dataclass(frozen=True)
class EncoderSpec:
    architecture: str  # a key of ENCODER_ARCHITECTURES
    family: str  # "bert" or "roberta"
    head: str | None  # classification head: "pooler" (BERT), "roberta", None: embeddings
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    position_offset: int  # RoBERTa: positions start at pad_token_id + 1
    num_labels: int  # classification outputs (0 for a bare encoder)

    @property
    def max_positions(self) -> int:
        """Tokens one input may hold, special tokens included."""
        return self.max_position_embeddings - self.position_offset


def read_encoder_spec(folder: Path) -> EncoderSpec:
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    architecture = encoder_architecture(folder)
    if architecture is None:
        raise ValueError(f"{path}: not an encoder architecture")
    family, head = ENCODER_ARCHITECTURES[architecture]

    def number(key: str, kind: type, default: Any = None) -> Any:
        return config_number(config.get(key), kind, f"{path}: {key}", default)

    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"{path}: position_embedding_type {position_type!r} is not supported")
    act = config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{path}: hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
    num_labels = 0
    if head is not None:
        labels = config.get("id2label")
        num_labels = len(labels) if isinstance(labels, dict) else number("num_labels", int, 2)
        if num_labels != 1:
            raise ValueError(
                f"{path}: a reranker must have one label (a relevance logit), it has {num_labels}"
            )
    spec = EncoderSpec(
        architecture=architecture,
        family=family,
        head=head,
        vocab_size=number("vocab_size", int),
        hidden_size=number("hidden_size", int),
        num_layers=number("num_hidden_layers", int),
        num_heads=number("num_attention_heads", int),
        intermediate_size=number("intermediate_size", int),
        hidden_act=act,
        layer_norm_eps=number("layer_norm_eps", float, 1e-12),
        max_position_embeddings=number("max_position_embeddings", int),
        type_vocab_size=number("type_vocab_size", int, 2),
        position_offset=number("pad_token_id", int, 1) + 1 if family == "roberta" else 0,
        num_labels=num_labels,
    )
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"{path}: hidden_size must be a multiple of num_attention_heads")
    if spec.max_positions <= 2:
        raise ValueError(f"{path}: max_position_embeddings is too small")
    return spec


class _Layer(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.num_heads = spec.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=spec.layer_norm_eps)
        self.up = nn.Linear(h, spec.intermediate_size)
        self.down = nn.Linear(spec.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=spec.layer_norm_eps)
        self.act = _ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, h // self.num_heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        x = self.attn_norm(x + self.attn_out(attn.transpose(1, 2).reshape(b, t, h)))
        return self.ffn_norm(x + self.down(self.act(self.up(x))))


class BertEncoder(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.spec = spec
        self.word = nn.Embedding(spec.vocab_size, h)
        self.position = nn.Embedding(spec.max_position_embeddings, h)
        self.token_type = nn.Embedding(spec.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=spec.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(spec) for _ in range(spec.num_layers))
        # classification: BERT's pooler (tanh of a dense over [CLS]) then a linear; RoBERTa's
        # head: the same shape under other names (dense, out_proj)
        self.head_dense = nn.Linear(h, h) if spec.head else None
        self.head_out = nn.Linear(h, spec.num_labels) if spec.head else None

    def forward(
        self, ids: torch.Tensor, type_ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Final hidden states [batch, tokens, hidden] of right-padded inputs (ids and type_ids
        [batch, tokens], lengths [batch])."""
        t = ids.shape[1]
        arange = torch.arange(t, device=ids.device)
        valid = arange[None, :] < lengths[:, None]  # [batch, tokens]
        x = self.word(ids) + self.position(arange + self.spec.position_offset)[None]
        x = self.embed_norm(x + self.token_type(type_ids))
        mask = valid[:, None, None, :]  # keys a query may see: the input's own tokens
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """The classification logits [batch, labels] from the first token's state."""
        assert self.head_dense is not None and self.head_out is not None
        return self.head_out(torch.tanh(self.head_dense(hidden[:, 0])))


def _weight_names(spec: EncoderSpec) -> dict[str, str]:
    """Our parameter name -> the checkpoint's (prefix stripped), but for Q/K/V (fused)."""
    names = {
        "word.weight": "embeddings.word_embeddings.weight",
        "position.weight": "embeddings.position_embeddings.weight",
        "token_type.weight": "embeddings.token_type_embeddings.weight",
        "embed_norm.weight": "embeddings.LayerNorm.weight",
        "embed_norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(spec.num_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        for mine, hf in (
            ("attn_out", "attention.output.dense"),
            ("attn_norm", "attention.output.LayerNorm"),
            ("up", "intermediate.dense"),
            ("down", "output.dense"),
            ("ffn_norm", "output.LayerNorm"),
        ):
            for part in ("weight", "bias"):
                names[f"{ours}{mine}.{part}"] = f"{theirs}{hf}.{part}"
    if spec.head == "pooler":
        dense, out = "pooler.dense", "classifier"
    else:
        dense, out = "classifier.dense", "classifier.out_proj"
    if spec.head is not None:
        for part in ("weight", "bias"):
            names[f"head_dense.{part}"] = f"{dense}.{part}"
            names[f"head_out.{part}"] = f"{out}.{part}"
    return names


def load_encoder(folder: Path, device: torch.device) -> BertEncoder:
    """The encoder of an HF folder (config.json + *.safetensors), float32 on `device`."""
    from safetensors import safe_open

    spec = read_encoder_spec(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                short = next((name[len(p) :] for p in _PREFIXES if name.startswith(p)), name)
                tensors[short] = f.get_tensor(name)
    model = BertEncoder(spec)
    state: dict[str, torch.Tensor] = {}
    for ours, theirs in _weight_names(spec).items():
        state[ours] = _take(tensors, theirs, folder)
    for i in range(spec.num_layers):
        base = f"encoder.layer.{i}.attention.self."
        for part in ("weight", "bias"):
            state[f"layers.{i}.qkv.{part}"] = torch.cat(
                [_take(tensors, f"{base}{p}.{part}", folder) for p in ("query", "key", "value")]
            )
    expected = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{folder}: tensor for {name} has shape {tuple(tensor.shape)}, the config"
                f" implies {tuple(expected[name].shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{folder}: tensor for {name} holds non-finite values")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


def _take(tensors: dict[str, torch.Tensor], name: str, folder: Path) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"{folder}: the checkpoint has no tensor {name}")
    return tensors[name]
