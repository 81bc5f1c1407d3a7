"""Weight-only quantized linear layers for CPU inference, and which one a GGUF type gets.

Where the CPU and a C compiler allow (AVX512-BF16), the group-quantized linears (Int4Linear,
Int4x2Linear) run every row on girandole's native kernels (kernels.wq_gemm: weights dequantized to
bf16 once per 16x32 panel and reused for all rows, each row computed independently; without AMX
decode rows take int8 activations against the levels, wq_vnni.c), faster than torch's kernels
and than a bf16 F.linear at every row count (docs/benchmarks.md). Without AMX, GGUF's Q6_K
keeps its own levels and scales there (Q6KLinear).

Otherwise torch's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) serve
decode rows; they are fast only with bf16 activations, so these layers take any activation
dtype, run the matmul in bf16 and return float32. For many rows (prefill) a plain bf16
`F.linear` beats both kernels; a layer that keeps a bf16 copy of its weight uses it from
`DENSE_MIN_ROWS` rows on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from girandole.model import kernels
from girandole.model.context import current_decode_rows, int8_prompt_rows
from girandole.model.kernels import wq_gemm

INT4_GROUP = 32
# From this many rows on a bf16 F.linear beats torch's packed kernels.
DENSE_MIN_ROWS = 16
# GGUF storage types that fast mode (CPU) packs as int4 group-32 when the file has no exact
# integer levels to keep; float weights go to int8 groups of 32 (as Q8_0).
INT4_QTYPES = {"Q4_0", "Q4_1", "Q4_K"}
# Types fast mode keeps as bf16 weights. Empty: Q6_K (the default model's 9 ffn_down) is more
# accurate and faster as int8 groups of 32 than as bf16 (figures in docs/benchmarks.md), and
# where the VNNI layout is in use it keeps its own format (Q6KLinear, q6k_native).
BF16_QTYPES: set[str] = set()

# Integer levels of a group-32 weight: q [N, K], scale and offset [N, K/32], w = q * scale + offset.
GroupLevels = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


CHUNK_ROWS = 16384  # rows per step when quantizing big tables (bounds temporary memory)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ~ q * scale[:, None]. Returns (int8 [N, K], float32 [N])."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    for a in range(0, n, CHUNK_ROWS):
        wc = w[a : a + CHUNK_ROWS].float()
        sc = (wc.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q[a : a + CHUNK_ROWS] = torch.round(wc / sc[:, None]).clamp(-127, 127).to(torch.int8)
        scale[a : a + CHUNK_ROWS] = sc
    return q, scale


def quantize_int8_groups(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of `group` inputs (as GGUF's Q8_0, which it reproduces
    exactly): w ~ q * scale[:, k // group]. Returns (int8 [N, K], float32 [N, K/group])."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, k // group, dtype=torch.float32)
    for a in range(0, n, CHUNK_ROWS):
        wc = w[a : a + CHUNK_ROWS].float().reshape(-1, k // group, group)
        sc = (wc.abs().amax(dim=2) / 127.0).clamp(min=1e-12)
        qc = torch.round(wc / sc[..., None]).clamp(-127, 127).to(torch.int8)
        q[a : a + CHUNK_ROWS] = qc.reshape(-1, k)
        scale[a : a + CHUNK_ROWS] = sc
    return q, scale


def quantize_int4_groups(
    w: torch.Tensor, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group` inputs (min/max grid, exact for Q4_K/Q4_1 groups
    that use the whole 0..15 range). Returns (q int32 [N, K] in 0..15, scale [N, K/g],
    zero [N, K/g]) with w ~ (q - 8) * scale + zero (torch's int4pack convention)."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int32)
    scale = torch.empty(n, k // group)
    zero = torch.empty(n, k // group)
    for a in range(0, n, CHUNK_ROWS):
        wg = w[a : a + CHUNK_ROWS].float().reshape(-1, k // group, group)
        lo = wg.amin(dim=-1, keepdim=True)
        hi = wg.amax(dim=-1, keepdim=True)
        sc = ((hi - lo) / 15.0).clamp(min=1e-12)
        q[a : a + CHUNK_ROWS] = torch.round((wg - lo) / sc).clamp(0, 15).reshape(-1, k)
        scale[a : a + CHUNK_ROWS] = sc.squeeze(-1)
        zero[a : a + CHUNK_ROWS] = (lo + 8.0 * sc).squeeze(-1)
    return q, scale, zero


# oneDNN's bf16 matmul rounds differently for fewer than 4 rows on some shapes (K=2048 here);
# padding to 4 rows keeps a row's result independent of how many rows share the call.
MIN_DENSE_ROWS = 4


def torch_forms_needed(n: int, k: int) -> bool:
    """Whether a packed linear [N, K] must keep torch's forms (its packed-kernel layout and the
    bf16 dense copy for prefill rows) beside the native layout: only where the native kernel
    cannot serve it (kernels not built here, or a shape its layout does not take). Skipping them
    elsewhere halves a packed model's cache file and a third of its first build; the cache is
    keyed by this choice (loader._code_hash)."""
    return not (kernels.available() and wq_gemm.supports(n, k))


def native_only_error(what: str) -> RuntimeError:
    """A module built without torch's forms asked for them (cannot happen through the cache,
    whose key says which forms an entry holds)."""
    return RuntimeError(
        f"this {what} was built for girandole's native kernels only, which are not available "
        "now (its model cache entry is keyed by that: rebuild the model)"
    )


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """F.linear whose per-row result does not depend on the number of rows (on CPU)."""
    m = x.shape[0]
    if m >= MIN_DENSE_ROWS or x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight, bias)
    padded = torch.cat([x, x.new_zeros(MIN_DENSE_ROWS - m, x.shape[1])])
    return F.linear(padded, weight, bias)[:m]


class PackedLinear(nn.Module):
    """Base of the weight-only quantized linears: y = x @ W.T + b for float32 (or any) x,
    returned in float32. Subclasses store their packing and supply `_packed(x2)`, a torch packed
    kernel on bf16 rows; this base owns `forward`, the bf16 `dense` copy for prefill rows and
    the native kernel's layout (`native_packed`, `native_params`, `native_bits` > 0 when stored).

    forward: where the native layout is stored and the kernels are built, every row runs on it,
    and torch's forms are not built (`torch_forms_needed`). With AMX that is one row-invariant
    kernel (bf16 tiles); without, the layout is the VNNI one and decode rows run on the int8
    kernel (wq_vnni.c: twice as fast for a few rows), prompt rows on the bf16 kernel (faster
    for many rows, and bf16's precision for prompt logprobs; a MoE block's experts pass every
    row as a decode row: model/moe.py), unless the engine runs prompt rows on the int8 kernel
    too (EngineConfig.int8_prompts: faster prefill at int8's accuracy, a prompt token computed
    as a decoded one is). Otherwise `_packed` serves decode rows and `dense` prefill rows.
    Inside an engine step the ModelRunner puts decode tokens first and says how many there are
    (`current_decode_rows`), so a token's kernel depends on its role, never on how many other
    tokens share the step: results are batch-invariant. On its own, the row count decides.
    """

    native_bits = 0  # 0: no native layout stored
    torch_forms = True  # False: only the native layout is stored (torch_forms_needed)

    def __init__(
        self, shape: tuple[int, int], bias: torch.Tensor | None, dense: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.register_buffer("bias", None if bias is None else bias.float())
        self.register_buffer("dense", dense)

    def _packed(self, x2: torch.Tensor) -> torch.Tensor:
        """float32 [M, N] for bf16 rows x2 [M, K], on a torch packed kernel."""
        raise NotImplementedError

    def _store_native(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        """Also keep the weight in the native kernel's layout (kernels.wq_gemm): levels q [N, K]
        with w = q * scale + offset per group of 32. Both layouts are stored; from the
        memory-mapped model cache only the one in use is ever read into memory."""
        n, k = q.shape
        if wq_gemm.supports(n, k):
            vnni = wq_gemm.vnni_default()
            packed, params, bits = wq_gemm.pack(q, scale, offset, vnni=vnni)
        else:
            packed = params = None
            bits = 0
        self.register_buffer("native_packed", packed)
        self.register_buffer("native_params", params)
        self.native_bits = bits

    def native_forward(self, x2: torch.Tensor, decode: int | None = None) -> torch.Tensor:
        """float32 [M, N] for rows x2 [M, K] on the native kernel. decode: the leading rows that
        are decode rows (the int8 kernel in the VNNI layout); None: the step's (decode_rows).
        MoE experts pass every row (model/moe.py)."""
        return wq_gemm.gemm(
            x2,
            self.native_packed,
            self.native_params,
            self.native_bits,
            self.out_features,
            decode_rows=native_decode_rows(x2.shape[0]) if decode is None else decode,
        )

    @property
    def thread_invariant(self) -> bool:
        """Whether its numbers are the same at any thread count (engine/cpu_threads.py): on the
        native kernels (torch's packed and bf16 kernels make no promise)."""
        return bool(self.native_bits) and kernels.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.native_bits and kernels.available():
            y = self.native_forward(x2)
        else:
            y = self._decode_or_dense(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def _decode_or_dense(self, x2: torch.Tensor) -> torch.Tensor:
        if not self.torch_forms:
            raise native_only_error("layer")
        m = x2.shape[0]
        k = m if self.dense is None else decode_rows(m)
        if k >= m:
            return self._packed(x2)
        if k == 0:
            return dense_linear(x2, self.dense).float()
        return torch.cat([self._packed(x2[:k]), dense_linear(x2[k:], self.dense).float()])


def decode_rows(m: int) -> int:
    """How many leading rows of an m-row input are decode rows: the engine step's count, or
    outside a step all of them below DENSE_MIN_ROWS rows, else none."""
    k = current_decode_rows()
    if k is None:
        k = m if m < DENSE_MIN_ROWS else 0
    return min(k, m)


def native_decode_rows(m: int) -> int:
    """decode_rows for the native kernels: every row where the step runs its prompt rows on
    the int8 kernel too (EngineConfig.int8_prompts; torch's fallback forms keep prompt rows on
    their bf16 copy, the faster there)."""
    return m if int8_prompt_rows() else decode_rows(m)


def group_dense(levels: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] of levels * scale + offset per group of INT4_GROUP inputs."""
    n, k = levels.shape
    g = INT4_GROUP
    w = levels.reshape(n, k // g, g).float() * scale[..., None] + offset[..., None]
    return w.reshape(n, k).to(torch.bfloat16)


class Int8Linear(PackedLinear):
    """int8 per-output-channel weights (w = q * scale[n]) on torch's int8pack kernel."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, keep_dense: bool = True
    ) -> None:
        q, scale = quantize_int8_rows(weight)
        dense = (q.float() * scale[:, None]).to(torch.bfloat16) if keep_dense else None
        super().__init__(weight.shape, bias, dense)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def _packed(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale).float()


class Int4Linear(PackedLinear):
    """Weight-only int4 (group 32, asymmetric) linear on torch's CPU int4pack kernel."""

    def __init__(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        torch_forms: bool | None = None,
        groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """From a float weight [N, K] (requantized on a min/max grid), or from `groups`:
        the exact (q [N, K] in 0..15, scale [N, K/32], zero [N, K/32]) of a 4-bit file type.
        `torch_forms`: also build torch's forms (None: where needed, torch_forms_needed)."""
        q, scale, zero = groups if groups is not None else quantize_int4_groups(weight)
        if torch_forms is None:
            torch_forms = torch_forms_needed(*q.shape)
        super().__init__(q.shape, bias, group_dense(q - 8, scale, zero) if torch_forms else None)
        self.torch_forms = torch_forms
        packed, sz = pack_int4(q, scale, zero) if torch_forms else (None, None)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", sz)
        self._store_native(q, scale, zero - 8.0 * scale)

    def _packed(self, x2: torch.Tensor) -> torch.Tensor:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        return mm(x2, self.packed, INT4_GROUP, self.scale_zeros).float()


def int4_supported(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return k % INT4_GROUP == 0 and k % 64 == 0 and n % 16 == 0


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """torch's int4pack layout of levels q [N, K] in 0..15 (w = (q - 8) * scale + zero), and its
    bf16 scale-and-zero table [K/32, N, 2]."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


class Int4x2Linear(PackedLinear):
    """Exact 5- to 8-bit group-32 weights (GGUF Q5_0, Q8_0) as two int4 matmuls.

    A level q in 0..255 (value = q * scale + offset) splits into nibbles q = lo + 16 * hi, so
    W = (lo - 8) * scale + (16 * hi * scale + 8 * scale + offset): two int4-packed matrices in
    torch's convention (dequant (n - 8) * s + z). About the bytes of int8, without int8's
    per-row requantization error."""

    def __init__(
        self,
        groups: GroupLevels,
        bias: torch.Tensor | None = None,
        torch_forms: bool | None = None,
    ) -> None:
        """`torch_forms`: also build torch's forms (None: where needed, torch_forms_needed)."""
        q, scale, offset = groups
        if torch_forms is None:
            torch_forms = torch_forms_needed(*q.shape)
        super().__init__(q.shape, bias, group_dense(q, scale, offset) if torch_forms else None)
        self.torch_forms = torch_forms
        self._store_native(q, scale, offset)
        if torch_forms:
            self._store_int4_halves(q, scale, offset)

    def _store_int4_halves(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
        lo, hi = q & 15, q >> 4
        # bf16 rounds each group's zero point by up to 2^-9 of its size, an error shared by the
        # whole group: keep both zero points small. Each group's `hi` is shifted by `c` to sit
        # around 8 (c = 7 for Q5_0's one high bit, 0 for Q8_0's full nibble).
        n, k = q.shape
        hi_g = hi.reshape(n, k // INT4_GROUP, INT4_GROUP)
        c = 8 - (hi_g.amax(dim=-1) + 1) // 2  # [N, K/g]
        hi = (hi_g + c[..., None]).reshape(n, k)
        lo_packed, lo_sz = pack_int4(lo, scale, torch.zeros_like(scale))
        self.register_buffer("lo_packed", lo_packed)
        self.register_buffer("lo_sz", lo_sz)
        zero_hi = offset + 8.0 * scale - (c - 8).float() * 16.0 * scale
        hi_packed, hi_sz = pack_int4(hi, 16.0 * scale, zero_hi)
        self.register_buffer("hi_packed", hi_packed)
        self.register_buffer("hi_sz", hi_sz)

    def _packed(self, x2: torch.Tensor) -> torch.Tensor:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x2, self.lo_packed, INT4_GROUP, self.lo_sz).float()
        y += mm(x2, self.hi_packed, INT4_GROUP, self.hi_sz).float()
        return y


# A Q6_K tensor as the file stores it: levels uint8 [N, K] in 0..63, scales int8 [N, K/16],
# d float16 [N, K/256]; w = d * scale * (level - 32) (loader/gguf.py's decode_q6_k).
Q6KParts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def q6k_native(n: int, k: int) -> bool:
    """Whether a Q6_K weight [N, K] is kept in its own format (Q6KLinear) rather than as int8
    groups of 32: where the linears take the VNNI layout, whose kernels alone read it."""
    return kernels.available() and wq_gemm.vnni_default() and wq_gemm.supports_q6k(n, k)


class Q6KLinear(PackedLinear):
    """A GGUF Q6_K weight in its own native format (kernels.wq_gemm.pack_q6k: the file's 6-bit
    levels and scales, 6.5625 bits a weight, exact) on the VNNI layout's kernels: decode rows
    int8 (wq_vnni.c), prompt rows bf16 (wq_gemm.c). Int8 groups of 32 (Int4x2Linear), the
    form elsewhere, took 10 bits a weight and rounded the weights a second time. Only where
    q6k_native: it keeps no torch forms."""

    torch_forms = False

    def __init__(self, parts: Q6KParts, bias: torch.Tensor | None = None) -> None:
        levels, sc, d = parts
        super().__init__(tuple(levels.shape), bias, None)
        packed, params, bits = wq_gemm.pack_q6k(levels, sc, d)
        self.register_buffer("native_packed", packed)
        self.register_buffer("native_params", params)
        self.native_bits = bits


class ConcatLinear(PackedLinear):
    """Packed linears over the same input whose outputs are concatenated: a fused projection
    (q, k and v) whose parts are stored at different widths because the checkpoint stores them
    so. Llama-family Q4_K_M files keep q and k in Q4_K but v in Q6_K in half the layers: one
    fused matrix would take the widest storage for every row (q and k as 8-bit groups, twice
    their bytes, and no longer the file's exact levels); here q and k stay exact 4-bit levels
    and only v is 8-bit. On the native kernel each part writes its columns of one output (no
    copy); otherwise the parts' outputs are concatenated. The parts' biases are this module's."""

    def __init__(self, parts: list[PackedLinear]) -> None:
        biases = [p.bias for p in parts]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [b if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, parts)]
            )
        k = parts[0].in_features
        assert all(p.in_features == k for p in parts)
        super().__init__((sum(p.out_features for p in parts), k), bias, None)
        for p in parts:
            p.bias = None
        self.parts = nn.ModuleList(parts)

    @property
    def native_bits(self) -> int:  # type: ignore[override]
        """Non-zero where every part is stored in the native kernel's layout."""
        return min(p.native_bits for p in self.parts)

    def columns(self) -> list[tuple[PackedLinear, int, int]]:
        """Each part with the output columns [start, stop) it computes."""
        out, start = [], 0
        for p in self.parts:
            out.append((p, start, start + p.out_features))
            start += p.out_features
        return out

    def native_forward(self, x2: torch.Tensor, decode: int | None = None) -> torch.Tensor:
        x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
        if x2.shape[0] == 0:
            return y
        k = native_decode_rows(x2.shape[0]) if decode is None else decode
        for p, start, stop in self.columns():
            calls = wq_gemm.bind_rows(
                x2, p.native_packed, p.native_params, p.native_bits, y[:, start:stop], decode_rows=k
            )
            for fn, args in calls:
                fn(*args)
        return y

    def _decode_or_dense(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.cat([p._decode_or_dense(x2) for p in self.parts], dim=1)


def linear_from_groups(groups: GroupLevels, bias: torch.Tensor | None) -> PackedLinear:
    """The packed linear keeping a checkpoint's own group-32 levels exactly (int4_supported
    shapes): 4-bit where they fit, else two int4 halves."""
    q, scale, offset = groups
    if int(q.max()) <= 15:
        return Int4Linear(None, bias, groups=(q, scale, offset + 8.0 * scale))
    return Int4x2Linear(groups, bias)


def quantized_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, qtypes: set[str]
) -> PackedLinear:
    """The packed linear for a float `weight` [N, K] stored in the checkpoint as `qtypes` (fast
    mode on CPU) without group-32 levels of its own (those: linear_from_groups)."""
    if not int4_supported(weight):
        return Int8Linear(weight, bias)
    if qtypes <= INT4_QTYPES:
        return Int4Linear(weight, bias)
    # Float (or other) weights: int8 per group of 32 (as Q8_0), as two int4 matmuls: about
    # 3x less error than int8 per row.
    q, scale = quantize_int8_groups(weight, INT4_GROUP)
    return Int4x2Linear((q.to(torch.int32) + 128, scale, -128.0 * scale), bias)
