"""GGUF Q6_K in its own native format (kernels/wq_gemm.py's pack_q6k, csrc/wq_panel.h's WQ_Q6K):
the packing keeps the file's weights bit for bit, the int8 kernel (wq_vnni.c, decode rows) and
the bf16 one (wq_gemm.c, prompt rows) against float64 products of their operands, and a tiny
Q4_K_M-like GGUF whose Q6_K linears (attention v, the experts' down) load in it and serve the
engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from moe_gguf_helpers import write_moe_gguf
from test_moe_gguf import IDS, Q4_K_M, logits, tiny_qwen3_moe_256
from test_wq_gemm import _int8_rows

from girandole import LLM, SamplingParams
from girandole.model import kernels, quant
from girandole.model.kernels import wq_gemm
from girandole.model.loader import load_model
from girandole.model.loader.gguf import Q6_K_BYTES, _dequantize_q6_k, decode_q6_k

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")


def q6_k_blocks(n: int, k: int, seed: int, extreme: bool = False) -> np.ndarray:
    """Random Q6_K blocks of a weight [n, k]: random levels and int8 scales, float16 d of
    varied size. `extreme`: every level 0 or 63 and every scale -128 or 127 (the kernels'
    16-bit and 32-bit integer sums at their largest)."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(n * k // 256, Q6_K_BYTES), dtype=np.uint8)
    if extreme:
        b[:, :192] = rng.choice(np.array([0x00, 0xFF], dtype=np.uint8), size=(b.shape[0], 192))
        b[:, 192:208] = rng.choice(np.array([0x80, 0x7F], dtype=np.uint8), size=(b.shape[0], 16))
    d = (rng.random(b.shape[0]) * 1e-3 * 10.0 ** rng.integers(-3, 1, b.shape[0])).astype(np.float16)
    b[:, 208:210] = d.view(np.uint8).reshape(-1, 2)
    return b


