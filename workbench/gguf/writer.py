"""A streaming GGUF v3 writer.

The header (metadata and tensor infos) is built in memory; tensor data is then written
one tensor at a time, chunk by chunk, from a per-tensor chunk source, so a multi-GB file
never has to fit in memory.

The file is written to ``<out>.tmp.<pid>`` and renamed onto ``out`` only on success; on
any failure (including an interrupt) the temporary file is removed.

Layout (all little-endian): magic ``GGUF``, u32 version 3, u64 n_tensors, u64 n_kv; the
key/value pairs; the tensor infos (name, u32 n_dims, u64 dims with dims[0] the
contiguous axis, u32 ggml type, u64 offset relative to the data section); padding to
``general.alignment`` (default 32); the tensor data, each tensor starting at an aligned
offset and followed by zero padding up to the next multiple of the alignment.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from workbench.atomic import atomic_write
from workbench.errors import WorkbenchError
from workbench.spec.ggml import GGML_TYPES

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME is 64 including the terminating NUL
MAX_DIMS = 4  # GGML_MAX_DIMS

Buffer = bytes | bytearray | memoryview | np.ndarray
ChunkSource = Callable[[], Iterable[Buffer]]
Progress = Callable[[int, int], None]


class GGUFWriteError(WorkbenchError):
    """A GGUF file could not be written: bad metadata, bad tensor data or an I/O error."""


class ValueType(IntEnum):
    """GGUF metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# numpy little-endian dtype of every fixed-size scalar type
_SCALAR_DTYPES: dict[ValueType, str] = {
    ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8",
}


class MetaValue(NamedTuple):
    """One typed metadata value. For arrays, ``value`` is a sequence and ``item_type`` its type."""

    type: ValueType
    value: Any
    item_type: ValueType | None = None

    @staticmethod
    def u32(v: int) -> "MetaValue":
        return MetaValue(ValueType.UINT32, int(v))

    @staticmethod
    def i32(v: int) -> "MetaValue":
        return MetaValue(ValueType.INT32, int(v))

    @staticmethod
    def u64(v: int) -> "MetaValue":
        return MetaValue(ValueType.UINT64, int(v))

    @staticmethod
    def f32(v: float) -> "MetaValue":
        return MetaValue(ValueType.FLOAT32, float(v))

    @staticmethod
    def f64(v: float) -> "MetaValue":
        return MetaValue(ValueType.FLOAT64, float(v))

    @staticmethod
    def bool_(v: bool) -> "MetaValue":
        return MetaValue(ValueType.BOOL, bool(v))

    @staticmethod
    def str_(v: str) -> "MetaValue":
        return MetaValue(ValueType.STRING, str(v))

    @staticmethod
    def array(item_type: ValueType, items: Sequence[Any]) -> "MetaValue":
        return MetaValue(ValueType.ARRAY, list(items), ValueType(item_type))


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's entry in the GGUF tensor table.

    ``dims`` are GGUF dims: ``dims[0]`` is the contiguous axis, so a logical row-major
    ``[out, in]`` matrix has ``dims == (in, out)``.
    """

    name: str
    dims: tuple[int, ...]
    ggml_type: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Data size in bytes (``dims[0]`` must hold whole quant blocks)."""
        t = GGML_TYPES[self.ggml_type]
        return self.n_elements // t.block_elems * t.block_bytes


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ---- encoding -------------------------------------------------------------------------

def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _encode_value(key: str, v: MetaValue) -> bytes:
    t = ValueType(v.type)
    if t == ValueType.STRING:
        return _string(v.value)
    if t == ValueType.ARRAY:
        if v.item_type is None or v.item_type == ValueType.ARRAY:
            raise ValueError(f"metadata {key!r}: arrays need a non-array item type")
        items = v.value
        head = struct.pack("<IQ", int(v.item_type), len(items))
        if v.item_type == ValueType.STRING:
            return head + b"".join(_string(s) for s in items)
        return head + _scalar_array(key, v.item_type, items)
    return _scalar_array(key, t, [v.value])


def _scalar_array(key: str, t: ValueType, items: Sequence[Any]) -> bytes:
    dtype = np.dtype(_SCALAR_DTYPES[t])
    if dtype.kind in "iu" or t == ValueType.BOOL:
        ints = [int(x) for x in items]
        info = np.iinfo(dtype)
        bad = [x for x in ints if not info.min <= x <= info.max]
        if bad:
            raise ValueError(f"metadata {key!r}: {bad[0]} does not fit {t.name}")
        return np.asarray(ints, dtype=dtype).tobytes()
    return np.asarray(items, dtype=dtype).tobytes()


