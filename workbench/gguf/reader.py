"""A memory-mapped GGUF v3 reader: metadata, the tensor index and zero-copy tensor bytes.

Opening a file parses the header, the metadata and the tensor infos, and checks every
tensor's geometry against the file (type, dims, offset, alignment, bounds, overlap).
Tensor data is never read here: :meth:`GGUFFile.raw` returns a ``uint8`` view of the
mapping, shaped as rows of whole quant blocks, and the OS pages bytes in on use.

Container facts (ds4-architecture §1.1): little-endian; header u32 magic ``GGUF``, u32
version (only 3), u64 n_tensors, u64 n_kv; strings are u64 length + UTF-8 bytes; arrays
are u32 item type + u64 count + items; tensor infos are name, u32 ndim, ndim x u64 dims
(``dims[0]`` fastest), u32 ggml type, u64 offset relative to the data start, which is
the end of the infos rounded up to ``general.alignment`` (u32, default 32).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from workbench.errors import WorkbenchError
from workbench.gguf.native import NATIVE
from workbench.safeopen import open_regular
from workbench.spec.ggml import GGML_TYPES

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8
MAX_ARRAY_NESTING = 8  # arrays of arrays deeper than this are refused (no unbounded recursion)

# GGUF metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
VALUE_TYPE_NAMES = {
    UINT8: "u8", INT8: "i8", UINT16: "u16", INT16: "i16", UINT32: "u32", INT32: "i32", FLOAT32: "f32",
    BOOL: "bool", STRING: "string", ARRAY: "array", UINT64: "u64", INT64: "i64", FLOAT64: "f64",
}
# fixed-size scalar types: (struct format, numpy dtype)
_SCALARS: dict[int, tuple[str, str]] = {
    UINT8: ("<B", "<u1"), INT8: ("<b", "<i1"), UINT16: ("<H", "<u2"), INT16: ("<h", "<i2"),
    UINT32: ("<I", "<u4"), INT32: ("<i", "<i4"), FLOAT32: ("<f", "<f4"), BOOL: ("<B", "<u1"),
    UINT64: ("<Q", "<u8"), INT64: ("<q", "<i8"), FLOAT64: ("<d", "<f8"),
}
# smallest possible encodings, used to reject absurd counts before allocating anything
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, ndim, one dim, type, offset
_MIN_ITEM_BYTES = {**{t: struct.calcsize(fmt) for t, (fmt, _) in _SCALARS.items()}, STRING: 8, ARRAY: 12}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFError(WorkbenchError):
    """A file is not a well-formed GGUF v3 file; the message starts with the file path."""


def value_type_name(vtype: int | tuple[int, int]) -> str:
    """Readable GGUF value type: ``u32``, ``string``, ``array[string]`` ..."""
    if isinstance(vtype, tuple):
        return f"array[{VALUE_TYPE_NAMES.get(vtype[1], str(vtype[1]))}]"
    return VALUE_TYPE_NAMES.get(vtype, str(vtype))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the index. ``dims`` is GGUF order (``dims[0]`` fastest);
    ``shape`` the logical row-major shape (reversed dims); ``offset`` absolute in bytes."""

    name: str
    ggml_type: int
    dims: tuple[int, ...]
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (``dims[0]`` elements, a whole number of blocks)."""
        t = GGML_TYPES[self.ggml_type]
        return self.dims[0] // t.block_elems * t.block_bytes


class _Cursor:
    """Bounds-checked little-endian reads over the mapping; every failure is a GGUFError."""

    def __init__(self, path: str, buf: mmap.mmap, size: int) -> None:
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated at byte {self.pos} reading {what}: "
                            f"need {n} bytes, {self.size - self.pos} left (file is {self.size} bytes)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        start = self.pos
        self.pos += n
        try:
            return self.buf[start:self.pos].decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8 ({err.reason})") from None

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = _SCALARS[vtype][0]
        n = _MIN_ITEM_BYTES[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return bool(v) if vtype == BOOL else v

    def value(self, vtype: int, what: str, depth: int = 0) -> tuple[Any, int | tuple[int, int]]:
        """Read one metadata value of type ``vtype``; return (python value, type id).
        ``depth`` counts the arrays this value is nested in."""
        if vtype in _SCALARS:
            return self.scalar(vtype, what), vtype
        if vtype == STRING:
            return self.string(what), vtype
        if vtype == ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING} levels")
            item = self.u32(f"the item type of {what}")
            count = self.u64(f"the item count of {what}")
            if item not in _MIN_ITEM_BYTES:
                raise self.fail(f"{what}: unknown array item type {item}")
            # reject counts the rest of the file cannot hold before allocating anything
            self.need(count * _MIN_ITEM_BYTES[item], f"{what} ({count} items of {value_type_name(item)})")
            return self.array(item, count, what, depth), (ARRAY, item)
        raise self.fail(f"{what}: unknown value type {vtype}")

    def array(self, item: int, count: int, what: str, depth: int) -> list[Any]:
        if item in _SCALARS:
            fmt, dtype = _SCALARS[item]
            a = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * a.itemsize
            return a.astype(bool).tolist() if item == BOOL else a.tolist()
        if item == STRING:
            strings = self.string_array(count, what)
            return strings if depth == 0 else strings.decode()
        return [self.value(item, f"{what}[{i}]", depth + 1)[0] for i in range(count)]

    def string_array(self, count: int, what: str) -> "LazyStrings":
        """``count`` strings: one pass reading the lengths (bounds-checked, so the cursor
        lands after the array), then one UTF-8 check of all the bytes; the list of str is
        built on first use (:class:`LazyStrings`)."""
        buf, start, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        pos = start
        offsets: list[int] | np.ndarray
        if NATIVE is not None:  # the same walk in C (-1: a length runs past the end)
            offsets = np.empty(count, dtype=np.int64)
            end = NATIVE.scan_strings(np.frombuffer(buf, dtype=np.uint8), start, offsets)
            pos = end if end >= 0 else size + 1
        else:
            offsets = [0] * count
            try:  # fast pass: the mapping's own bounds stop a runaway length
                for i in range(count):
                    offsets[i] = pos
                    pos += 8 + unpack(buf, pos)[0]
            except (struct.error, OverflowError):
                pos = size + 1
        if pos > size:  # truncated: find the item and say what is missing
            pos = start
            for i in range(count):
                if size - pos < 8:
                    self.pos = pos
                    self.need(8, f"the length of {what}[{i}]")
                (n,) = unpack(buf, pos)
                pos += 8
                if n > size - pos:
                    self.pos = pos
                    self.need(n, f"{what}[{i}] ({n} bytes)")
                pos += n
        self.pos = pos
        data = np.frombuffer(buf, dtype=np.uint8, count=pos - start, offset=start)
        return LazyStrings(self.path, data, start, np.asarray(offsets, dtype=np.int64), what)


class LazyStrings:
    """A GGUF string array, validated as UTF-8 but not yet split into str objects.

    Built from ``data`` (uint8, the array's bytes ``[start, end)`` of the file) and
    ``offsets`` (int64 ``[count]``, absolute byte of each item's u64 length field). A
    concatenation of pieces separated by ASCII bytes is valid UTF-8 exactly when every
    piece is, so the array's bytes are checked in one decode, as they are when every item
    is shorter than 128 bytes (its length field is then 8 ASCII bytes), else on a copy with
    the length fields zeroed; with the native kernels built, by one strict C pass over the
    items (no str built). :meth:`decode` splits the items on first use. Raises
    GGUFError naming the first item that is not valid UTF-8.
    """

    def __init__(self, path: str, data: np.ndarray, start: int, offsets: np.ndarray, what: str) -> None:
        self.count = len(offsets)
        self._path, self._what, self._data = path, what, data
        self._rel = offsets - start
        self._items: list[str] | None = None
        if self.count == 0:
            self._items = []
            return
        if NATIVE is not None and hasattr(NATIVE, "check_utf8"):  # one pass in C, no str built
            if NATIVE.check_utf8(data, self._rel) >= 0:
                self._items = self._split()  # raises GGUFError naming the item
            return
        lengths = np.diff(np.append(self._rel, data.size)) - 8
        checked = data
        if int(lengths.max()) >= 128:
            checked = data.copy()
            checked[(self._rel[:, None] + np.arange(8)).reshape(-1)] = 0
        try:
            checked.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            self._items = self._split()  # raises GGUFError naming the item

    def _split(self) -> list[str]:
        """The items, decoded (GGUFError for the first that is not UTF-8)."""
        data, rel = self._data, self._rel
        keep = np.ones(data.size, dtype=bool)
        for k in range(8):
            keep[rel + k] = False
        absent = np.flatnonzero(np.bincount(data[keep], minlength=256)[:128] == 0)
        if absent.size:
            joined = data.copy()
            joined[rel[1:] + 7] = int(absent[0])
            keep[rel[1:] + 7] = True
            try:
                return joined[keep].tobytes().decode("utf-8").split(chr(int(absent[0])))
            except UnicodeDecodeError:
                pass
        # every ASCII byte occurs in the items, or some item is not UTF-8: one by one
        ends = np.append(rel[1:], data.size)
        raw = data.tobytes()
        items = []
        for i, (a, b) in enumerate(zip((rel + 8).tolist(), ends.tolist())):
            try:
                items.append(raw[a:b].decode("utf-8"))
            except UnicodeDecodeError as err:
                raise GGUFError(f"{self._path}: {self._what}[{i}] is not valid UTF-8 ({err.reason})") from None
        return items

    def __len__(self) -> int:
        return self.count

    def decode(self) -> list[str]:
        """The items as a new list of str."""
        if self._items is None:
            self._items = self._split()
        return list(self._items)

    def present(self, wanted: Iterable[str]) -> set[str]:
        """Which of ``wanted`` are items, found in the raw bytes without decoding the array."""
        if self._items is not None:
            return set(wanted) & set(self._items)
        raw = self._data.tobytes()
        found = set()
        for s in wanted:
            b = s.encode("utf-8")
            needle = _U64.pack(len(b)) + b
            at = raw.find(needle)
            while at >= 0:  # a match counts only at an item's length field
                i = int(np.searchsorted(self._rel, at))
                if i < self.count and self._rel[i] == at:
                    found.add(s)
                    break
                at = raw.find(needle, at + 1)
        return found


class Metadata(dict):
    """GGUF metadata: a ``dict`` of key -> python value in file order, whose string
    arrays are decoded on first access of their key (then kept as a plain list).

    Every way of reading values (``[]``, ``get``, ``items``, ``values``, ``==``, ``copy``,
    ``dict(m)``, ``{**m}``, ``json.dumps``) sees decoded lists.
    """

    def _resolve(self, key: Any) -> None:
        v = dict.get(self, key)
        if isinstance(v, LazyStrings):
            dict.__setitem__(self, key, v.decode())

    def _resolve_all(self) -> None:
        for key, v in dict.items(self):
            if isinstance(v, LazyStrings):
                self._resolve(key)

    def __getitem__(self, key: Any) -> Any:
        self._resolve(key)
        return dict.__getitem__(self, key)

    def string_items(self, key: str, wanted: Iterable[str]) -> tuple[int, set[str]]:
        """The string array ``key``'s item count and which of ``wanted`` it holds, without
        decoding it when it is still lazy."""
        v = dict.__getitem__(self, key)
        if isinstance(v, LazyStrings):
            return len(v), v.present(wanted)
        return len(v), set(wanted) & set(v)

    def get(self, key: Any, default: Any = None) -> Any:
        self._resolve(key)
        return dict.get(self, key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        self._resolve(key)
        return dict.pop(self, key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._resolve(key)
        return dict.setdefault(self, key, default)

    def popitem(self) -> tuple[Any, Any]:
        self._resolve_all()
        return dict.popitem(self)

    def __iter__(self) -> Any:  # defined so that dict(m) and {**m} go through __getitem__
        return dict.__iter__(self)

    def items(self) -> Any:
        self._resolve_all()
        return dict.items(self)

    def values(self) -> Any:
        self._resolve_all()
        return dict.values(self)

    def copy(self) -> dict[str, Any]:
        self._resolve_all()
        return dict(dict.items(self))

    def __eq__(self, other: object) -> bool:
        self._resolve_all()
        if isinstance(other, Metadata):
            other._resolve_all()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> Any:
        self._resolve_all()
        return dict.__or__(self, other)

    def __ror__(self, other: Any) -> Any:
        self._resolve_all()
        return dict.__ror__(self, other)

    def __repr__(self) -> str:
        self._resolve_all()
        return dict.__repr__(self)

    def __reduce__(self) -> Any:
        return (dict, (self.copy(),))


class GGUFFile:
    """An open GGUF v3 file. Use as a context manager or call :meth:`close`.

    Attributes: ``path``, ``version``, ``alignment``, ``data_offset`` (absolute byte where
    tensor data starts), ``file_size`` (bytes), ``metadata`` (a :class:`Metadata` dict,
    key -> python value; arrays as lists, string arrays decoded on first access), ``metadata_types`` (key -> GGUF value type id, arrays as ``(9, item_type)``),
    ``tensors`` (name -> :class:`TensorInfo`, in file order).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.metadata: Metadata = Metadata()
        self.metadata_types: dict[str, int | tuple[int, int]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._mm: mmap.mmap | None = None
        self._fh = None
        try:
            self._fh = open_regular(self.path)  # a FIFO would block, a device never ends
            st = os.fstat(self._fh.fileno())
            self.file_size, self._mtime_ns = st.st_size, st.st_mtime_ns
            if self.file_size == 0:
                self._fh.close()
                raise GGUFError(f"{self.path}: not a GGUF file (empty)")
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as err:
            if self._fh is not None:
                self._fh.close()
            raise GGUFError(f"{self.path}: cannot open: {err.strerror or err}") from None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # ---- parsing --------------------------------------------------------------------
    def _parse(self) -> None:
        assert self._mm is not None
        c = _Cursor(self.path, self._mm, self.file_size)
        if self.file_size < 4 or self._mm[:4] != MAGIC:
            raise c.fail(f"not a GGUF file (magic {bytes(self._mm[:4])!r}, expected {MAGIC!r})")
        c.pos = 4
        self.version = c.u32("the version")
        if self.version != VERSION:
            hint = " (big-endian file?)" if self.version > 0xFFFF else ""
            raise c.fail(f"GGUF version {self.version} is not supported{hint}; only version {VERSION} is")
        n_tensors = c.u64("the tensor count")
        n_kv = c.u64("the metadata count")
        left = self.file_size - c.pos
        if n_kv * _MIN_KV_BYTES > left:
            raise c.fail(f"header claims {n_kv} metadata entries, the remaining {left} bytes cannot hold them")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            raise c.fail(f"header claims {n_tensors} tensors, the remaining {left} bytes cannot hold them")

        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            if key in self.metadata:
                raise c.fail(f"duplicate metadata key {key!r}")
            vtype = c.u32(f"the value type of {key!r}")
            self.metadata[key], self.metadata_types[key] = c.value(vtype, f"the value of {key!r}")

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a, at = self.metadata["general.alignment"], self.metadata_types["general.alignment"]
            if at != UINT32 or a <= 0 or a & (a - 1):
                raise c.fail(f"bad general.alignment {a!r} ({value_type_name(at)}): need a power of two u32")
            self.alignment = a

        infos = [self._tensor_info(c, i) for i in range(n_tensors)]
        self.data_offset = -(-c.pos // self.alignment) * self.alignment
        for name, ggml_type, dims, rel in infos:
            self._add_tensor(name, ggml_type, dims, rel)
        self._check_overlaps()

    def _tensor_info(self, c: _Cursor, i: int) -> tuple[str, int, tuple[int, ...], int]:
        name = c.string(f"the name of tensor #{i}")
        ndim = c.u32(f"the ndim of tensor {name!r}")
        if not 1 <= ndim <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {ndim} dims, expected 1..{MAX_DIMS}")
        dims = tuple(c.u64(f"dim {k} of tensor {name!r}") for k in range(ndim))
        ggml_type = c.u32(f"the type of tensor {name!r}")
        rel = c.u64(f"the offset of tensor {name!r}")
        return name, ggml_type, dims, rel

    def _add_tensor(self, name: str, ggml_type: int, dims: tuple[int, ...], rel: int) -> None:
        fail: Callable[[str], GGUFError] = lambda what: GGUFError(f"{self.path}: tensor {name!r}: {what}")
        if name in self.tensors:
            raise GGUFError(f"{self.path}: duplicate tensor name {name!r}")
        if ggml_type not in GGML_TYPES:
            raise fail(f"unknown ggml type id {ggml_type}")
        t = GGML_TYPES[ggml_type]
        if 0 in dims:
            raise fail(f"zero dim in {list(dims)}")
        if dims[0] % t.block_elems:
            raise fail(f"dims[0] = {dims[0]} is not a multiple of the {t.name} block size {t.block_elems}")
        n_rows = 1
        for d in dims[1:]:
            n_rows *= d
        if n_rows * dims[0] >= 1 << 63:
            raise fail(f"dims {list(dims)} overflow: {n_rows * dims[0]} elements")
        nbytes = n_rows * (dims[0] // t.block_elems) * t.block_bytes
        if nbytes > self.file_size:
            raise fail(f"dims {list(dims)} ({t.name}) need {nbytes} bytes, more than the whole file ({self.file_size})")
        if rel % self.alignment:
            raise fail(f"offset {rel} is not a multiple of the alignment {self.alignment}")
        offset = self.data_offset + rel
        if offset + nbytes > self.file_size:
            raise fail(f"data [{offset}, {offset + nbytes}) runs past the end of the file ({self.file_size} bytes)")
        self.tensors[name] = TensorInfo(name, ggml_type, dims, tuple(reversed(dims)), offset, nbytes)

    def _check_overlaps(self) -> None:
        by_offset = sorted(self.tensors.values(), key=lambda t: t.offset)
        for a, b in zip(by_offset, by_offset[1:]):
            if b.offset < a.offset + a.nbytes:
                raise GGUFError(f"{self.path}: tensors {a.name!r} [{a.offset}, {a.offset + a.nbytes}) and "
                                f"{b.name!r} [{b.offset}, {b.offset + b.nbytes}) overlap")

    # ---- access ---------------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo:
        """The index entry of ``name``; GGUFError when the file has no such tensor."""
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy ``uint8`` view of a tensor's bytes, shaped ``[*shape[:-1], row_bytes]``
        (each last-axis row is ``shape[-1]`` elements as whole quant blocks). The view keeps
        the mapping alive after :meth:`close`."""
        t = self.tensor(name)
        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed")
        a = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return a.reshape(*t.shape[:-1], t.row_bytes)

    def check_unchanged(self) -> None:
        """Raise :class:`GGUFError` when the open file was truncated or rewritten since it
        was opened (size or mtime differ). Reading a mapped page past a truncation kills
        the process with SIGBUS, so long computations call this between chunks; a file
        truncated *during* a chunk can still do that (see README, "Limits")."""
        if self._fh is None:
            raise GGUFError(f"{self.path}: file is closed")
        st = os.fstat(self._fh.fileno())
        if st.st_size != self.file_size or st.st_mtime_ns != self._mtime_ns:
            raise GGUFError(f"{self.path}: the model file changed on disk while in use (size {self.file_size:,} -> "
                            f"{st.st_size:,} bytes); reload it")

    def close(self) -> None:
        """Drop the mapping. Views from :meth:`raw` stay valid: they hold their own reference."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views still exported; the mapping goes when they do
                pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"