def unpack_q6k(packed: torch.Tensor, params: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """float32 [n, k] weights of pack_q6k's layout read as csrc/wq_panel.h describes it:
    d * sc * (q - 32), d times sc first, as the file's decoding does."""
    nb, g, chunk = n // 16, k // 32, wq_gemm.CHUNK

    def unchunk(flat: torch.Tensor, per: int, inner: tuple[int, ...]) -> torch.Tensor:
        """_chunked's inverse: [block, per, *inner] from [chunk][per][block][inner] order."""
        out, pos, size = [], 0, int(np.prod(inner))
        for b0 in range(0, nb, chunk):
            bt = min(chunk, nb - b0)
            part = flat[pos : pos + per * bt * size].reshape(per, bt, *inner).transpose(0, 1)
            out.append(part)
            pos += per * bt * size
        assert pos == flat.numel()
        return torch.cat(out)

    raw = unchunk(packed, g, (384,))  # [block, g, 384]
    low = raw[..., :256].reshape(nb, g, 4, 64)
    quads = torch.cat([low & 15, low >> 4], dim=2)  # quads 0..3, then 4..7
    tops = raw[..., 256:].reshape(nb, g, 2, 1, 64)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)
    quads = quads | (((tops >> shifts) & 3) << 4).reshape(nb, g, 8, 64)
    # quad j's byte 4c + b: channel c's level at input 4j + b
    levels = quads.reshape(nb, g, 8, 16, 4).permute(0, 3, 1, 2, 4).reshape(n, k)
    sc_bytes = nb * g * 32
    sc = unchunk(params[:sc_bytes].view(torch.int8), g, (2, 16))  # [block, g, half, channel]
    sc = sc.permute(0, 3, 1, 2).reshape(n, k // 16)
    d = unchunk(params[sc_bytes:].view(torch.float16), k // 256, (16,))  # [block, s, channel]
    d = d.permute(0, 2, 1).reshape(n, k // 256)
    scale = d.float().repeat_interleave(16, dim=1) * sc.float()
    return scale.repeat_interleave(16, dim=1) * (levels.float() - 32.0)


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("n,k", [(16, 256), (80, 512), (128, 768)])
def test_packing_keeps_the_files_weights_bit_for_bit(n, k, extreme):
    blocks = q6_k_blocks(n, k, seed=n + k, extreme=extreme)
    levels, sc, d = decode_q6_k(blocks, n, k)
    packed, params, bits = wq_gemm.pack_q6k(levels, sc, d)
    assert bits == wq_gemm.Q6K | wq_gemm.VNNI
    assert packed.numel() * 8 == n * k * 6  # 6 bits a level
    assert params.numel() * 8 == n * k * (8 / 16 + 16 / 256)  # + 0.5625 bits: the file's 6.5625
    from_file = _dequantize_q6_k(blocks).reshape(n, k)
    assert torch.equal(unpack_q6k(packed, params, n, k), from_file)


def _weight(n: int, k: int, seed: int, extreme: bool = False):
    blocks = q6_k_blocks(n, k, seed, extreme)
    return wq_gemm.pack_q6k(*decode_q6_k(blocks, n, k)), _dequantize_q6_k(blocks).reshape(n, k)


# N = 80: the last chunk of 64 channels is partial; 1, 5 and 13 rows: the int8 kernel's tiles
# of 4 rows and the rows after them.
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 13])
@pytest.mark.parametrize("n,k", [(80, 256), (64, 768)])
def test_decode_rows_are_the_int8_rows_product(n, k, rows, extreme):
    (packed, params, bits), w = _weight(n, k, seed=rows + n, extreme=extreme)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g)
    if extreme:  # every input of a group at the same sign and size: xq all +127 or -127
        x = (
            torch.sign(torch.randn(rows, k // 32, 1, generator=g))
            .expand(-1, -1, 32)
            .reshape(rows, k)
        )
    y = wq_gemm.gemm(x, packed, params, bits, n, decode_rows=rows)
    expected = _int8_rows(x) @ w.double().t()
    err = (y.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-5, f"relative error {err:.2e}"
    # A row's result does not depend on the rows beside it.
    alone = torch.cat(
        [wq_gemm.gemm(x[i : i + 1], packed, params, bits, n, decode_rows=1) for i in range(rows)]
    )
    assert torch.equal(y, alone)


@pytest.mark.parametrize("rows", [1, 5, 13])
@pytest.mark.parametrize("n,k", [(80, 256), (64, 768)])
def test_prompt_rows_are_the_bf16_product(n, k, rows):
    (packed, params, bits), w = _weight(n, k, seed=rows + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    y = wq_gemm.gemm(x, packed, params, bits, n, decode_rows=0)
    expected = x.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().t()
    err = (y.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-5, f"relative error {err:.2e}"


def test_linear_takes_decode_and_prompt_rows_by_role():
    (packed, params, bits), w = _weight(64, 512, seed=3)
    blocks = q6_k_blocks(64, 512, seed=3)
    layer = quant.Q6KLinear(decode_q6_k(blocks, 64, 512), torch.randn(64))
    x = torch.randn(20, 512, generator=torch.Generator().manual_seed(4))
    y = layer(x)  # 20 rows outside a step: prompt rows
    expected = x.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().t() + layer.bias
    assert (y.double() - expected).abs().max() / expected.abs().max() < 1e-5
    y1 = layer(x[:1])  # one row: a decode row
    expected1 = _int8_rows(x[:1]) @ w.double().t() + layer.bias
    assert (y1.double() - expected1).abs().max() / expected1.abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="native kernels only"):
        layer._decode_or_dense(x.bfloat16())


@pytest.fixture(scope="module")
def q4_k_m_file(tiny_qwen3_moe_dir, tmp_path_factory):
    """The 256-wide tiny Qwen3-MoE of test_moe_gguf in its Q4_K_M-like mix (attention v and the
    experts' down in Q6_K)."""
    hf = tiny_qwen3_moe_256(tiny_qwen3_moe_dir)
    path = tmp_path_factory.mktemp("q6k-gguf") / "tiny-qwen3moe.gguf"
    write_moe_gguf(hf, "qwen3moe", path, Q4_K_M, tokenizer=tiny_qwen3_moe_dir)
    return path


def test_gguf_q6_k_linears_load_in_their_format_and_serve_the_engine(q4_k_m_file):
    if not wq_gemm.vnni_default():
        pytest.skip("the linears take the panel layout here (AMX): Q6_K stays int8 groups")
    ref, _ = load_model(q4_k_m_file, mode="reference", device="cpu", use_cache=False)
    fast, _ = load_model(q4_k_m_file, mode="fast", device="cpu", use_cache=False)
    down = fast.layers[1].mlp.experts[7].down
    assert isinstance(down, quant.Q6KLinear)
    v = fast.layers[0].self_attn.qkv.parts[-1]  # q and k in Q8_0, v in Q6_K
    assert isinstance(v, quant.Q6KLinear)
    # Prompt rows: the file's weights in bf16, exactly (no second rounding to int8 groups).
    w = ref.layers[1].mlp.experts[7].down.weight.float()
    x = torch.randn(20, w.shape[1], generator=torch.Generator().manual_seed(5))
    expected = x.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().t()
    assert (down(x).double() - expected).abs().max() / expected.abs().max() < 1e-5
    a, b = logits(ref, IDS), logits(fast, IDS)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
    # The engine (decode rows on the int8 kernel, through the experts' native call) and the
    # model's own greedy choice for the prompt's next token agree.
    llm = LLM(model=str(q4_k_m_file), mode="fast", device="cpu", kv_cache_gb=0.01)
    out = llm.generate([IDS], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    assert out[0].token_ids[0] == int(b[-1].argmax())


def test_without_the_vnni_layout_q6_k_stays_int8_groups(q4_k_m_file, monkeypatch):
    """GIRANDOLE_VNNI=0 (the panel layout, as with AMX): the format's kernels are the VNNI
    layout's, so Q6_K is decoded and kept as int8 groups of 32, as before."""
    monkeypatch.setenv("GIRANDOLE_VNNI", "0")
    fast, _ = load_model(q4_k_m_file, mode="fast", device="cpu", use_cache=False)
    down = fast.layers[1].mlp.experts[7].down
    assert isinstance(down, quant.Int4x2Linear) and not down.native_bits & wq_gemm.VNNI
    assert not any(isinstance(m, quant.Q6KLinear) for m in fast.modules())
