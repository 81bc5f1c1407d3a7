"""Gemma 3's vision side (Gemma3ForConditionalGeneration: Gemma 3 4B/12B/27B): the SigLIP tower,
then the multi-modal projector (average-pool the patch grid to mm_tokens_per_image tokens,
(1 + w) RMSNorm, a linear map into the text model's hidden size). An image becomes
mm_tokens_per_image embeddings that replace the image tokens' embeddings in the prompt.

Read from a Hugging Face checkpoint folder whose config.json has model_type "gemma3" and a
vision_config; the text model beside it loads as any Gemma 3 (loader/safetensors.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from girandole.model.siglip import SiglipSpec, SiglipVisionModel

# transformers' IMAGENET_STANDARD_MEAN / _STD, the Gemma 3 processor's defaults.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
# Where a checkpoint keeps the vision tower and the projector (transformers 4.x/5 layouts).
_TOWER_PREFIXES = (
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
)
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


@dataclass
class VisionConfig:
    """What the server and engine need to know of a vision model (kept on ModelConfig)."""

    image_size: int  # images are resized to image_size x image_size
    mm_tokens_per_image: int  # embeddings (image tokens) per image
    image_token_id: int  # the placeholder an image's embeddings replace
    boi_token_id: int  # <start_of_image>: what the chat template writes for an image
    eoi_token_id: int  # <end_of_image>
    image_mean: tuple[float, ...] = DEFAULT_MEAN
    image_std: tuple[float, ...] = DEFAULT_STD
    rescale_factor: float = 1 / 255
    text_hidden_size: int = 0
    siglip: SiglipSpec | None = field(default=None, repr=False)


class Gemma3Projector(nn.Module):
    """Patch states [B, patches, vision hidden] -> image embeddings [B, tokens, text hidden]."""

    def __init__(
        self,
        patches_per_side: int,
        tokens_per_image: int,
        vision_hidden: int,
        text_hidden: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.patches_per_side = patches_per_side
        tokens_per_side = math.isqrt(tokens_per_image)
        self.kernel = patches_per_side // tokens_per_side
        self.eps = eps
        # stored as (1 + w), as the text model's norms (loader/safetensors.py)
        self.norm_weight = nn.Parameter(torch.ones(vision_hidden))
        self.projection = nn.Parameter(torch.zeros(vision_hidden, text_hidden))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        b, _, h = states.shape
        grid = states.transpose(1, 2).reshape(b, h, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        normed = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.norm_weight) @ self.projection


class Gemma3VisionEncoder(nn.Module):
    """pixel values [B, 3, S, S] -> image embeddings [B, mm_tokens_per_image, text hidden]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        spec = config.siglip
        assert spec is not None
        self.config = config
        self.tower = SiglipVisionModel(spec)
        self.projector = Gemma3Projector(
            spec.patches_per_side,
            config.mm_tokens_per_image,
            spec.hidden_size,
            config.text_hidden_size,
            spec.layer_norm_eps,
        )

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(pixel_values.float()))


def _positive_int(cfg: dict[str, Any], key: str, source: Path, default: Any = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def read_vision_config(folder: Path, cfg: dict[str, Any], text_hidden: int) -> VisionConfig | None:
    """The vision side of a Gemma 3 config.json (`cfg`), or None for a text-only checkpoint.
    ValueError naming the key for a vision config the projector cannot take."""
    vision = cfg.get("vision_config")
    if cfg.get("model_type") != "gemma3" or vision is None:
        return None
    source = folder / "config.json"
    if not isinstance(vision, dict):
        raise ValueError(f"{source}: vision_config must be an object, got {vision!r}")
    hidden = _positive_int(vision, "hidden_size", source, 1152)
    spec = SiglipSpec(
        hidden_size=hidden,
        intermediate_size=_positive_int(vision, "intermediate_size", source, 4304),
        num_layers=_positive_int(vision, "num_hidden_layers", source, 27),
        num_heads=_positive_int(vision, "num_attention_heads", source, 16),
        image_size=_positive_int(vision, "image_size", source, 896),
        patch_size=_positive_int(vision, "patch_size", source, 14),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        num_channels=_positive_int(vision, "num_channels", source, 3),
    )
    if hidden % spec.num_heads:
        raise ValueError(f"{source}: vision_config.hidden_size must divide by its heads")
    tokens = _positive_int(cfg, "mm_tokens_per_image", source, 256)
    side = math.isqrt(tokens)
    if side * side != tokens or spec.patches_per_side % side:
        raise ValueError(
            f"{source}: mm_tokens_per_image {tokens} must be a square whose side divides "
            f"image_size / patch_size ({spec.patches_per_side})"
        )
    config = VisionConfig(
        image_size=spec.image_size,
        mm_tokens_per_image=tokens,
        image_token_id=_positive_int(cfg, "image_token_index", source, 262144),
        boi_token_id=_positive_int(cfg, "boi_token_index", source, 255999),
        eoi_token_id=_positive_int(cfg, "eoi_token_index", source, 256000),
        text_hidden_size=text_hidden,
        siglip=spec,
    )
    pre = folder / "preprocessor_config.json"
    if pre.exists():
        from girandole.model.loader.safetensors import read_json_object

        p = read_json_object(pre)
        config.image_mean = _triple(p.get("image_mean", DEFAULT_MEAN), pre, "image_mean")
        config.image_std = _triple(p.get("image_std", DEFAULT_STD), pre, "image_std")
        config.rescale_factor = float(p.get("rescale_factor", 1 / 255))
    return config


def _triple(value: Any, source: Path, key: str) -> tuple[float, ...]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError(f"{source}: {key} must be 3 numbers, got {value!r}")
    return tuple(float(v) for v in value)


def load_vision_encoder(folder: Path, config: VisionConfig) -> Gemma3VisionEncoder:
    """The tower and projector with the checkpoint's weights (float32)."""
    from safetensors import safe_open

    tensors: dict[str, tuple[Any, str]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        h = safe_open(str(path), framework="pt")
        for name in h.keys():
            for prefix in (*_TOWER_PREFIXES, *_PROJECTOR_PREFIXES):
                if name.startswith(prefix):
                    kind = "tower" if prefix in _TOWER_PREFIXES else "projector"
                    tensors.setdefault(f"{kind}:{name[len(prefix) :]}", (h, name))
                    break

    def get(key: str) -> torch.Tensor:
        if key not in tensors:
            raise ValueError(f"{folder}: the vision checkpoint has no tensor for {key}")
        h, name = tensors[key]
        return h.get_tensor(name).float()

    encoder = Gemma3VisionEncoder(config)
    encoder.tower.load(lambda name: get(f"tower:{name}"))
    proj = encoder.projector
    norm = get("projector:mm_soft_emb_norm.weight") + 1.0  # Gemma's (1 + w)
    weight = get("projector:mm_input_projection_weight")
    if norm.shape != proj.norm_weight.shape or weight.shape != proj.projection.shape:
        raise ValueError(
            f"{folder}: multi_modal_projector shapes {tuple(norm.shape)}, {tuple(weight.shape)}; "
            f"expected {tuple(proj.norm_weight.shape)}, {tuple(proj.projection.shape)}"
        )
    with torch.no_grad():
        proj.norm_weight.copy_(norm)
        proj.projection.copy_(weight)
    return encoder.eval().requires_grad_(False)
