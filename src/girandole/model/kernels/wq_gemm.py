"""Native weight-quantized GEMM (csrc/wq_gemm.c, csrc/wq_vnni.c) for the group-quantized linears.

`pack` turns integer levels q [N, K] with (scale, offset) per row and group of 32 inputs into
a kernel's layout; `gemm` and `bind_rows` run it. Two layouts:
- the panel layout (csrc/wq_panel.h), where the CPU has AMX: every row on the AMX tiles in bf16
  (csrc/amx.c; one kernel for every row count keeps rows batch-invariant), or on AVX512-BF16;
- the VNNI layout (`vnni`), elsewhere (AMD Zen 4, Intel before Sapphire Rapids): decode rows on
  the int8 kernel (x quantized per group of 32, as llama.cpp's Q8_0; about twice as fast as
  bf16 for a few rows, where the bf16 kernel is bound by its instructions), prompt rows on the
  bf16 kernel reading the same bytes (faster for many rows, and bitwise the panel layout's
  results). A row's kernel follows its role, never the row count: batch-invariant too.
`pack_q6k` keeps GGUF's Q6_K as the file stores it (6-bit levels, an int8 scale per 16 inputs, a
float16 d per 256) in a format of the VNNI layout, which both its kernels read.
GIRANDOLE_VNNI=0 packs the panel layout everywhere (bf16 for every row). Available where the
kernels build (loader.py; on AVX2-only CPUs as well, where the int8 kernel is 1.4x faster
than the bf16 one even at 128 rows, but prompt rows keep bf16's precision there too, except a
MoE block's experts', which take the int8 kernel: model/moe.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from girandole.env_switches import env_switch
from girandole.model.kernels import loader

GROUP = 32
BLOCK_N = 16
CHUNK = 4  # blocks per chunk, as in the C source
LEVEL_BITS = 15  # the levels' width, 4, 5 or 8, in these bits of `bits` (WQ_LEVEL_BITS in C)
FUSED = 16  # or'ed into bits where q * scale + offset is exact in float32 (WQ_FUSED in C)
HALF = 32  # or'ed into bits where the scales and offsets are stored as float16 (WQ_HALF in C)
FACTORED = 64  # or'ed into bits where they are stored as factor x integer (WQ_FACTORED in C)
VNNI = 128  # or'ed into bits where the levels are in csrc/wq_vnni.c's layout (its kernel's)
SUPER = 8  # groups of a superblock sharing factors (WQ_SUPER in C)
Q6K = 6  # level bits of GGUF Q6_K's own format, with VNNI (WQ_Q6K in C; pack_q6k)
Q6K_SUPER = 256  # inputs per Q6_K superblock (one float16 d per channel)


def supports(n: int, k: int) -> bool:
    return n % BLOCK_N == 0 and k % GROUP == 0


def supports_q6k(n: int, k: int) -> bool:
    """Whether a Q6_K weight [N, K] can be packed in its own format (pack_q6k), which only the
    VNNI layout's kernels read (decode rows int8, prompt rows bf16)."""
    return n % BLOCK_N == 0 and k % Q6K_SUPER == 0