def _encode_header(metadata: Mapping[str, MetaValue], infos: Sequence[TensorInfo],
                   offsets: Sequence[int]) -> bytes:
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(infos), len(metadata))]
    for key, value in metadata.items():
        if not isinstance(value, MetaValue):
            raise ValueError(f"metadata {key!r}: expected a MetaValue, got {type(value).__name__}")
        parts += [_string(key), struct.pack("<I", int(value.type)), _encode_value(key, value)]
    for info, offset in zip(infos, offsets):
        parts += [_string(info.name), struct.pack("<I", len(info.dims)),
                  struct.pack(f"<{len(info.dims)}Q", *info.dims),
                  struct.pack("<IQ", info.ggml_type, offset)]
    return b"".join(parts)


def _check_tensor(info: TensorInfo) -> None:
    if not info.name or len(info.name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"tensor name {info.name!r} must be 1..{MAX_NAME_BYTES} bytes")
    if not 1 <= len(info.dims) <= MAX_DIMS or any(int(d) <= 0 for d in info.dims):
        raise ValueError(f"tensor {info.name}: dims {info.dims} must be 1..{MAX_DIMS} positive sizes")
    t = GGML_TYPES.get(info.ggml_type)
    if t is None:
        raise ValueError(f"tensor {info.name}: unknown ggml type {info.ggml_type}")
    if info.dims[0] % t.block_elems:
        raise ValueError(f"tensor {info.name}: dims[0] = {info.dims[0]} is not a multiple of "
                         f"the {t.name} block ({t.block_elems} elements)")


def _alignment(metadata: Mapping[str, MetaValue]) -> int:
    v = metadata.get("general.alignment")
    if v is None:
        return DEFAULT_ALIGNMENT
    if v.type != ValueType.UINT32 or v.value <= 0 or v.value % 8:
        raise ValueError(f"general.alignment must be a u32 multiple of 8, got {v.value!r}")
    return int(v.value)


def _as_bytes(chunk: Buffer) -> memoryview:
    if isinstance(chunk, np.ndarray):
        chunk = np.ascontiguousarray(chunk)
    return memoryview(chunk).cast("B")


# ---- the writer --------------------------------------------------------------------------

def write_gguf(out: str | Path, metadata: Mapping[str, MetaValue],
               tensors: Sequence[tuple[TensorInfo, ChunkSource]],
               progress: Progress | None = None) -> Path:
    """Write a GGUF v3 file and return its path.

    ``metadata`` maps keys to typed values, in file order. ``tensors`` pairs each tensor
    info with a callable returning an iterable of byte chunks (bytes or C-contiguous
    NumPy arrays) whose total length must be exactly ``info.nbytes``. ``progress`` is
    called with ``(bytes written, total file bytes)``. Raises :class:`GGUFWriteError`
    naming ``out`` on bad input or I/O failure; nothing is left at ``out`` then.
    """
    out = Path(out)
    infos = [info for info, _ in tensors]
    try:
        alignment = _alignment(metadata)
        names: set[str] = set()
        for info in infos:
            _check_tensor(info)
            if info.name in names:
                raise ValueError(f"duplicate tensor name {info.name!r}")
            names.add(info.name)
        offsets, pos = [], 0
        for info in infos:
            offsets.append(pos)
            pos = align_up(pos + info.nbytes, alignment)
        header = _encode_header(metadata, infos, offsets)
    except ValueError as err:
        raise GGUFWriteError(f"{out}: {err}") from None
    data_start = align_up(len(header), alignment)
    total = data_start + pos

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out) as f:
            f.write(header)
            f.write(bytes(data_start - len(header)))
            done = data_start
            if progress:
                progress(done, total)
            for info, source in tensors:
                written = 0
                for chunk in source():
                    view = _as_bytes(chunk)
                    written += len(view)
                    if written > info.nbytes:
                        raise GGUFWriteError(f"{out}: tensor {info.name} got more than "
                                             f"{info.nbytes} bytes of data")
                    f.write(view)
                    done += len(view)
                    if progress:
                        progress(done, total)
                if written != info.nbytes:
                    raise GGUFWriteError(f"{out}: tensor {info.name} got {written} bytes of data, "
                                         f"expected {info.nbytes}")
                pad = align_up(info.nbytes, alignment) - info.nbytes
                f.write(bytes(pad))
                done += pad
            if progress:
                progress(done, total)
    except OSError as err:
        raise GGUFWriteError(f"{out}: {err.strerror or err}") from None
    return out
