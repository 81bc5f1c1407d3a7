"""The native weight-quantized GEMMs (girandole/model/kernels/csrc/wq_gemm.c, its AMX twin in
amx.c where the CPU has AMX, and the int8-activation one of wq_vnni.c): their results against a
float64 product with the same bf16 weights (VNNI: with x's int8 rows), row invariance, and the
quantized linears that use them against torch's int4 kernels."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from girandole.model import kernels, quant
from girandole.model.kernels import loader, wq_gemm

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="native kernels unavailable here (x86 with AVX512 VNNI and BF16, C compiler)",
)


# (vnni, amx): the bf16 kernels on the panel layout (AVX512; AMX where the CPU has it) and the
# VNNI kernel on its own layout.
PATHS = [
    pytest.param((False, False), id="avx512"),
    pytest.param(
        (False, True),
        id="amx",
        marks=pytest.mark.skipif(not loader.amx(), reason="no AMX here"),
    ),
    pytest.param((True, None), id="vnni"),
]


def _levels(n: int, k: int, top: int, seed: int, as_gguf: bool = False):
    """Random levels, scales and offsets; `as_gguf`: float16 scales and offsets of whole levels
    (as Q4_0/Q5_0/Q8_0 store them), so q * scale + offset is exact and the kernel fuses it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, top, (n, k), generator=g, dtype=torch.int32)
    scale = torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3
    if as_gguf:
        scale = scale.half().float()
        return q, scale, -scale * (top // 2)
    offset = -scale * (top / 2) + torch.randn(n, k // 32, generator=g) * 1e-3
    return q, scale, offset


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x's bf16 rows as wq_vnni.c quantizes them (per group of 32: d = max|x| / 127, round(x /
    d) to even, in float32 steps), back in float64: d * xq."""
    m, k = x.shape
    xg = x.to(torch.bfloat16).float().reshape(m, k // 32, 32)
    d = xg.abs().amax(dim=-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    xq = torch.round(xg * inv[..., None])
    assert int(xq.abs().max()) <= 127
    return (xq.double() * d.double()[..., None]).reshape(m, k)


def _expected(x: torch.Tensor, q, scale, offset, vnni: bool = False) -> torch.Tensor:
    """The float64 product of the bf16 kernels' operands (bf16 x and weights), or with `vnni`
    of the VNNI kernel's (int8 rows of x, the exact weights)."""
    n, k = q.shape
    w = q.float().reshape(n, k // 32, 32) * scale[..., None] + offset[..., None]
    if vnni:
        return _int8_rows(x) @ w.reshape(n, k).double().t()
    w = w.reshape(n, k).to(torch.bfloat16).double()
    return x.to(torch.bfloat16).double() @ w.t()


# N = 80 and 48: the last chunk of 64 channels is partial. Levels below 16 are stored in 4 bits,
# below 32 (Q5_0) in 5, others (Q6_K, Q8_0) in 8. 13 rows: one partial AMX tile; 37: two whole
# ones and a partial one.
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("as_gguf", [False, True], ids=["float", "gguf"])
@pytest.mark.parametrize("rows", [1, 13, 37])
@pytest.mark.parametrize(
    "n,k,top",
    # 16-channel blocks: 16, 5 (a chunk of 4, then 1), 3, 1, 4 and 6 (4, then 2)
    [(256, 640, 16), (80, 64, 32), (48, 96, 256), (16, 32, 16), (64, 128, 64), (96, 64, 16)],
)
def test_matches_float64_product(n, k, top, rows, path, as_gguf):
    vnni, amx = path
    q, scale, offset = _levels(n, k, top, seed=n + k, as_gguf=as_gguf)
    packed, params, bits = wq_gemm.pack(q, scale, offset, vnni=vnni)
    assert bool(bits & wq_gemm.VNNI) == vnni
    level_bits = {16: 4, 32: 5}.get(top, 8)
    assert bits & wq_gemm.LEVEL_BITS == level_bits
    assert packed.numel() == n * k * level_bits // 8
    assert bool(bits & wq_gemm.FUSED) == as_gguf
    # GGUF's float16 scales (and offsets of whole levels) are stored as float16: half the bytes.
    assert bool(bits & wq_gemm.HALF) == as_gguf
    assert params.dtype == (torch.float16 if as_gguf else torch.float32)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    y = wq_gemm.gemm(x, packed, params, bits, n, amx=amx)
    expected = _expected(x, q, scale, offset, vnni)
    err = (y.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-5, f"relative error {err:.2e}"
    if vnni:  # int8 rows: within their rounding of the bf16 product
        exact = _expected(x, q, scale, offset)
        assert (y.double() - exact).abs().max() / exact.abs().max() < 2e-2


def _k_quant_levels(n: int, k: int, seed: int):
    """Q4_K's form: per 256 inputs a float16 d and dmin per row, per group 6-bit sc and m;
    scale = d * sc, offset = -dmin * m (zero sc and m included)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    d = (torch.rand(n, k // 256, 1, generator=g) * 1e-3).half().float()
    dmin = (torch.rand(n, k // 256, 1, generator=g) * 1e-3).half().float()
    sc = torch.randint(0, 64, (n, k // 256, 8), generator=g).float()
    m = torch.randint(0, 64, (n, k // 256, 8), generator=g).float()
    return q, (d * sc).reshape(n, -1), (-(dmin * m)).reshape(n, -1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 13, 37])
def test_k_quant_params_are_stored_factored_with_the_same_results(rows, path, monkeypatch):
    """Q4_K's scales and offsets are kept as a float16 factor per row and superblock times
    integers (40 bytes for a block's group, not 128; float32 factors where some factor is no
    float16 number: 48) and give bitwise the results of the float32 ones; the factors found
    reproduce every value exactly."""
    vnni, amx = path
    q, scale, offset = _k_quant_levels(80, 512, seed=rows)
    packed, params, bits = wq_gemm.pack(q, scale, offset, vnni=vnni)
    assert bits & wq_gemm.FACTORED and bits & wq_gemm.HALF
    assert params.numel() == 80 * 16 * 2 + 80 * 2 * 2 * 2  # integers, then float16 factors
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(7))
    y = wq_gemm.gemm(x, packed, params, bits, 80, amx=amx)
    with monkeypatch.context() as m:  # float32 factors
        m.setattr(wq_gemm, "half_factors", lambda integers, factors: None)
        wide = wq_gemm.pack(q, scale, offset, vnni=vnni)
    assert wide[2] & wq_gemm.FACTORED and not wide[2] & wq_gemm.HALF
    assert wide[1].numel() == 80 * 16 * 2 + 80 * 2 * 2 * 4
    assert torch.equal(y, wq_gemm.gemm(x, *wide, 80, amx=amx))
    monkeypatch.setattr(wq_gemm, "factor_params", lambda scale, offset: None)
    plain = wq_gemm.pack(q, scale, offset, vnni=vnni)
    assert not plain[2] & wq_gemm.FACTORED and plain[1].dtype == torch.float32
    assert torch.equal(y, wq_gemm.gemm(x, *plain, 80, amx=amx))
    expected = _expected(x, q, scale, offset, vnni)
    assert (y.double() - expected).abs().max() / expected.abs().max() < 1e-5


def test_factors_become_float16_by_a_whole_divisor_where_one_exists():
    """A factor that is d (a float16) times a gcd adding significant bits is divided by the
    least k that makes it a float16 number, its integers multiplied by k; the products stay
    factor_params' exactly. No k (the integers would pass 255): float32 factors."""
    d = torch.tensor([2047 * 2.0**-20, 1537 * 2.0**-18])  # 11 significant bits: float16
    sc = torch.tensor([[3, 6, 9, 12, 15, 18, 21, 3], [5, 10, 5, 15, 20, 25, 30, 35]]).float()
    scale = (d[:, None] * sc).repeat(16, 1)  # [32 rows, 8 groups]: one superblock a row
    offset = -scale / 2
    integers, factors = wq_gemm.factor_params(scale, offset)
    assert not torch.equal(factors.half().float(), factors)  # 3 d and 5 d: 13 and 14 bits
    halved = wq_gemm.half_factors(integers, factors)
    assert halved is not None
    ints, halves = halved
    assert halves.dtype == torch.float16
    assert torch.equal(halves.float()[0, 0], d[:1]) and torch.equal(halves.float()[1, 0], d[1:])
    assert torch.equal(ints.reshape(32, 2, 8)[0, 0], sc[0].to(torch.uint8))
    back = halves.float()[..., None] * ints.reshape(32, 2, 1, 8).float()
    assert torch.equal(back.reshape(32, 2, 8), torch.stack([scale, offset], dim=1))
    # 3 d with an integer 85 (x 3 = 255 fits) and one of 86 (x 3 = 258 does not)
    top = integers.clone()
    top[0, 0, 0] = 85
    assert wq_gemm.half_factors(top, factors) is not None
    top[0, 0, 0] = 86
    assert wq_gemm.half_factors(top, factors) is None


def test_params_factor_only_where_every_superblock_does():
    _, scale, offset = _k_quant_levels(16, 512, seed=1)
    integers, factors = wq_gemm.factor_params(scale, offset)
    assert integers.dtype == torch.uint8 and factors.shape == (16, 2, 2)
    back = factors[..., None] * integers.reshape(16, 2, 2, 8).float()
    assert torch.equal(back.reshape(16, 2, 16), torch.stack([scale, offset], dim=1))
    # Free float16 scales (Q4_0, Q8_0) have no common factor with integers below 256.
    q, free, off = _levels(16, 512, 16, seed=2, as_gguf=True)
    assert wq_gemm.factor_params(free, off) is None
    assert wq_gemm.factor_params(scale[:, :8], offset[:, :8]) is not None
    assert wq_gemm.factor_params(scale[:, :4], offset[:, :4]) is None  # no whole superblock
    mixed = offset.clone()
    mixed[3, 2] = 1e-4  # offsets of both signs in one superblock
    assert wq_gemm.factor_params(scale, mixed) is None


@pytest.mark.parametrize("path", PATHS)
def test_rows_do_not_depend_on_their_neighbours(path):
    """A row's result is the same bits whatever shares the call: alone, in a partial tile, at
    another position of a tile, or across tiles (the AMX kernel's tiles hold 16 rows; the VNNI
    kernel takes rows four at a time, then one by one)."""
    vnni, amx = path
    q, scale, offset = _levels(192, 256, 32, seed=3)
    packed, params, bits = wq_gemm.pack(q, scale, offset, vnni=vnni)
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(2))
    whole = wq_gemm.gemm(x, packed, params, bits, 192, amx=amx)
    for rows in (slice(0, 1), slice(5, 9), slice(3, 20), slice(36, 37), slice(16, 33)):
        assert torch.equal(wq_gemm.gemm(x[rows], packed, params, bits, 192, amx=amx), whole[rows])


@pytest.mark.parametrize("path", PATHS)
def test_a_row_alone_equals_itself_among_1_to_13_rows(path):
    """Rows 0 .. M - 1 of one call, for every M up to 13, are bitwise the rows computed alone:
    the AVX2 bf16 kernel takes rows in tiles of 1 to 6 (as even as M allows) and 1 to 4 blocks of
    16 channels wide, over K-slices of 16 groups (here 16, then 5; 7 blocks: chunks of 4 and 3),
    each output summed by the same FMA chains and adds whatever its tile."""
    vnni, amx = path
    q, scale, offset = _levels(112, 672, 32, seed=11)
    packed, params, bits = wq_gemm.pack(q, scale, offset, vnni=vnni)
    x = torch.randn(13, 672, generator=torch.Generator().manual_seed(12))
    alone = [wq_gemm.gemm(x[i : i + 1], packed, params, bits, 112, amx=amx) for i in range(13)]
    alone = torch.cat(alone)
    for m in range(1, 14):
        assert torch.equal(wq_gemm.gemm(x[:m], packed, params, bits, 112, amx=amx), alone[:m]), m


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_compiler_without_amx_builds_the_rest(tmp_path):
    """Where the C compiler rejects the AMX flags, the other kernels are built without amx.c
    and the AVX512 ones serve every call."""
    cc = tmp_path / "cc"
    cc.write_text(
        '#!/bin/sh\nfor a in "$@"; do case "$a" in -mamx*) echo "unknown $a" >&2; exit 1;; esac\n'
        'done\nexec gcc "$@"\n'
    )
    cc.chmod(0o755)
    code = "from girandole.model.kernels import loader; print(loader.available(), loader.amx())"
    env = {**os.environ, "CC": str(cc), "GIRANDOLE_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_amx_is_the_default_where_it_runs_and_can_be_switched_off():
    """On a CPU with AMX the linears take it for every row count (one kernel keeps rows
    batch-invariant); GIRANDOLE_AMX=0 keeps them on AVX512."""
    code = "from girandole.model.kernels import loader; print(loader.amx())"
    for value, expected in (("1", str(loader.amx())), ("0", "False")):
        env = {**os.environ, "GIRANDOLE_AMX": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr
    if loader.amx():
        q, scale, offset = _levels(64, 64, 16, seed=5)
        packed, params, bits = wq_gemm.pack(q, scale, offset)
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
        default = wq_gemm.gemm(x, packed, params, bits, 64)
        assert torch.equal(default, wq_gemm.gemm(x, packed, params, bits, 64, amx=True))


def test_vnni_serves_the_linears_without_amx_and_can_be_switched_off():
    """Without AMX the linears are packed for the VNNI kernel; GIRANDOLE_VNNI=0 keeps the bf16
    one. The packed-model cache is keyed by the layout, so a switch repacks instead of reading
    the other layout."""
    code = (
        "from girandole.model.kernels import wq_gemm; from girandole.model import loader; "
        "print(wq_gemm.vnni_default(), loader._code_hash())"
    )
    runs = {}
    for value in ("1", "0"):
        env = {**os.environ, "GIRANDOLE_VNNI": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        runs[value] = out.stdout.split()
    assert runs["1"][0] == str(not loader.amx()) and runs["0"][0] == "False"
    assert (runs["1"][1] == runs["0"][1]) == loader.amx()
    q, scale, offset = _levels(32, 64, 16, seed=9)
    packed, params, bits = wq_gemm.pack(q, scale, offset, vnni=True)
    with pytest.raises(AssertionError, match="no AMX twin"):
        wq_gemm.gemm(torch.randn(2, 64), packed, params, bits, 32, amx=True)


@pytest.mark.parametrize("top", [16, 32, 256])
@pytest.mark.parametrize("kquant", [False, True], ids=["gguf", "k-quant"])
def test_vnni_layout_runs_prompt_rows_on_the_bf16_kernel(top, kquant):
    """In the VNNI layout decode rows (the first `decode_rows`) take the int8 kernel and the
    rest the bf16 one (AMX where it runs, as the panel layout's), which reads the same weights as
    from the panel layout: bitwise the panel layout's results, whatever the split."""
    if kquant:
        q, scale, offset = _k_quant_levels(48, 512, seed=top)
        q = q % top
    else:
        q, scale, offset = _levels(48, 512, top, seed=top, as_gguf=True)
    vnni = wq_gemm.pack(q, scale, offset, vnni=True)
    panel = wq_gemm.pack(q, scale, offset)
    assert bool(vnni[2] & wq_gemm.FACTORED) == kquant
    x = torch.randn(11, 512, generator=torch.Generator().manual_seed(top))
    # the kernel prompt rows take (not forced: on a CPU with AMX, before, the reference was
    # forced onto AVX512 while the split's prompt rows ran on AMX, and they differed)
    bf16 = wq_gemm.gemm(x, *panel, 48)
    int8 = wq_gemm.gemm(x, *vnni, 48)  # every row a decode row
    assert not torch.equal(bf16, int8)
    for k in (0, 1, 4, 11):
        split = wq_gemm.gemm(x, *vnni, 48, decode_rows=k)
        assert torch.equal(split[:k], int8[:k]) and torch.equal(split[k:], bf16[k:])


@pytest.mark.parametrize("top", [16, 32])
def test_quantized_linears_agree_with_torch_int4_kernels(top):
    """The same layer through the native kernel (forward) and torch's int4pack kernels
    (`_packed`, the fallback): both compute with the same weights, within bf16 rounding."""
    q, scale, offset = _levels(128, 256, top, seed=top)
    if top == 16:
        layer = quant.Int4Linear(None, torch_forms=True, groups=(q, scale, offset + 8.0 * scale))
    else:
        layer = quant.Int4x2Linear((q, scale, offset), torch_forms=True)
    assert layer.native_bits & wq_gemm.LEVEL_BITS == (4 if top == 16 else 5)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(4))
    native = layer(x)
    fallback = layer._packed(x.to(torch.bfloat16))
    vnni = bool(layer.native_bits & wq_gemm.VNNI)
    assert vnni == wq_gemm.vnni_default()
    expected = _expected(x, q, scale, offset).float()
    scale_ = expected.abs().max()
    own = _expected(x, q, scale, offset, vnni).float()  # the native kernel's operands
    assert (native - own).abs().max() / scale_ < 1e-5
    assert (native - expected).abs().max() / scale_ < 2e-2
    assert (fallback - expected).abs().max() / scale_ < 2e-2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 13, 37])
def test_output_rows_at_a_stride_write_only_their_columns(rows, path):
    """A column slice of a wider output (rows `ldy` floats apart) gets bitwise the contiguous
    result, and the columns around it are untouched: the parts of a ConcatLinear."""
    vnni, amx = path
    q, scale, offset = _levels(80, 96, 32, seed=rows)
    packed, params, bits = wq_gemm.pack(q, scale, offset, vnni=vnni)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    alone = wq_gemm.gemm(x, packed, params, bits, 80, amx=amx)
    wide = torch.full((rows, 200), 7.0)
    fn, args = wq_gemm.bind(x, packed, params, bits, wide[:, 48:128], amx=amx)
    fn(*args)
    assert torch.equal(wide[:, 48:128], alone)
    assert bool((wide[:, :48] == 7.0).all()) and bool((wide[:, 128:] == 7.0).all())


def test_concat_linear_packs_each_part_at_its_width():
    """Parts stored at different widths (4-bit levels, then 8-bit ones, as q/k in Q4_K and v in
    Q6_K): each keeps its own layout; the output is their outputs side by side, plus the bias,
    on the native kernel (each part into its columns) and on torch's kernels alike."""
    q1, s1, o1 = _levels(64, 128, 16, seed=1, as_gguf=True)
    q2, s2, o2 = _levels(32, 128, 256, seed=2, as_gguf=True)
    qk = quant.Int4Linear(None, torch.randn(64), torch_forms=True, groups=(q1, s1, o1 + 8.0 * s1))
    v = quant.Int4x2Linear((q2, s2, o2), torch.randn(32), torch_forms=True)
    biases = torch.cat([qk.bias, v.bias])
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    separate = torch.cat([qk(x), v(x)], dim=1)
    fallback = torch.cat([qk._decode_or_dense(x.bfloat16()), v._decode_or_dense(x.bfloat16())], 1)
    layer = quant.ConcatLinear([qk, v])
    assert (layer.out_features, layer.in_features) == (96, 128)
    assert qk.native_bits & wq_gemm.LEVEL_BITS == 4 and v.native_bits & wq_gemm.LEVEL_BITS == 8
    assert layer.native_bits and qk.bias is None and torch.equal(layer.bias, biases)
    assert torch.equal(layer(x), separate)
    assert torch.equal(layer._decode_or_dense(x.bfloat16()), fallback)  # biases: in forward


@pytest.mark.parametrize("top", [16, 256])
def test_layers_the_native_kernel_serves_skip_torch_forms(top):
    """Where the native kernel serves a layer, its torch forms (int4pack halves, the bf16 dense
    copy) are not built: the same outputs, fewer bytes. A shape the native layout does not take
    keeps them."""
    q, scale, offset = _levels(64, 128, top, seed=7)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(8))

    def build(torch_forms):
        if top == 16:
            return quant.Int4Linear(None, None, torch_forms, groups=(q, scale, offset + 8 * scale))
        return quant.Int4x2Linear((q, scale, offset), None, torch_forms)

    lean, full = build(None), build(True)
    assert not lean.torch_forms and lean.dense is None
    assert not any(n in dict(lean.named_buffers()) for n in ("packed", "lo_packed", "hi_packed"))
    lean_bytes = sum(b.numel() * b.element_size() for b in lean.buffers())
    full_bytes = sum(b.numel() * b.element_size() for b in full.buffers())
    assert lean_bytes * 2 < full_bytes
    assert torch.equal(lean(x), full(x))
    with pytest.raises(RuntimeError, match="native kernels only"):
        lean._decode_or_dense(x.bfloat16())
    assert quant.torch_forms_needed(64, 128) is False
    assert quant.torch_forms_needed(72, 128) is True  # channels not in blocks of 16


