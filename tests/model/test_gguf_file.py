"""Our GGUF reader (loader/gguf_file.py) reads what the `gguf` package's GGUFReader reads:
every metadata value and every tensor's type, shape, offset and bytes, for files the `gguf`
package writes (every value type, plain and quantized tensors); and a damaged file is a
ValueError naming the file, never a crash or a hang. (Every test that loads the default model or
its tokenizer reads it with this reader; GGUFReader's own parse of it takes 9-20 s, so it is not
compared here.)"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from girandole.model.loader.gguf_file import GGUFFile, open_gguf


def assert_same_as_gguf_reader(path) -> None:
    theirs = gguf.GGUFReader(str(path))
    ours = GGUFFile(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]  # their header pseudo-fields
    assert list(ours.fields) == keys
    for key in keys:
        if key == "t.nested":  # GGUFReader flattens arrays of arrays; we keep them nested
            continue
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type, a.name
        assert a.shape.tolist() == b.shape.tolist(), a.name
        assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def write_every_kind(path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✨ <0x0A> 日本")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.strs", ["a", "", "ü▁b", "<|im_end|>"])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.none", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 8)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    for qtype in ("Q8_0", "Q4_0", "Q4_K", "Q6_K"):  # blocks of random bytes: only read
        kind = gguf.GGMLQuantizationType[qtype]
        block, size = gguf.GGML_QUANT_SIZES[kind]
        raw = rng.integers(0, 256, (4, 512 // block * size), dtype=np.uint8)
        w.add_tensor(qtype.lower(), raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_every_value_type_and_tensor_type_reads_as_gguf_reader_reads_it(tmp_path):
    path = tmp_path / "kinds.gguf"
    write_every_kind(path)
    assert_same_as_gguf_reader(path)
    ours = GGUFFile(path)
    assert ours.fields["t.strs"].contents() == ["a", "", "ü▁b", "<|im_end|>"]
    assert ours.fields["t.u64"].contents() == 2**63 + 5
    assert ours.fields["t.bool"].contents() is True
    assert ours.fields["t.nested"].contents() == [[1, 2], [3]]


def test_an_aligned_file_with_its_own_alignment(tmp_path):
    path = tmp_path / "aligned.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_tensor("a", np.ones((3,), dtype=np.float32))
    w.add_tensor("b", np.arange(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_gguf_reader(path)
    assert GGUFFile(path).tensors[1].data_offset % 64 == 0


def test_damaged_files_are_value_errors_naming_the_file(tmp_path):
    path = tmp_path / "kinds.gguf"
    write_every_kind(path)
    data = path.read_bytes()
    tensors = GGUFFile(path).tensors
    header, last = tensors[0].data_offset, tensors[-1].data_offset + tensors[-1].n_bytes
    for i, cut in enumerate([0, 3, 10, 30, header // 3, header // 2, header - 1, last - 1]):
        bad = tmp_path / f"cut{i}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"cut{i}.gguf"):
            open_gguf(bad)
    # A string length past the end of the file, and a value type that does not exist.
    huge = bytearray(data)
    at = data.index(b"t.str") + len(b"t.str") + 4  # the string value's length field
    huge[at : at + 8] = (2**60).to_bytes(8, "little")
    bad_type = bytearray(data)
    at = data.index(b"t.u8") + len(b"t.u8")
    bad_type[at : at + 4] = (99).to_bytes(4, "little")
    for name, blob in (
        ("huge.gguf", huge),
        ("type.gguf", bad_type),
        ("magic.gguf", b"GGML" + data[4:]),
    ):
        bad = tmp_path / name
        bad.write_bytes(bytes(blob))
        with pytest.raises(ValueError, match=name):
            open_gguf(bad)


@pytest.mark.parametrize("blocks", [1, 37, 8192 + 5])  # within one chunk, and across two
def test_q6_k_decodes_bit_for_bit_as_gguf_does(blocks):
    """loader.gguf.dequantize decodes Q6_K itself (gguf's numpy code took 22-36 s on a 128k-row
    table): every float the same bits as gguf.quants.dequantize, for random blocks (any levels
    and int8 scales, float16 d of every sign and size)."""
    from gguf.quants import dequantize as gguf_dequantize

    from girandole.model.loader.gguf import Q6_K_BYTES, dequantize

    rng = np.random.default_rng(blocks)
    data = rng.integers(0, 256, size=(blocks, Q6_K_BYTES), dtype=np.uint8)
    d = rng.standard_normal(blocks).astype(np.float16) * np.float16(0.01)
    data[:, 208:210] = d.view(np.uint8).reshape(blocks, 2)
    data = data.reshape(1, -1)  # one row of `blocks` blocks, as the file holds a row
    qtype = gguf.GGMLQuantizationType.Q6_K
    ours = dequantize(data, qtype).reshape(-1)
    theirs = np.asarray(gguf_dequantize(data, qtype), dtype=np.float32).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == (blocks * 256,)
    assert ours.view(np.uint32).tobytes() == theirs.view(np.uint32).tobytes()


@pytest.mark.parametrize("blocks", [1, 8192 + 5])  # within one chunk, and across two
def test_q4_k_decodes_bit_for_bit_as_gguf_does(blocks):
    """loader.gguf.dequantize decodes Q4_K from its integer groups (a MoE file's hundreds of Q4_K
    experts in reference mode or on the GPU): the same bits as gguf.quants.dequantize for random
    blocks (any levels, 6-bit scales and mins, float16 d and dmin of every sign and size)."""
    from gguf.quants import dequantize as gguf_dequantize

    from girandole.model.loader.gguf import Q4_K_BYTES, dequantize

    rng = np.random.default_rng(blocks)
    data = rng.integers(0, 256, size=(blocks, Q4_K_BYTES), dtype=np.uint8)
    d = rng.standard_normal((blocks, 2)).astype(np.float16) * np.float16(0.01)
    data[:, 0:4] = d.view(np.uint8).reshape(blocks, 4)
    data = data.reshape(1, -1)
    qtype = gguf.GGMLQuantizationType.Q4_K
    ours = dequantize(data, qtype).reshape(-1)
    theirs = np.asarray(gguf_dequantize(data, qtype), dtype=np.float32).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == (blocks * 256,)
    assert ours.view(np.uint32).tobytes() == theirs.view(np.uint32).tobytes()
