"""GGUF files: one parse per process of the metadata and tensor directory, by our own reader.

`gguf.GGUFReader` builds a numpy view for every value of every array (Gemma's 262k-token
vocabulary is 790k views, about 9 s); the tokenizer and the weight loader need only plain Python
values and one memory-mapped array per tensor. This reader reads strings with `struct` and
numeric arrays with one `np.frombuffer` each (about 0.3 s for the same file), and keeps the parts
of `GGUFReader`'s interface the loaders use: `fields[key].contents()` and `tensors` (name,
tensor_type, shape in GGUF's order, innermost first, data a view of the file). Tensor types and
dequantization stay the `gguf` package's (imported only when a file's tensors are read: a cached
tokenizer needs only `file_key`).
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)

# GGUF value types (gguf.GGUFValueType): scalars by struct code and numpy dtype.
STRING, ARRAY = 8, 9
SCALARS: dict[int, tuple[str, np.dtype]] = {
    0: ("B", np.dtype("<u1")),
    1: ("b", np.dtype("<i1")),
    2: ("H", np.dtype("<u2")),
    3: ("h", np.dtype("<i2")),
    4: ("I", np.dtype("<u4")),
    5: ("i", np.dtype("<i4")),
    6: ("f", np.dtype("<f4")),
    7: ("?", np.dtype("?")),
    10: ("Q", np.dtype("<u8")),
    11: ("q", np.dtype("<i8")),
    12: ("d", np.dtype("<f8")),
}
# Plain element types of tensors (GGML type names); every other type is stored as bytes.
PLAIN_TENSOR_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}
DEFAULT_ALIGNMENT = 32  # gguf.GGUF_DEFAULT_ALIGNMENT


@dataclass(frozen=True)
class Field:
    """A metadata value, already decoded: a str, int, float, bool or a list of them."""

    name: str
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF's order: the innermost (input) dimension first
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray  # a view of the file: elements for plain types, [rows, bytes] blocks else


class GGUFFile:
    """A GGUF file's metadata (`fields`) and tensors, parsed once; tensor data memory-mapped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.data = np.memmap(path, mode="r")
        self._buf = memoryview(self.data)
        self._pos = 0
        if bytes(self._take(4)) != MAGIC:
            raise ValueError("GGUF magic invalid")
        version = self._scalar(4)
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported")
        tensor_count, kv_count = self._scalar(10), self._scalar(10)
        self.fields: dict[str, Field] = {}
        for _ in range(kv_count):
            key = self._string()
            if key in self.fields:
                raise ValueError(f"duplicate metadata key {key!r}")
            self.fields[key] = Field(key, self._value(self._scalar(4)))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment")
        align = DEFAULT_ALIGNMENT if alignment is None else alignment.value
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"invalid alignment {align!r}: must be a power of two")
        start = -(-self._pos // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("duplicate tensor names")

    def _take(self, n: int) -> memoryview:
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise ValueError(f"file ends inside its header (at byte {self._pos}, {n} more needed)")
        view = self._buf[self._pos : end]
        self._pos = end
        return view

    def _scalar(self, kind: int) -> Any:
        code, dtype = SCALARS[kind]
        return struct.unpack("<" + code, self._take(dtype.itemsize))[0]

    def _string(self) -> str:
        return bytes(self._take(self._scalar(10))).decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind == STRING:
            return self._string()
        if kind in SCALARS:
            return self._scalar(kind)
        if kind != ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self._scalar(4), self._scalar(10)
        if item in SCALARS:  # numeric arrays in one read
            dtype = SCALARS[item][1]
            return np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype).tolist()
        if item == STRING:
            return self._strings(count)
        return [self._value(item) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        buf, pos, out = self._buf, self._pos, []
        size = len(buf)
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise ValueError("file ends inside its metadata")
            (n,) = unpack(buf, pos)
            end = pos + 8 + n
            if end > size:
                raise ValueError("file ends inside its metadata")
            out.append(bytes(buf[pos + 8 : end]).decode("utf-8"))
            pos = end
        self._pos = pos
        return out

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self._string()
        dims = [self._scalar(10) for _ in range(self._scalar(4))]
        return name, dims, self._scalar(4), self._scalar(10)

    def _tensor(self, start: int, name: str, dims: list[int], raw: int, offset: int) -> Tensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qtype = GGMLQuantizationType(raw)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown type {raw}") from None
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        block, type_size = GGML_QUANT_SIZES[qtype]
        if n % block or (dims and dims[0] % block):
            raise ValueError(f"tensor {name!r}: shape {dims} is not whole {qtype.name} blocks")
        n_bytes = n // block * type_size
        begin = start + offset
        if begin + n_bytes > len(self.data):
            raise ValueError(f"tensor {name!r} lies past the end of the file")
        rows = tuple(reversed(dims))
        dtype = PLAIN_TENSOR_DTYPES.get(qtype.name)
        if dtype is not None:
            data = self.data[begin : begin + n_bytes].view(dtype).reshape(rows)
        else:  # GGUFReader's byte shape: the innermost dimension as bytes of its blocks
            inner = rows[-1] // block * type_size if rows else n_bytes
            data = self.data[begin : begin + n_bytes].reshape(*rows[:-1], inner)
        shape = np.array(dims, dtype=np.uint64)
        return Tensor(name, qtype, shape, n, n_bytes, begin, data)


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int) -> GGUFFile:
    try:
        return GGUFFile(path)
    except ValueError as exc:
        raise ValueError(f"not a valid GGUF file: {path} ({exc})") from exc


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed GGUF file at `path`, shared by every caller in this process."""
    p = Path(path)
    st = p.stat()
    return _open(str(p.resolve()), st.st_mtime_ns, st.st_size)


def file_key(path: str | os.PathLike) -> str:
    """A cheap key for cached artefacts derived from a model file: name, size and mtime."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p.stem}-{st.st_size}-{st.st_mtime_ns}"