def _exact_by_computing(q, scale, offset) -> bool:
    """exact_in_float32's definition, computed weight by weight."""
    n, k = q.shape
    levels = q.reshape(n, k // 32, 32)
    rounded = levels.float() * scale.float()[..., None] + offset.float()[..., None]
    exact = levels.double() * scale.double()[..., None] + offset.double()[..., None]
    return bool(torch.equal(rounded.double(), exact))


def test_exactness_is_decided_per_group_as_computing_every_weight_would():
    """The per-group test never calls a tensor exact that is not (weight by weight), and agrees
    on GGUF's kinds of groups (float16 scales, offsets of whole levels, Q4_K's scale and min
    products, zero scales), random float32 groups and coarse power-of-two grids."""
    g = torch.Generator().manual_seed(0)
    verdicts = []
    for trial in range(300):
        top = [16, 32, 64, 256][trial % 4]
        q = torch.randint(0, top, (16, 64), generator=g)
        kind = trial % 5
        if kind == 0:  # Q4_0 / Q5_0 / Q8_0
            s = (torch.rand(16, 2, generator=g) * 0.05).half().float()
            o = -s * (top // 2)
        elif kind == 1:  # Q4_K: d * sc and -dmin * m, 6-bit sc and m
            d, dmin = (torch.rand(16, 1, generator=g).half().float() for _ in range(2))
            sc, m = (torch.randint(0, 64, (16, 2), generator=g).float() for _ in range(2))
            s, o = d * sc / 64, -(dmin * m / 64)
        elif kind == 2:  # float32 scales and offsets (requantized weights)
            s = torch.rand(16, 2, generator=g) * 0.02 + 1e-3
            o = -s * 8 + torch.randn(16, 2, generator=g) * 1e-3
        elif kind == 3:  # zeros
            s = (torch.rand(16, 2, generator=g) * 0.05).half().float()
            s[0, 0] = 0.0
            o = -s * 3
            o[1, 1] = 0.0
        else:  # a grid of 2**-12 steps: exact until the sums outgrow 24 bits
            s = torch.randint(1, 2000, (16, 2), generator=g).float() * 2.0**-12
            o = -torch.randint(0, 3000, (16, 2), generator=g).float() * 2.0**-13
        fast, slow = wq_gemm.exact_in_float32(q, s, o), _exact_by_computing(q, s, o)
        assert slow or not fast, trial
        verdicts.append((fast, slow))
    assert all(fast == slow for fast, slow in verdicts)
    assert {slow for _, slow in verdicts} == {True, False}  # both kinds of tensor were met
