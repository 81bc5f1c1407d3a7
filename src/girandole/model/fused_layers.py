"""The GPU path's forward through the decoder layers with fused glue (vLLM's fused_add_rms_norm,
rotary + reshape_and_cache and act_and_mul custom ops, here in Triton: kernels/triton_fused.py).

Per layer: norm -> QKV matmul -> q/k norm + rotary + cache write -> paged attention -> O matmul
-> residual add + post norm + next pre-norm -> gate/up matmul -> activation * up -> down matmul
-> residual add + post norm + next pre-norm. Ten kernels a layer where the modules' own forward
launches about 35 (each linear casts its input to the weights' dtype and its output back to
float32; the norm, rotary and cache write are several torch ops each). Activations stay in the
weights' dtype between a matmul and the next kernel; the residual stream stays float32, as in
the modules' forward, and every op computes in float32 what the torch op it replaces computes.

A mixture-of-experts layer (Qwen3-MoE, Mixtral, gpt-oss) takes its feed-forward norm in float32
(its router's input, as in the modules' forward), then its own forward: the router and the fused
MoE kernel over its stacked experts (model/moe.py, kernels/triton_moe.py), float32 out.

Used by Gemma 3 and the Llama family (Qwen 2/3, their MoE models and gpt-oss too) when the
forward context is the GPU path's (paged block tables), no row runs a LoRA adapter, and every
linear is dense (bf16 on CUDA in fast mode, float32 in reference mode; an MoE layer's experts
stacked for the fused kernel): `applies`. Anything else takes the modules' forward.
GIRANDOLE_FUSED_LAYERS=0 turns it off (a comparison, or a way around a kernel problem).
"""

from __future__ import annotations

import torch
from torch import nn

from girandole.env_switches import env_switch
from girandole.model.context import ForwardContext, ImageBatch, get_context, image_context
from girandole.model.layers import DenseLinear, GatedMLP, RMSNorm, SelfAttention
from girandole.model.lora import LoRALinear
from girandole.model.moe import SparseMoE
from girandole.model.quant import dense_linear

ENABLED = env_switch("FUSED_LAYERS")


def _triton_fused():
    """The fused layers' Triton kernels, imported on the GPU path's first use: no CPU forward
    asks for them, and importing Triton cost a CPU server ~0.5 s of its start."""
    from girandole.model.kernels import triton_fused

    return triton_fused


def _dense(linear: nn.Module) -> DenseLinear | None:
    """The dense linear under a LoRA wrapper (only used when no row runs an adapter)."""
    base = linear.base if isinstance(linear, LoRALinear) else linear
    return base if isinstance(base, DenseLinear) else None


def fusable(model: nn.Module) -> bool:
    """Whether the model's layers have what the fused forward reads (checked once a model)."""
    cached = getattr(model, "_fusable", None)
    if cached is None:
        cached = _triton_fused().available() and all(
            _layer_fusable(layer) for layer in model.layers
        )
        model._fusable = cached
    return cached


