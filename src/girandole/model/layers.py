"""Building blocks shared by every architecture: norms, rotary embeddings, linear layers
(dense here, weight-only quantized in quant.py), embeddings, LM head, gated MLP, self-attention
block, and the Builder that makes them from checkpoint tensors.

Numerics: the residual stream, norms and rotary run in float32 in every mode; linear layers
take float32 and return float32, whatever they compute in inside (fp32 in `reference` mode,
bf16 packed kernels in `fast` mode on CPU, bf16 on CUDA).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from girandole.model import kernels
from girandole.model.attention import Attention
from girandole.model.context import get_context
from girandole.model.kernels import gated_act, int4_head, int8_gemm, logits, rms_norm
from girandole.model.quant import (
    BF16_QTYPES,
    INT4_GROUP,
    ConcatLinear,
    GroupLevels,
    PackedLinear,
    Q6KLinear,
    Q6KParts,
    dense_linear,
    int4_supported,
    linear_from_groups,
    native_only_error,
    pack_int4,
    q6k_native,
    quantize_int4_groups,
    quantize_int8_groups,
    quantize_int8_rows,
    quantized_linear,
)
from girandole.model.spec import ArchSpec, Weights, expected_shapes

if TYPE_CHECKING:
    from girandole.model.loader.spill import SpillArena

MODES = ("fast", "reference")


# ---------------------------------------------------------------------------------------------
# Norms and rotary embeddings


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, in float32 (Gemma's +1 is already in `weight`).
    `fused`: one native pass where the kernels are built (fast mode; reference mode keeps
    torch's ops, the same as transformers')."""

    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dim() == 2 and rms_norm.supported(x):
            return rms_norm.rms_norm(x, self.weight.view(1, -1), self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps)


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    freq_factors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] as transformers computes them (float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:  # llama.cpp stores llama3 scaling as per-frequency divisors
        return inv_freq / freq_factors.float()
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    raise ValueError(f"unsupported rope scaling type: {rope_type!r}")


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (gpt-oss, Qwen long context): each frequency blended between the original one
    (fast rotations, extrapolated) and the one divided by `factor` (slow ones, interpolated)
    along a linear ramp between the correction dims of beta_fast and beta_slow rotations; as
    transformers' _compute_yarn_parameters."""
    factor = float(scaling["factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor YaRN multiplies cos and sin by (1 for every other rope type)."""
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return mscale(factor, float(m)) / mscale(factor, float(m_all))
    return mscale(factor)


class Rotary(nn.Module):
    """cos/sin tables for given positions: forward(positions [T]) -> (cos, sin) [T, D/2].
    `attention_factor`: YaRN's multiplier of both tables."""

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float())
        self.attention_factor = attention_factor

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        if self.attention_factor != 1.0:
            return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX / transformers) rotary embedding. x [T, H, D], cos/sin [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


# ---------------------------------------------------------------------------------------------
# Linear layers, embeddings, LM head


class DenseLinear(nn.Module):
    """Plain linear in a fixed weight dtype (fp32 reference; bf16 on CUDA); returns float32."""

    thread_invariant = False  # torch's matmul: a row rounds by how the threads split the rows

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        spans = _prompt_spans(x2)
        if spans is None:
            y = dense_linear(x2, self.weight, self.bias)
        else:
            y = torch.cat([dense_linear(x2[a:b], self.weight, self.bias) for a, b in spans])
        return y.float().reshape(*shape, self.out_features)


def _prompt_spans(x2: torch.Tensor) -> list[tuple[int, int]] | None:
    """On CPU inside an engine step with prompt rows of several sequences: the decode rows,
    then each sequence's prompt rows, as row spans to run one call each. A BLAS matmul rounds a
    row by its place in the call's row blocks (AMD hosts: any row count), so a prompt's rows
    would change with what shares its step; in a call of their own they are the same alone or
    in a batch. Decode rows stay one call (reference mode's decode is not batch-invariant)."""
    ctx = get_context()
    if ctx is None or x2.device.type != "cpu" or ctx.num_decode_rows is None:
        return None
    lens = ctx.query_lens
    if sum(lens) != x2.shape[0]:
        return None
    spans, start = [], 0
    if ctx.num_decode_rows:
        spans.append((0, ctx.num_decode_rows))
        start = ctx.num_decode_rows
    taken = 0
    for n in lens:
        if taken >= start:
            spans.append((taken, taken + n))
        elif taken + n > start:  # a sequence across the decode rows' end: not this layout
            return None
        taken += n
    return spans if len(spans) > 1 else None


class DenseEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


class Int8Embedding(nn.Module):
    """Embedding table as int8 with a float32 scale per group of 32 (exact for a Q8_0 table),
    dequantized per lookup: 1/4 of the fp32 table's memory."""

    GROUP = 32

    def __init__(
        self,
        weight: torch.Tensor | None,
        groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """From a float weight, or from `groups` = (int8 [V, H], scale [V, H/32])."""
        super().__init__()
        q, scale = groups if groups is not None else quantize_int8_groups(weight, self.GROUP)
        self.hidden = q.shape[1]
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows [*ids.shape, H] of the table."""
        q = self.qweight[ids].float().unflatten(-1, (-1, self.GROUP))
        return (q * self.scale[ids][..., None]).flatten(-2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)


class QuantLMHead(nn.Module):
    """Coarse logits from a quantized copy of the output weight [V, H] against the hidden state
    quantized to int8 per row, with each row's top candidates recomputed exactly.

    The coarse copy: with the native kernels, 4-bit levels with a float16 scale and minimum per
    group of 32 (kernels.int4_head: 5 bits a weight, a decode step streams 105 MB instead of
    168 MB for a 262k vocabulary), or int8 with one scale per vocabulary row where the 4-bit copy
    cannot hold the weights (the native int8 kernel). Without the native kernels, torch's int4
    packed kernel (as quant.Int4Linear's, bf16 rows, a group-32 scale and zero point in bf16;
    the vocabulary padded to 16 rows and the hidden size to 64 with zeros, as it requires):
    `torch._int_mm` takes a naive path on CPUs without AVX512-VNNI (most of a decode step on the
    AVX2 host of docs/benchmarks.md; decode 2x faster without it).
    Rows are computed independently, so a row's logits do not depend on how many rows share the
    call (batch invariance). A row's best `REFINE_TOP` coarse logits within `REFINE_MARGIN` of
    its maximum are then recomputed in float32 from `table` (the group-int8 weight: the
    embedding table when tied), so the greedy choice, the top log-probabilities and the head of
    the sampling distribution are those of the exact weights. The margin covers the 4-bit copy's
    error with room (on the default model its coarse logits are off by 0.7 on average and 4.5 at
    most; the true top token ranks at most 11th). Margin 12 and 1,024 candidates keep the
    distribution at least as close to the exact one as the int8 copy with margin 8 and 128 did
    (on the default model: total variation at temperature 1, median 1.2e-3 vs 2.6e-3; top-5
    log-probabilities within 8e-3 vs 3e-2; perplexity from the head +0.16 % vs +0.17 %; with
    512 candidates the 4-bit tail costs +0.24 %).
    With the native kernels the refinement runs fused (csrc/logits.c). Timings and accuracy on
    the default model: docs/benchmarks.md.
    """

    row_invariant = True  # a row's logits are the same whatever else shares the call
    CHUNK = 32768
    REFINE_MARGIN = 12.0
    REFINE_TOP = 1024  # candidates per row at most: its best by the coarse logits

    def __init__(self, table: Int8Embedding) -> None:
        super().__init__()
        self.table = table
        self.vocab, hidden = table.qweight.shape
        native = kernels.available()
        self.padded = (-(-self.vocab // 16) * 16, -(-hidden // 64) * 64)  # torch's int4 shape
        # The native kernels take the vocabulary in blocks of 16 rows: a vocabulary of another
        # size is padded with zero rows (their logits computed, then cut off), not sent to
        # torch's far slower path (a decode step's largest cost at a ~300-token vocabulary).
        vocab_rows = self.padded[0]
        # The native 4-bit copy where it holds the weights (float16 parameters), else the
        # native int8 kernel's; without either, torch's int4 packed copy.
        use4 = native and int4_head.supports(
            vocab_rows, hidden, float(table.scale.abs().max()) * 127.0
        )
        use8 = native and not use4 and int8_gemm.supports(vocab_rows, hidden)
        use_torch = not (use4 or use8)
        q, scale, q4, t4 = [], [], [], []
        for start in range(0, self.vocab, self.CHUNK):  # chunks bound the temporary memory
            rows = table.rows(torch.arange(start, min(start + self.CHUNK, self.vocab)))
            stop = min(start + self.CHUNK, vocab_rows)
            rows = F.pad(rows, (0, 0, 0, stop - start - len(rows)))  # the last chunk: to 16
            if use8:
                qc, sc = quantize_int8_rows(rows)
                q.append(qc)
                scale.append(sc)
            if use4:
                q4.append(int4_head.quantize(rows))
            if use_torch:
                padded = F.pad(rows, (0, self.padded[1] - hidden))
                t4.append(pack_int4(*quantize_int4_groups(padded)))
        self.register_buffer("qweight", torch.cat(q) if use8 else None)  # [V, H]
        self.register_buffer("qscale", torch.cat(scale) if use8 else None)  # [V]
        # The native kernels' layout (from the memory-mapped model cache only the one in use is
        # read into memory).
        packed4 = int4_head.pack(*(torch.cat(parts) for parts in zip(*q4))) if use4 else None
        self.register_buffer("native4_packed", packed4)
        packed, wsum = int8_gemm.pack(self.qweight) if use8 else (None, None)
        self.register_buffer("native_packed", packed)
        self.register_buffer("native_wsum", wsum)
        # torch's int4 packed layout [Vp, Hp/2] and its bf16 scale-and-zero table [Hp/32, Vp, 2].
        self.register_buffer("torch4_packed", torch.cat([p for p, _ in t4]) if t4 else None)
        self.register_buffer("torch4_sz", torch.cat([z for _, z in t4], dim=1) if t4 else None)

    @property
    def thread_invariant(self) -> bool:
        """Whether its logits are the same at any thread count (engine/cpu_threads.py): on
        the native kernels (torch's int4 kernel makes no promise)."""
        native = self.native4_packed is not None or self.native_packed is not None
        return kernels.available() and self.torch4_packed is None and native

    def coarse(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """float32 [M, V] coarse logits of float32 rows x, and whether they came from a native
        kernel."""
        if kernels.available() and self.torch4_packed is None:
            sx = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
            xq = torch.round(x / sx).clamp(-127, 127).to(torch.int8)
            if self.native4_packed is not None:
                out = int4_head.gemm(xq, sx, self.native4_packed, self.padded[0])
                return self._cut(out), True
            if self.native_packed is not None:  # the same numbers as torch._int_mm
                out = int8_gemm.int8_gemm(xq, sx, self.native_packed, self.native_wsum, self.qscale)
                return self._cut(out), True
        return self.torch_coarse(x), False

    def _cut(self, out: torch.Tensor) -> torch.Tensor:
        """The vocabulary's columns of logits [M, padded vocabulary], contiguous."""
        return out if out.shape[1] == self.vocab else out[:, : self.vocab].contiguous()

    def torch_coarse(self, x: torch.Tensor) -> torch.Tensor:
        """The coarse logits on torch's int4 packed kernel: each row on its own (row-invariant
        for any row count, tests/model/test_lm_head.py)."""
        if self.torch4_packed is None:
            raise native_only_error("LM head")
        m, hidden = x.shape
        if m == 0:
            return x.new_empty(0, self.vocab)
        xb = F.pad(x.to(torch.bfloat16), (0, self.padded[1] - hidden)).contiguous()
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        out = mm(xb, self.torch4_packed, INT4_GROUP, self.torch4_sz)
        return out[:, : self.vocab].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        out, native = self.coarse(x)
        if native and self.table.hidden % Int8Embedding.GROUP == 0:  # the refinement, fused
            logits.refine(
                out, x, self.table.qweight, self.table.scale, self.REFINE_MARGIN, self.REFINE_TOP
            )
            return out
        # The row's best REFINE_TOP by the coarse logits, those within REFINE_MARGIN of its top
        # recomputed exactly: decided per row, never by the other rows of the batch.
        vals, idx = out.topk(min(self.REFINE_TOP, out.shape[-1]), dim=-1)
        keep = vals >= vals[:, :1] - self.REFINE_MARGIN
        rows = torch.arange(out.shape[0]).unsqueeze(1).expand_as(idx)[keep]
        cols = idx[keep]
        out[rows, cols] = (self.table.rows(cols) * x[rows]).sum(dim=-1)
        return out


class DenseLMHead(nn.Module):
    thread_invariant = False  # torch's matmul, as DenseLinear

    def __init__(self, weight: nn.Parameter | torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        if isinstance(weight, nn.Parameter) and weight.dtype == dtype:
            self.weight = weight  # tied: the same parameter as the embedding
        else:
            self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dense_linear, not F.linear: a lone row (a request decoding alone) would take another
        # kernel than a row among others, and its logprobs would change with its neighbours.
        return dense_linear(x.to(self.weight.dtype), self.weight).float()


class Builder:
    """Turns checkpoint tensors into modules for one mode and device."""

    def __init__(
        self,
        weights: Weights,
        mode: str,
        device: torch.device,
        spec: ArchSpec | None = None,
        source: str | None = None,
    ) -> None:
        """`spec`: the shapes every tensor must have (unchecked without one); `source`: the
        checkpoint's path, for error messages."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.weights = weights
        self.mode = mode
        self.device = device
        self.quantize = mode == "fast" and device.type == "cpu"
        self.dtype = torch.float32 if mode == "reference" else torch.bfloat16
        self.expected_shape = expected_shapes(spec) if spec is not None else None
        self.where = f"checkpoint {source}" if source else "checkpoint"
        # A packed-model cache build moves each finished layer's tensors to a file (loader/spill.py)
        self.spill: SpillArena | None = None

    def finished(self, module: nn.Module) -> nn.Module:
        """`module` (a decoder layer) is built: a cache build moves its tensors out of memory."""
        return module if self.spill is None else self.spill.take(module)

    def has(self, name: str) -> bool:
        return name in self.weights

    def tensor(self, name: str) -> torch.Tensor:
        self._require(name)
        t = self.weights.get(name)
        self._check_shape(name, tuple(t.shape))
        self._check_finite(name, t)
        return t

    def _require(self, name: str) -> None:
        """The tensor exists and, where the weights tell its shape without reading it, has the
        shape the spec implies (before reading: a wrong head count would fail in a reshape)."""
        if name not in self.weights:
            raise ValueError(f"{self.where} is missing tensor {name!r}")
        shape_of = getattr(self.weights, "shape", None)
        if shape_of is not None:
            self._check_shape(name, shape_of(name))

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        expected = self.expected_shape(name) if self.expected_shape is not None else None
        if expected is not None and tuple(shape) != expected:
            raise ValueError(
                f"{self.where}: tensor {name!r} has shape {list(shape)}, but the model's "
                f"config implies {list(expected)}"
            )

    def _check_finite(self, name: str, *tensors: torch.Tensor) -> None:
        """NaN or inf in a weight would make every logit NaN: refuse it at load. One sum per
        tensor (no temporary of its size; numpy's, single-threaded: torch's wakes its threads
        for each of the many small scale tensors); no real model's weights sum past float32's
        range. About 0.1 s on the default model's build."""
        for t in tensors:
            if not t.is_floating_point():
                continue
            values = t.numpy() if t.dtype == torch.float32 else t.float().numpy()
            if not math.isfinite(float(values.sum())):
                raise ValueError(f"{self.where}: tensor {name!r} holds NaN or infinite values")

    def norm(self, name: str, eps: float) -> RMSNorm:
        return RMSNorm(self.tensor(name), eps, fused=self.mode == "fast")

    def linear(self, names: list[str], bias: bool = False) -> nn.Module:
        """One linear over the concatenated output rows of `names` (e.g. q, k, v). Quantized,
        names stored in different GGUF types are packed run by run (consecutive names of one
        type together), each at its own width (quant.ConcatLinear)."""
        for n in names:
            self._require(f"{n}.weight")
        if self.quantize and len(names) > 1:
            by_type = itertools.groupby(names, key=lambda n: self.weights.qtype(f"{n}.weight"))
            runs = [list(run) for _, run in by_type]
            if len(runs) > 1:
                parts = [self.linear(run, bias) for run in runs]
                if all(isinstance(p, PackedLinear) for p in parts):
                    return ConcatLinear(parts)
        qtypes = {self.weights.qtype(f"{n}.weight") for n in names}
        quantize = self.quantize and not qtypes & BF16_QTYPES
        q6k = self._q6_k_parts(names) if quantize and qtypes == {"Q6_K"} else None
        if q6k is not None:  # the file's own levels and scales, in their native format
            parts = tuple(torch.cat(p, dim=0) for p in zip(*q6k))
            return Q6KLinear(parts, self._bias(names, [p[0].shape[0] for p in q6k], bias))
        per_name = self._exact_groups(names) if quantize else None
        if per_name is not None:
            groups = tuple(torch.cat(parts, dim=0) for parts in zip(*per_name))
            if int4_supported(groups[0]):  # the file's levels as they are: no float copy
                rows = [g[0].shape[0] for g in per_name]
                return linear_from_groups(groups, self._bias(names, rows, bias))
        ws = [self.tensor(f"{n}.weight") for n in names]
        weight = torch.cat(ws, dim=0) if len(ws) > 1 else ws[0]
        b = self._bias(names, [w.shape[0] for w in ws], bias)
        if not self.quantize:
            return DenseLinear(weight, b, self.dtype)
        if not quantize:
            return DenseLinear(weight, b, torch.bfloat16)
        return quantized_linear(weight, b, qtypes)

    def _bias(self, names: list[str], rows: list[int], wanted: bool) -> torch.Tensor | None:
        """The names' biases concatenated (zeros for a name without one); None where none has
        one and none is `wanted`."""
        if not wanted and not any(f"{n}.bias" in self.weights for n in names):
            return None
        return torch.cat(
            [
                self.tensor(f"{n}.bias") if f"{n}.bias" in self.weights else torch.zeros(r)
                for n, r in zip(names, rows)
            ]
        )

    def _exact_groups(self, names: list[str]) -> list[GroupLevels] | None:
        """Each name's group-32 integer levels as the checkpoint stores them; None where any of
        them has none (a float or K-quant type that is not stored in groups of 32)."""
        exact = getattr(self.weights, "int_groups", None)
        if exact is None:
            return None
        groups = [exact(f"{n}.weight") for n in names]
        if any(g is None for g in groups):
            return None
        for n, (q, scale, offset) in zip(names, groups):
            self._check_shape(f"{n}.weight", tuple(q.shape))
            self._check_finite(f"{n}.weight", scale, offset)  # levels are integers
        return groups

    def _q6_k_parts(self, names: list[str]) -> list[Q6KParts] | None:
        """Each name's Q6_K levels, scales and d as the file stores them, where the linear
        keeps them (quant.q6k_native); else None (then they are decoded to floats)."""
        parts_of = getattr(self.weights, "q6_k_parts", None)
        shape_of = getattr(self.weights, "shape", None)
        if parts_of is None or shape_of is None:
            return None
        shapes = [shape_of(f"{n}.weight") for n in names]
        if len({s[1:] for s in shapes}) != 1 or len(shapes[0]) != 2:
            return None
        if not q6k_native(sum(s[0] for s in shapes), shapes[0][1]):
            return None
        parts = [parts_of(f"{n}.weight") for n in names]
        if any(p is None for p in parts):
            return None
        for n, (levels, _, d) in zip(names, parts):
            self._check_shape(f"{n}.weight", tuple(levels.shape))
            self._check_finite(f"{n}.weight", d)
        return parts

    def _int8_table(self, name: str) -> Int8Embedding:
        direct = getattr(self.weights, "int8_groups", None)
        groups = direct(name) if direct is not None and name in self.weights else None
        if groups is not None:
            self._check_shape(name, tuple(groups[0].shape))
            self._check_finite(name, groups[1])
            return Int8Embedding(None, groups=groups)
        return Int8Embedding(self.tensor(name))

    def embedding_and_head(self, tie: bool) -> tuple[nn.Module, nn.Module]:
        if self.quantize:
            embedding = self._int8_table("token_embd.weight")
            if tie or "output.weight" not in self.weights:
                table = embedding
            else:
                table = self._int8_table("output.weight")
            return embedding, QuantLMHead(table)
        emb = self.tensor("token_embd.weight")
        embedding = DenseEmbedding(emb, self.dtype)
        del emb
        if tie or "output.weight" not in self.weights:
            head = DenseLMHead(embedding.weight, self.dtype)
        else:
            head = DenseLMHead(self.tensor("output.weight"), self.dtype)
        return embedding, head


# ---------------------------------------------------------------------------------------------
# Blocks


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one linear."""

    def __init__(self, b: Builder, prefix: str, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_up = b.linear([f"{prefix}.ffn_gate", f"{prefix}.ffn_up"])
        self.down = b.linear([f"{prefix}.ffn_down"])
        self.intermediate = intermediate
        self.native_act: str | None = None  # its name in girandole.model.gated_act
        if act == "silu":
            self.act = F.silu
            self.native_act = "silu"
        elif act in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act = _gelu_tanh
            self.native_act = "gelu_tanh"
        elif act == "gelu":
            self.act = F.gelu
        else:
            raise ValueError(f"unsupported activation: {act!r}")
        self.act_name = self.native_act or act  # silu, gelu_tanh or gelu
        # The fused kernel writes bf16: only where the down projection casts to bf16 anyway.
        if not isinstance(self.down, PackedLinear):
            self.native_act = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        if gated_act.supported(gu, self.native_act):
            return self.down(gated_act.gated_act(gu, self.native_act))
        gate, up = gu[..., : self.intermediate], gu[..., self.intermediate :]
        return self.down(self.act(gate) * up)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class SelfAttention(nn.Module):
    """Fused QKV projection, optional per-head QK RMSNorm, rotary, paged attention, output."""

    def __init__(
        self,
        b: Builder,
        prefix: str,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        eps: float,
        scale: float,
        qk_norm: bool,
        sliding_window: int | None,
        logit_softcap: float | None = None,
        sinks: bool = False,
    ) -> None:
        """`sinks`: the layer has gpt-oss's per-head attention sink logits
        (`{prefix}.attn_sinks.weight`)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv = b.linear([f"{prefix}.attn_q", f"{prefix}.attn_k", f"{prefix}.attn_v"])
        self.eps = eps
        if qk_norm:  # one norm over q and k heads together: weight [H + Hkv, D]
            wq = b.tensor(f"{prefix}.attn_q_norm.weight").float()
            wk = b.tensor(f"{prefix}.attn_k_norm.weight").float()
            qk_w = torch.cat([wq.expand(num_heads, head_dim), wk.expand(num_kv_heads, head_dim)])
            self.register_buffer("qk_norm_weight", qk_w.contiguous())
        else:
            self.qk_norm_weight = None
        self.fused_norm = b.mode == "fast"
        self.o_proj = b.linear([f"{prefix}.attn_output"])
        sink_logits = b.tensor(f"{prefix}.attn_sinks.weight") if sinks else None
        self.attn = Attention(
            num_heads, num_kv_heads, head_dim, scale, sliding_window, logit_softcap, sink_logits
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)
        qk = qkv[:, : (h + hkv) * d].view(t, h + hkv, d)  # q and k heads, normed and rotated
        v = qkv[:, (h + hkv) * d :].view(t, hkv, d)  # together: fewer small ops per layer
        if self.qk_norm_weight is not None and self.fused_norm and rms_norm.supported(qkv):
            # Norm and rotary in one pass (bitwise apply_rope of the norm's output).
            qk = rms_norm.rms_norm(
                qkv[:, : (h + hkv) * d], self.qk_norm_weight, self.eps, (cos, sin)
            )
        else:
            if self.qk_norm_weight is not None:
                qk = F.rms_norm(qk, (d,), None, self.eps) * self.qk_norm_weight
            qk = apply_rope(qk, cos, sin)
        return self.o_proj(self.attn(qk[:, :h], qk[:, h:], v))