def exact_in_float32(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> bool:
    """Whether q * scale + offset, per group of 32, is the same computed in float32 (a multiply
    and an add, each rounded) as exactly. Decided per group from its scale, offset and highest
    level (1/32 of the work of computing every weight both ways, the slowest part of packing a
    model): a sufficient condition, so a group it cannot vouch for counts as inexact (the kernel
    then multiplies and adds, which gives the same floats for an exact group anyway).

    With s = ms * 2**es and o = mo * 2**eo (ms, mo odd integers) and levels 0..qmax: every
    q * s is exact when qmax * |ms| < 2**24, and every q * s + o is the integer
    q * ms * 2**(es - u) + mo * 2**(eo - u) times 2**u, u = min(es, eo), exact when that
    integer stays below 2**24 in magnitude: it is linear in q, so at q = 0 and q = qmax."""
    n, k = q.shape
    if int(q.min()) < 0:
        return False
    qmax = q.reshape(n, k // GROUP, GROUP).amax(dim=-1).to(torch.int64)
    ms, es = _odd_mantissa(scale.float())
    mo, eo = _odd_mantissa(offset.float())
    limit = 1 << 24
    if bool((qmax * ms.abs() >= limit).any()):
        return False
    u = torch.minimum(es, eo)  # a zero's exponent never wins; both zero: any unit will do
    u = torch.where(u == _NO_BITS, 0, u)
    shift_s = torch.where(ms != 0, es - u, 0)
    shift_o = torch.where(mo != 0, eo - u, 0)
    if bool((shift_s > 40).any() or (shift_o > 40).any()) or bool(((u < -120) | (u > 90)).any()):
        return False
    a, b = ms << shift_s, mo << shift_o
    top = torch.maximum(b.abs(), (qmax * a + b).abs())
    return bool((top < limit).all())


_NO_BITS = 1 << 20  # the exponent given to a zero: it never sets the group's unit


def _odd_mantissa(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x = m * 2**e with m an odd integer (int64 each; a zero: m 0, e _NO_BITS), from
    x's bits (finite x)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    biased = (bits >> 23) & 0xFF
    frac = bits & 0x7FFFFF
    normal = biased != 0  # else subnormal: no implicit bit, the smallest exponent
    m = torch.where(normal, frac | (1 << 23), frac)
    e = torch.where(normal, biased - 150, -149)
    low = (m & -m).float()  # the lowest set bit's value, a power of two below 2**24: exact
    zeros = torch.where(m != 0, (low.view(torch.int32) >> 23).to(torch.int64) - 127, 0)
    m = torch.where(bits < 0, -m, m) >> zeros
    return m, torch.where(m != 0, e + zeros, _NO_BITS)


def exact_in_float16(*values: torch.Tensor) -> bool:
    """Whether every value is a float16 number (GGUF's scales, and offsets of whole levels)."""
    return all(torch.equal(v.float().half().float(), v.float()) for v in values)


def level_bits(q: torch.Tensor) -> int:
    top = int(q.max())
    return 4 if top <= 15 else 5 if top <= 31 else 8


def vnni_default() -> bool:
    """Whether linears are packed for the VNNI kernel (int8 activations): where the native
    kernels run without AMX. With AMX the bf16 tiles are the faster (and batch-invariant) path
    for every row count, and they read the panel layout."""
    return loader.available() and not loader.amx() and env_switch("VNNI")


def pack(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, vnni: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Levels q [N, K] (0..15, 0..31 or 0..255), scale and offset [N, K/32] (w = q * scale +
    offset) -> (packed uint8 weights, params, bits) in the bf16 kernels' layout
    (csrc/wq_panel.h), or with `vnni` the VNNI kernel's (csrc/wq_vnni.c; VNNI or'ed in bits).
    `bits`: 4, 5 or 8, with FUSED or'ed in where no weight's q * scale + offset rounds in
    float32 (then the kernel's one FMA gives the same floats as a multiply and an add), FACTORED
    where each superblock's params are a factor times small integers (factor_params: stored so,
    0.75 bits a weight; 0.625 where the factors are float16 numbers, HALF or'ed in too:
    half_factors), else HALF where they are float16 numbers (then stored so: half the bytes of
    float32)."""
    n, k = q.shape
    nb, g = n // BLOCK_N, k // GROUP
    bits = level_bits(q)
    v = q.to(torch.uint8).reshape(nb, BLOCK_N, g, GROUP).transpose(1, 2)  # [block, g, c, input]
    if vnni:
        v = _vnni_levels(v, bits)
    elif bits in (4, 5):
        # Word i of line t holds input i's levels of channels 4t .. 4t + 3, a nibble each: its
        # low byte channels 4t and 4t + 1, its high byte the next two (little-endian).
        low = (v & 15).reshape(nb, g, 4, 2, 2, GROUP)
        pairs = low[..., 0, :] | (low[..., 1, :] << 4)  # [block, g, t, byte, input]
        parts = [pairs.transpose(-1, -2).reshape(nb, g, -1)]
        if bits == 5:  # word i: bit c is bit 4 of channel c's level at input i
            top = ((v >> 4) & 1).reshape(nb, g, 2, 8, GROUP)
            top = (top << torch.arange(8, dtype=torch.uint8).reshape(8, 1)).sum(
                3, dtype=torch.uint8
            )
            parts.append(top.transpose(-1, -2).reshape(nb, g, -1))
        v = torch.cat(parts, dim=-1)
    v = v.reshape(nb, g, -1)
    factored = factor_params(scale, offset)
    if factored is not None:  # float16 factors where they can be: half their bytes
        factored = half_factors(*factored) or factored
    half = exact_in_float16(scale, offset) if factored is None else factored[1].dtype == torch.half
    if factored is not None:
        params, factors = factored  # [N, 2, g] integers, [N, 2, g / SUPER] factors
    else:
        params = torch.stack([scale.float(), offset.float()], dim=1)  # [N, 2, g]
        if half:
            params = params.half()
    packed = _chunked(v)
    params = _chunked(_by_block(params))
    if factored is not None:  # the integers' bytes, then the factors'
        params = torch.cat([params, _chunked(_by_block(factors)).view(torch.uint8)])
    if exact_in_float32(q, scale, offset):
        bits |= FUSED
    if half:
        bits |= HALF
    if factored is not None:
        bits |= FACTORED
    if vnni:
        bits |= VNNI
    return packed, params, bits


def _vnni_levels(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels [block, g, channel, input] uint8 -> [block, g, bytes] in wq_vnni.c's layout: quad
    k's byte 4c + b is channel c's level at input 4k + b."""
    nb, g = v.shape[:2]
    quads = v.reshape(nb, g, BLOCK_N, 8, 4).permute(0, 1, 3, 2, 4).reshape(nb, g, 8, 64)
    if bits == 8:
        return quads.reshape(nb, g, 512)
    low = quads & 15
    parts = [(low[:, :, :4] | (low[:, :, 4:] << 4)).reshape(nb, g, 256)]
    if bits == 5:  # per quad a little-endian 64-bit word: bit i is bit 4 of the quad's byte i
        top = ((quads >> 4) & 1).reshape(nb, g, 8, 8, 8)
        weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
        parts.append((top * weights).sum(-1, dtype=torch.uint8).reshape(nb, g, 64))
    return torch.cat(parts, dim=-1)


def pack_q6k(
    levels: torch.Tensor, sc: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """GGUF Q6_K as the file stores it, w = d * sc * (levels - 32): levels [N, K] in 0..63, sc
    int8 [N, K/16] (one per 16 inputs), d float16 [N, K/256] -> (packed uint8 levels, params
    uint8, bits) in the VNNI layout's Q6_K format (csrc/wq_panel.h, WQ_Q6K): 6 bits a level,
    the group's two int8 scales a channel, then each superblock's float16 d: 6.5625 bits a
    weight, the file's, where the int8-group form took 10. Exact: the kernels compute the file's
    d * sc * (q - 32), each exact in float32."""
    n, k = levels.shape
    assert supports_q6k(n, k) and sc.shape == (n, k // 16) and d.shape == (n, k // Q6K_SUPER)
    nb, g = n // BLOCK_N, k // GROUP
    v = levels.to(torch.uint8).reshape(nb, BLOCK_N, g, GROUP).transpose(1, 2)
    quads = v.reshape(nb, g, BLOCK_N, 8, 4).permute(0, 1, 3, 2, 4).reshape(nb, g, 8, 64)
    low = quads & 15
    nibbles = (low[:, :, :4] | (low[:, :, 4:] << 4)).reshape(nb, g, 256)
    # part h, byte i: bits 2t, 2t + 1 are bits 4, 5 of quad 4h + t's byte i
    top = ((quads >> 4) & 3).reshape(nb, g, 2, 4, 64)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)
    tops = (top << shifts).sum(3, dtype=torch.uint8).reshape(nb, g, 128)
    packed = _chunked(torch.cat([nibbles, tops], dim=-1))
    scales = sc.to(torch.int8).reshape(n, g, 2).transpose(1, 2)  # [N, 2 (inputs 0..15, 16..31), g]
    supers = d.to(torch.float16).reshape(nb, BLOCK_N, k // Q6K_SUPER).transpose(1, 2)
    params = torch.cat(
        [_chunked(_by_block(scales)).view(torch.uint8), _chunked(supers).view(torch.uint8)]
    )
    return packed, params, Q6K | VNNI


def _by_block(t: torch.Tensor) -> torch.Tensor:
    """Per-row params [N, 2, G] -> [block, G, 2, channel]: a block's 16 scales, then offsets."""
    n, two, groups = t.shape
    return t.reshape(n // BLOCK_N, BLOCK_N, two, groups).permute(0, 3, 2, 1)


def _chunked(t: torch.Tensor) -> torch.Tensor:
    """[block, g, ...] in chunks of CHUNK blocks, each stored group-major ([chunk][g][block]...),
    flat (the last chunk may have fewer blocks)."""
    whole = t.shape[0] // CHUNK * CHUNK
    head = t[:whole].reshape(whole // CHUNK, CHUNK, *t.shape[1:]).transpose(1, 2).reshape(-1)
    tail = t[whole:].transpose(0, 1).reshape(-1)
    return torch.cat([head, tail]).contiguous()


def factor_params(
    scale: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Scales and offsets [N, G] as exact products factor x integer, one float32 factor per
    row and superblock of SUPER groups and an integer 0..255 per group: (uint8 [N, 2, G],
    float32 [N, 2, G / SUPER]) with index 1 scale then offset, or None where some superblock
    has no such form (GGUF's K-quants have it: a float16 d times 6-bit scales; Q4_0/Q8_0's free
    float16 scales rarely do). The factor is the values' greatest common divisor as dyadic
    numbers: any common factor with integers below 256 divides it."""
    n, groups = scale.shape
    if groups % SUPER:
        return None
    v = torch.stack([scale.float(), offset.float()], dim=1).reshape(n, 2, groups // SUPER, SUPER)
    top, bottom = v.amax(dim=-1), v.amin(dim=-1)
    if bool(((top > 0) & (bottom < 0)).any()):  # a superblock's values must share a sign
        return None
    sign = torch.where(bottom < 0, -1.0, 1.0)
    m, e = _odd_mantissa(v.abs())
    low = torch.where(m != 0, e, _NO_BITS).amin(dim=-1, keepdim=True)  # the smallest unit
    shift = torch.where(m != 0, e - low, 0)
    if bool((shift > 38).any()):  # values too far apart for 64-bit integers (and for 0..255)
        return None
    a = m << shift  # value = a * 2**low, exactly
    d = a[..., 0]
    for i in range(1, SUPER):
        d = torch.gcd(d, a[..., i])
    d = torch.where(d == 0, 1, d)
    integers = a // d[..., None]
    low = torch.where(low == _NO_BITS, 0, low).squeeze(-1)
    factors = (sign * d.double() * torch.pow(2.0, low.double())).float()
    if bool((integers > 255).any()):
        return None
    # The kernel's float32 product must give each value back exactly.
    if not torch.equal(factors[..., None] * integers.float(), v):
        return None
    return integers.to(torch.uint8).reshape(n, 2, groups), factors


def half_factors(
    integers: torch.Tensor, factors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """factor_params' products with float16 factors: each factor divided by the least whole k
    that makes it a float16 number (exactly), its integers multiplied by k (still below 256);
    None where some factor has no such k. GGUF's K-quants: a factor is d (a float16) times the
    gcd of its superblock's 6-bit scales, a float16 itself but where that gcd adds significant
    bits (~0.03 % of a Q4_K file's superblocks: there k is the gcd's odd part or a divisor).
    Half the factors' bytes: Q4_K's linears stream 4.625 bits a weight instead of 4.75."""
    n, two, groups = integers.shape
    ints = integers.reshape(n, two, groups // SUPER, SUPER).long()
    top = ints.amax(dim=-1)
    k = torch.ones_like(factors)
    todo = factors.half().float() != factors
    if bool(todo.any()):
        idx = todo.nonzero(as_tuple=True)
        f, left, kk = factors[idx], torch.ones(int(todo.sum()), dtype=torch.bool), k[idx]
        for cand in range(2, 256):
            g = f / cand
            ok = left & (g.half().float() == g) & (g * cand == f) & (top[idx] * cand <= 255)
            kk = torch.where(ok, float(cand), kk)
            left &= ~ok
            if not bool(left.any()):
                break
        if bool(left.any()):
            return None
        k[idx] = kk
    halves = (factors / k).half()
    scaled = ints * k.long()[..., None]
    # The kernel's float32 products must be factor_params' exactly.
    if not torch.equal(
        halves.float()[..., None] * scaled.float(), factors[..., None] * ints.float()
    ):
        return None
    return scaled.to(torch.uint8).reshape(n, two, groups), halves


def gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    params: torch.Tensor,
    bits: int,
    out_features: int,
    amx: bool | None = None,
    decode_rows: int | None = None,
) -> torch.Tensor:
    """float32 [M, N] = x [M, K] (cast to bf16) times the packed weight's transpose. `amx`:
    force the AMX (True) or AVX512 (False) kernel; None: AMX where it runs. `decode_rows`: see
    bind_rows."""
    x = x.to(torch.bfloat16).contiguous()
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    for fn, args in bind_rows(x, packed, params, bits, y, amx, decode_rows=decode_rows):
        fn(*args)
    return y


def bind_rows(
    x: torch.Tensor,
    packed: torch.Tensor,
    params: torch.Tensor,
    bits: int,
    y: torch.Tensor,
    amx: bool | None = None,
    threads: int | None = None,
    decode_rows: int | None = None,
) -> list[tuple[Callable, tuple]]:
    """The native calls computing y from x (see bind). In the VNNI layout the first
    `decode_rows` rows (every row where None) are decode rows, on the int8 kernel, and the rest
    prompt rows, on the bf16 one: a row's kernel follows its role, not the row count."""
    m = x.shape[0]
    if m == 0:
        return []
    if not bits & VNNI or decode_rows is None or decode_rows >= m:
        return [bind(x, packed, params, bits, y, amx, threads)]
    calls = []
    if decode_rows > 0:
        calls.append(bind(x[:decode_rows], packed, params, bits, y[:decode_rows], amx, threads))
    rest = slice(decode_rows, None)
    calls.append(bind(x[rest], packed, params, bits, y[rest], amx, threads, decode=False))
    return calls


def bind(
    x: torch.Tensor,
    packed: torch.Tensor,
    params: torch.Tensor,
    bits: int,
    y: torch.Tensor,
    amx: bool | None = None,
    threads: int | None = None,
    decode: bool = True,
) -> tuple[Callable, tuple]:
    """The native call computing y [M, N] (float32; rows contiguous, at any row stride: a
    column slice of a wider output) from bf16 x [M, K] (contiguous): the function and its
    arguments, to call now or replay (engine/cpu_graphs.py). A weight in the VNNI layout runs
    on the int8 kernel for decode rows (`decode`), else on the bf16 one (the same weights)."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    assert x.dtype == torch.bfloat16 and x.is_contiguous()
    assert y.dtype == torch.float32 and y.stride(1) == 1 and y.stride(0) >= y.shape[1]
    m, k = x.shape
    if bits & VNNI and decode:
        assert not amx, "the VNNI kernel has no AMX twin"
        fn = lib.wq_gemm_vnni
    else:
        fn = lib.wq_gemm_amx if loader.use_amx(amx, m) else lib.wq_gemm
    threads = torch.get_num_threads() if threads is None else threads
    return fn, (
        x.data_ptr(), m, k, packed.data_ptr(), bits, params.data_ptr(), y.shape[1],
        y.data_ptr(), y.stride(0), threads,
    )  # fmt: skip