def _layer_fusable(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not isinstance(attn, SelfAttention):
        return False
    if isinstance(mlp, SparseMoE):  # the fused MoE kernel on its stacked experts
        if mlp.stacked is None:
            return False
        linears, dtypes = [attn.qkv, attn.o_proj], {mlp.stacked.gate_up.dtype}
    elif isinstance(mlp, GatedMLP) and mlp.act_name in _triton_fused().ACTIVATIONS:
        linears, dtypes = [attn.qkv, attn.o_proj, mlp.gate_up, mlp.down], set()
    else:
        return False
    dense = [_dense(lin) for lin in linears]
    if any(d is None for d in dense) or len({d.weight.dtype for d in dense} | dtypes) != 1:
        return False
    norms = [getattr(layer, n, None) for n in ("attn_norm", "ffn_norm")]
    return all(isinstance(n, RMSNorm) for n in norms)


def applies(model: nn.Module, ctx: ForwardContext | None) -> bool:
    return (
        ENABLED
        and ctx is not None
        and ctx.paged is not None
        and ctx.lora is None
        and fusable(model)
        and model.layers[0].self_attn.attn.k_cache is not None
    )


def _linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] in the weights' dtype -> [T, out] in it (the matmul alone). dense_linear: on
    CPU (Triton's interpreter, the tests) a row's result must not depend on the row count, as
    in DenseLinear's forward; on CUDA it is F.linear."""
    lin = _dense(linear)
    return dense_linear(x, lin.weight, lin.bias)


def decoder_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    images: ImageBatch | None = None,
) -> torch.Tensor:
    """The forward of Gemma 3 and the Llama family: embeddings, then every layer with its
    rotary tables; the hidden states before the final norm. Fused on the GPU path (`applies`),
    module by module elsewhere. `images`: image embeddings in place of the image tokens' own,
    and the image spans the attention layers read (Gemma 3 vision)."""
    x = model.embed_tokens(input_ids)
    ropes = model.rope_tables(positions)
    ctx = get_context()
    if images is not None:
        x = x.index_copy(0, images.rows, images.embeds.to(x.dtype))
    if applies(model, ctx):
        return _fused(model, ctx, x, ropes, images)
    with image_context(images):
        for layer, rope in zip(model.layers, ropes):
            x = layer(x, rope)
    return x


def _fused(
    model: nn.Module,
    ctx: ForwardContext,
    x: torch.Tensor,
    ropes: list[tuple[torch.Tensor, torch.Tensor]],
    images: ImageBatch | None = None,
) -> torch.Tensor:
    """The layers on embeddings x [T, hidden] float32 (consumed: updated in place); `images`:
    their spans, which the prefill kernel lets attend both ways."""
    triton_fused = _triton_fused()
    layers = model.layers
    row_spans = None
    if images is not None and any(images.spans):
        row_spans = images.row_spans(ctx.query_lens, ctx.context_lens, x.device)
    dtype = _dense(layers[0].self_attn.qkv).weight.dtype
    first = layers[0].attn_norm
    h = triton_fused.add_rms_norm(x, None, None, first.weight, first.eps, dtype)
    for i, (layer, (cos, sin)) in enumerate(zip(layers, ropes)):
        attn = layer.self_attn
        paged = attn.attn
        group = ctx.groups[paged.kv_group] if ctx.groups is not None else ctx
        qkv = _linear(attn.qkv, h)
        q = triton_fused.qkv_rope_store(
            qkv,
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
            attn.qk_norm_weight,
            attn.eps,
            cos,
            sin,
            paged.k_cache,
            paged.v_cache,
            group.slot_mapping,
        )
        o = paged.attend_written(q, group.paged, row_spans)
        y = _linear(attn.o_proj, o.to(dtype))
        post = getattr(layer, "post_attn_norm", None)
        mlp = layer.mlp
        moe = isinstance(mlp, SparseMoE)
        # an MoE layer's router reads the normed rows in float32, as in the modules' forward
        h = triton_fused.add_rms_norm(
            x,
            y,
            _weight(post),
            layer.ffn_norm.weight,
            layer.ffn_norm.eps,
            torch.float32 if moe else dtype,
        )
        if moe:  # router, then the fused MoE kernel: float32 [T, hidden]
            y = mlp(h)
        else:
            a = triton_fused.gated_act(_linear(mlp.gate_up, h), mlp.act_name, dtype)
            y = _linear(mlp.down, a)
        post = getattr(layer, "post_ffn_norm", None)
        nxt = layers[i + 1].attn_norm if i + 1 < len(layers) else None
        h = triton_fused.add_rms_norm(x, y, _weight(post), _weight(nxt), layer.ffn_norm.eps, dtype)
    return x


def _weight(norm: RMSNorm | None) -> torch.Tensor | None:
    return None if norm is None else norm.weight
