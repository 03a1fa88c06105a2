"""ggml block formats in MLX: dequantization, lazy quantized tensors, matmul helpers.

Formats (ds4-architecture.md §1.4): F32, F16, BF16, I32 plain arrays; Q8_0, Q2_K, Q4_K,
IQ2_XXS, MXFP4 blocks of 32 or 256 elements along the contiguous (last, GGUF ``dim[0]``) axis.

Every dequantizer is bit-identical to ``gguf.quants.dequantize`` (the reference): it does the
same float32 operations in the same order: f16 scales widened to float32 first, then
``(d*sc)*q - dmin*m`` for the K-quants (the products are exact in float32, only the
subtraction rounds, so a fused multiply-add would give the same bits), ``d*q`` for Q8_0 and
``(d*(0.5+s))*0.25*grid*sign`` for IQ2_XXS, ``e8m0_half(e)*(2·e2m1)`` for MXFP4. Every result has the
reference's bit pattern,
including infinities and NaNs from inf/NaN scale bytes. One exception, by choice: an F16
*tensor* element that is a signalling NaN widens to a quiet NaN (MLX's hardware cast; NumPy
keeps the quiet bit clear). It is NaN either way; keeping the payload would make F16
dequantization ~5x slower for values no weight file contains.

Raw buffers are uint8, shaped ``[..., n_blocks * block_bytes]``; results are float32
``[..., n_blocks * block_elems]`` (int32 for I32).

Two implementations of each block decoder, with the same bits: the native MLX primitive of
``native/dequant.cpp`` (built by ``make native`` into ``workbench/gguf/_native*.so``; one
pass over the blocks, ~memory-copy speed) where it is built for the running MLX, else the
pure-MLX expressions below (the reference and fallback; 3-10x slower: each MLX op is a
separate pass over the data). ``WORKBENCH_NATIVE=0`` forces the pure-MLX path.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Callable, Literal, Sequence

import mlx.core as mx
import numpy as np
from gguf.quants import IQ2_XXS as _REF_IQ2_XXS

from workbench.errors import WorkbenchError
from workbench.gguf import native
from workbench.spec.ggml import BF16, F16, F32, GGML_TYPES, I32, IQ2_XXS, MXFP4, Q2_K, Q4_K, Q8_0

# the types this workbench can dequantize and run
SUPPORTED = frozenset({F32, F16, BF16, I32, Q8_0, Q2_K, Q4_K, IQ2_XXS, MXFP4})


class QuantError(WorkbenchError):
    """A quantized buffer of the wrong size or dtype, or a type this workbench cannot decode."""


def _type_name(ggml_type: int) -> str:
    t = GGML_TYPES.get(ggml_type)
    return t.name if t is not None else f"unknown ggml type {ggml_type}"


def _check_type(ggml_type: int) -> None:
    if ggml_type not in SUPPORTED:
        names = ", ".join(sorted(GGML_TYPES[t].name for t in SUPPORTED))
        raise QuantError(f"cannot dequantize {_type_name(ggml_type)} (id {ggml_type}); "
                         f"supported: {names}")


# --- IQ2_XXS tables -------------------------------------------------------------------------
# The standard ggml tables, taken from the reference package: the grid (256 entries of 8
# magnitudes in {8, 25, 43}) and the 128 sign bytes (bit j set = negate element j; bit 7 is
# the parity of bits 0..6). Both are folded into one table of signed 8-vectors indexed by
# ``grid_index * 128 + sign_index``: [32768, 8] int8 (256 KiB; values ±8, ±25, ±43 exact),
# kept as one uint64 per signed 8-vector so a gather moves 8 values at once.
# Multiplying by the signed value is bit-identical to the reference's ``(db * grid) * sign``
# since rounding is symmetric and a NaN scale propagates unchanged either way.
_REF_IQ2_XXS.init_grid()
IQ2XXS_GRID: np.ndarray = np.asarray(_REF_IQ2_XXS.grid, dtype=np.float32).reshape(256, 8)
IQ2XXS_SIGNS: np.ndarray = np.frombuffer(_REF_IQ2_XXS.ksigns, dtype=np.uint8).copy()
_sign_bits = (IQ2XXS_SIGNS[:, None] >> np.arange(8, dtype=np.uint8)) & 1  # [128, 8]
_IQ2XXS_SIGNED = mx.array(
    (IQ2XXS_GRID[:, None, :] * np.where(_sign_bits == 1, -1.0, 1.0)[None])
    .reshape(256 * 128, 8).astype(np.int8).view(np.uint64).reshape(256 * 128))


# --- per-type block decoders: blocks [N, block_bytes] uint8 -> [N, block_elems] -----------------

def _f16_to_f32(b: mx.array) -> mx.array:
    """Little-endian f16 bytes ``[..., 2k]`` -> float32 ``[..., k]`` (exact widening)."""
    return b.view(mx.float16).astype(mx.float32)


def _dequant_f32(blocks: mx.array) -> mx.array:
    return blocks.view(mx.float32)


def _dequant_i32(blocks: mx.array) -> mx.array:
    return blocks.view(mx.int32)


def _dequant_f16(blocks: mx.array) -> mx.array:
    return _f16_to_f32(blocks)


def _dequant_bf16(blocks: mx.array) -> mx.array:
    return (blocks.view(mx.uint16).astype(mx.uint32) << 16).view(mx.float32)


def _dequant_q8_0(blocks: mx.array) -> mx.array:
    d = _f16_to_f32(blocks[:, :2])
    q = blocks[:, 2:].view(mx.int8).astype(mx.float32)
    return q * d


_Q2K_SHIFTS = mx.array([0, 2, 4, 6], dtype=mx.uint8).reshape(1, 1, 4, 1)


def _dequant_q2_k(blocks: mx.array) -> mx.array:
    n = blocks.shape[0]
    sc = blocks[:, :16]
    d = _f16_to_f32(blocks[:, 80:82])
    dmin = _f16_to_f32(blocks[:, 82:84])
    dl = (d * (sc & 15).astype(mx.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).astype(mx.float32)).reshape(n, 16, 1)
    # [half n, shift, 32] -> 16 groups of 16 in (half, shift, sub-half) order, one scale each
    q = (blocks[:, 16:80].reshape(n, 2, 1, 32) >> _Q2K_SHIFTS) & 3
    q = q.reshape(n, 16, 16)  # uint8 codes: the product widens them exactly, in one pass
    return (dl * q - ml).reshape(n, 256)


_Q4K_SHIFTS = mx.array([0, 4], dtype=mx.uint8).reshape(1, 1, 2, 1)


def _dequant_q4_k(blocks: mx.array) -> mx.array:
    n = blocks.shape[0]
    d = _f16_to_f32(blocks[:, 0:2])
    dmin = _f16_to_f32(blocks[:, 2:4])
    lo, mid, hi = blocks[:, 4:8], blocks[:, 8:12], blocks[:, 12:16]
    # 6-bit scale/min of sub-block j: j < 4 in the low 6 bits of lo/mid; j >= 4 split between
    # a nibble of hi and the top 2 bits of lo (scale) or mid (min)
    sc = mx.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    mn = mx.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    ds = (d * sc.astype(mx.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.astype(mx.float32)).reshape(n, 8, 1)
    # 32 bytes per pair of sub-blocks: low nibbles first, then high nibbles
    q = (blocks[:, 16:].reshape(n, 4, 1, 32) >> _Q4K_SHIFTS) & 15
    q = q.reshape(n, 8, 32)  # uint8 codes: the product widens them exactly, in one pass
    return (ds * q - dm).reshape(n, 256)


_IQ2XXS_SIGN_SHIFTS = mx.array([0, 7, 14, 21], dtype=mx.uint32).reshape(1, 1, 4)


def _dequant_iq2_xxs(blocks: mx.array) -> mx.array:
    n = blocks.shape[0]
    d = _f16_to_f32(blocks[:, :2])  # [n, 1]
    groups = blocks[:, 2:].reshape(n, 8, 8)  # 8 sub-blocks of 32 elements: words a0, a1
    grid_idx = groups[:, :, :4].astype(mx.uint32)  # the bytes of a0: one grid entry per 8
    a1 = groups[:, :, 4:].view(mx.uint32).reshape(n, 8)
    db = d * (0.5 + (a1 >> 28).astype(mx.float32)) * 0.25  # [n, 8]
    sign_idx = (a1[:, :, None] >> _IQ2XXS_SIGN_SHIFTS) & 127  # [n, 8, 4]
    # int8 factors [n, 8, 4, 8]; the product widens them exactly, in one pass
    vals = _IQ2XXS_SIGNED[grid_idx * 128 + sign_idx].view(mx.int8).reshape(n, 8, 4, 8)
    return (db.reshape(n, 8, 1, 1) * vals).reshape(n, 256)


# MXFP4 (OCP MX): per 32 elements one E8M0 exponent byte e, then 16 bytes of E2M1 codes,
# byte j holding element j (low nibble) and element j + 16 (high nibble). As ggml does, the
# scale is half the power of two, 2^(e-128) built from its float32 bits (a subnormal for
# e < 2, 2^127 for e = 255: ggml has no NaN scale), times twice the E2M1 value (codes 0-7:
# 0, 1, 2, 3, 4, 6, 8, 12; codes 8-15 the negatives, code 8 = +0). Products are exact.
# MLX gathers cost ~20 ns each on the CPU, so codes are looked up two bytes at a time: a
# table indexed by the little-endian uint16 of bytes (j, j+1) gives the int8 values of
# elements j, j+1, j+16, j+17 ([65536] uint32, 256 KiB).
MXFP4_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
_w = np.arange(65536)
_MXFP4_WORDS = mx.array(np.stack([MXFP4_DOUBLED[_w & 15], MXFP4_DOUBLED[(_w >> 8) & 15],
                                  MXFP4_DOUBLED[(_w >> 4) & 15], MXFP4_DOUBLED[_w >> 12]], axis=1)
                        .view(np.uint32).reshape(65536))


def e8m0_half(e: mx.array) -> mx.array:
    """ggml's ``e8m0_to_fp32_half``: uint8 exponents -> float32 ``2^(e-128)``, same shape."""
    e32 = e.astype(mx.uint32)
    bits = mx.where(e32 < 2, mx.array(0x00200000, mx.uint32) << e32, (e32 - 1) << 23)
    return bits.view(mx.float32)


def _dequant_mxfp4(blocks: mx.array) -> mx.array:
    n = blocks.shape[0]
    words = mx.contiguous(blocks[:, 1:]).view(mx.uint16)  # [n, 8]: bytes (2k, 2k+1)
    # [n, 8 words, (low, high), 2] -> [n, (low, high), 8 words, 2] = elements 0..31
    vals = _MXFP4_WORDS[words].view(mx.int8).reshape(n, 8, 2, 2).transpose(0, 2, 1, 3).reshape(n, 32)
    return e8m0_half(blocks[:, :1]) * vals  # the product widens the int8 values exactly


_DECODERS: dict[int, Callable[[mx.array], mx.array]] = {
    F32: _dequant_f32, F16: _dequant_f16, BF16: _dequant_bf16, I32: _dequant_i32,
    Q8_0: _dequant_q8_0, Q2_K: _dequant_q2_k, Q4_K: _dequant_q4_k, IQ2_XXS: _dequant_iq2_xxs,
    MXFP4: _dequant_mxfp4,
}
NATIVE_TYPES = (F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS, MXFP4)


def _load_native() -> ModuleType | None:
    """The native kernels' module (:mod:`workbench.gguf.native`) if it decodes a block right."""
    mod = native.load_native()
    if mod is None or not all(hasattr(mod, f) for f in ("dequantize", "qmv", "qmv_mapped", "affine8_qmv")):
        return None  # not built, or built from an older native/dequant.cpp (make native)
    try:
        probe = mx.array(np.array([[0x00, 0x3C] + [1] * 32], dtype=np.uint8))  # Q8_0: d = 1, q = 1
        return mod if np.asarray(mod.dequantize(probe, Q8_0)).tolist() == [[1.0] * 32] else None
    except (TypeError, RuntimeError, ValueError, AttributeError):
        return None


_NATIVE = _load_native()


def native_available() -> bool:
    """Whether :func:`dequantize` uses the native kernels (see the module docstring)."""
    return _NATIVE is not None


def qmv(x: mx.array, w: QTensor) -> mx.array:
    """``x @ W.T`` for a few rows, straight from W's blocks (native kernels only: check
    :func:`native_available` first). x float32 ``[m, in]`` with ``1 <= m <= 64``, or
    ``[G, m, in]`` for a block-diagonal product (output row o takes group ``o // (out / G)``,
    G dividing out); W a 2-D QTensor ``[out, in]`` of a type in ``NATIVE_TYPES`` → float32
    ``[m, out]``. Q8_0, IQ2_XXS, Q2_K and Q4_K rows are dotted block by block with the scales
    factored out, each block converted once for up to 4 rows of x (other types expanded in
    L1), so no float32 weight is materialised; a NumPy
    raw buffer (a view of the mapped file) is read in place, never copied. The sums run in the
    kernel's own order (float32), as any matmul's."""
    table = _IQ2XXS_SIGNED if w.ggml_type == IQ2_XXS else None
    if isinstance(w.raw, np.ndarray) and w.raw.flags.c_contiguous:
        return _NATIVE.qmv_mapped(x, w.raw.reshape(w.shape[0], -1), w.ggml_type, table)
    raw = w.raw if isinstance(w.raw, mx.array) else mx.array(np.ascontiguousarray(w.raw))
    return _NATIVE.qmv(x, raw, w.ggml_type, table)


def affine8_qmv(x: mx.array, wq: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """``x @ W.T`` for a few rows of x (float32 ``[m <= 64, in]``) and W in MLX affine 8-bit form
    (group 32; :func:`q8_0_to_affine`'s output) with the native kernel (check
    :func:`native_available`): per group ``scale·dot(q, x) + bias·sum(x)``. ~10x MLX's CPU
    ``quantized_matmul`` for one row."""
    return _NATIVE.affine8_qmv(x, wq, scales, biases)


def _decode(blocks: mx.array, ggml_type: int) -> mx.array:
    """blocks uint8 ``[N, block_bytes]`` -> ``[N, block_elems]`` by the fastest path."""
    if _NATIVE is not None and ggml_type in NATIVE_TYPES:
        return _NATIVE.dequantize(blocks, ggml_type, _IQ2XXS_SIGNED if ggml_type == IQ2_XXS else None)
    return _DECODERS[ggml_type](blocks)


def _as_bytes(raw: mx.array | np.ndarray, ggml_type: int) -> mx.array:
    """Validate a raw buffer and return it as an MLX uint8 array (NumPy input is copied)."""
    _check_type(ggml_type)
    t = GGML_TYPES[ggml_type]
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.uint8:
            raise QuantError(f"{t.name} raw buffer must be uint8, got {raw.dtype}")
        raw = mx.array(np.ascontiguousarray(raw))
    elif isinstance(raw, mx.array):
        if raw.dtype != mx.uint8:
            raise QuantError(f"{t.name} raw buffer must be uint8, got {raw.dtype}")
    else:
        raise QuantError(f"{t.name} raw buffer must be an MLX or NumPy uint8 array, "
                         f"got {type(raw).__name__}")
    if raw.ndim == 0 or raw.shape[-1] % t.block_bytes:
        last = raw.shape[-1] if raw.ndim else "a scalar"
        raise QuantError(f"{t.name} raw buffer: last axis of {last} bytes is not a whole "
                         f"number of {t.block_bytes}-byte blocks")
    return raw


def dequantize(raw: mx.array | np.ndarray, ggml_type: int) -> mx.array:
    """Decode ggml blocks.

    raw: uint8 ``[..., n_blocks * block_bytes]`` (MLX, or NumPy such as a memmap view).
    Returns float32 ``[..., n_blocks * block_elems]`` (int32 for I32), bit-identical to
    ``gguf.quants.dequantize``. Raises QuantError for an unsupported type or a buffer whose
    last axis is not a whole number of blocks.
    """
    data = _as_bytes(raw, ggml_type)
    t = GGML_TYPES[ggml_type]
    lead = data.shape[:-1]
    n_blocks = data.size // t.block_bytes
    out = _decode(data.reshape(n_blocks, t.block_bytes), ggml_type)
    return out.reshape(*lead, data.shape[-1] // t.block_bytes * t.block_elems)


# --- lazy quantized tensors --------------------------------------------------------------------

class QTensor:
    """A quantized tensor kept as its raw blocks and dequantized on demand.

    ``shape`` is the logical row-major shape (GGUF dims reversed): ``[out, in]`` for a
    matrix, ``[n_expert, out, in]`` for routed experts, where expert ``e`` is one contiguous
    slab. ``raw`` is uint8 ``[*shape[:-1], row_bytes]`` (or any shape with that many bytes).
    An MLX array is kept as is. A NumPy array (e.g. a memmap view of the GGUF file) is kept
    without copying, and only the bytes a call touches are read and converted to MLX, so
    routed experts are never loaded or dequantized wholesale.
    """

    def __init__(self, raw: mx.array | np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> None:
        _check_type(ggml_type)
        t = GGML_TYPES[ggml_type]
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape) or shape[-1] % t.block_elems:
            raise QuantError(f"{t.name} tensor shape {shape}: the last axis must be a positive "
                             f"multiple of {t.block_elems} elements")
        row_bytes = shape[-1] // t.block_elems * t.block_bytes
        want = (*shape[:-1], row_bytes)
        if not isinstance(raw, (mx.array, np.ndarray)):
            raise QuantError(f"{t.name} raw buffer must be an MLX or NumPy uint8 array, "
                             f"got {type(raw).__name__}")
        if (raw.dtype != np.uint8) if isinstance(raw, np.ndarray) else (raw.dtype != mx.uint8):
            raise QuantError(f"{t.name} raw buffer must be uint8, got {raw.dtype}")
        if raw.size != math.prod(want):
            raise QuantError(f"{t.name} tensor of shape {shape} needs {math.prod(want)} bytes "
                             f"(uint8 {want}), got {raw.size} bytes (shape {tuple(raw.shape)})")
        self._raw = raw if tuple(raw.shape) == want else raw.reshape(want)
        self._type = ggml_type
        self._shape = shape

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical row-major shape."""
        return self._shape

    @property
    def ggml_type(self) -> int:
        return self._type

    @property
    def nbytes(self) -> int:
        """Bytes of the raw blocks."""
        return int(self._raw.size)

    @property
    def raw(self) -> mx.array | np.ndarray:
        """The raw blocks, uint8 ``[*shape[:-1], row_bytes]`` (MLX or NumPy, as given)."""
        return self._raw

    def __repr__(self) -> str:
        return f"QTensor({_type_name(self._type)}, shape={self._shape}, nbytes={self.nbytes})"

    def dequantize(self) -> mx.array:
        """The whole tensor, float32 ``shape`` (int32 for I32). For small tensors."""
        return dequantize(self._raw, self._type)

    def rows(self, start: int, stop: int) -> mx.array:
        """Rows ``start:stop`` of a 2-D tensor: float32 ``[stop - start, in]``."""
        if len(self._shape) != 2:
            raise QuantError(f"rows() needs a 2-D tensor, this one is {self._shape}")
        if not 0 <= start <= stop <= self._shape[0]:
            raise QuantError(f"rows {start}:{stop} out of range for {self._shape[0]} rows")
        return dequantize(self._raw[start:stop], self._type)

    def expert_raw(self, ids: mx.array | np.ndarray | Sequence[int]) -> mx.array:
        """The raw blocks of the selected experts of a 3-D tensor: uint8 ``[len(ids), out, row_bytes]``.

        ``ids``: 1-D integer expert indices in ``[0, n_expert)``; repeats are allowed. They
        are read on the host (one synchronisation) to validate them and, for a NumPy
        buffer, to read just those slabs.
        """
        if len(self._shape) != 3:
            raise QuantError(f"experts() needs a 3-D tensor, this one is {self._shape}")
        idx = np.asarray(ids)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise QuantError(f"expert ids must be a 1-D integer array, got shape {idx.shape} "
                             f"dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        n_expert = self._shape[0]
        if idx.size and (idx.min() < 0 or idx.max() >= n_expert):
            raise QuantError(f"expert ids {idx.tolist()} out of range for {n_expert} experts")
        if isinstance(self._raw, np.ndarray):
            return mx.array(self._raw[idx])
        return mx.take(self._raw, mx.array(idx.astype(np.int32)), axis=0)

    def experts(self, ids: mx.array | np.ndarray | Sequence[int]) -> mx.array:
        """Only the selected experts of a 3-D tensor: float32 ``[len(ids), out, in]``
        (ids as for :meth:`expert_raw`)."""
        return dequantize(self.expert_raw(ids), self._type)


def stacked_experts(banks: Sequence[QTensor], ids: mx.array | np.ndarray | Sequence[int]) -> mx.array:
    """The selected experts of several 3-D tensors stacked along the output axis.

    ``banks``: tensors ``[n_expert, out_b, in]`` of one ggml type and equal ``n_expert`` and
    ``in`` (e.g. an FFN's gate and up projections). Returns float32
    ``[len(ids), Σ out_b, in]``, bank ``b``'s rows after those of the banks before it,
    bit-identical to concatenating ``bank.experts(ids)``: the raw slabs are stacked (uint8,
    a fraction of the float32 size) and dequantized in one pass.
    """
    first = banks[0]
    for b in banks:
        if len(b.shape) != 3 or b.ggml_type != first.ggml_type or b.shape[0] != first.shape[0] \
                or b.shape[2] != first.shape[2]:
            raise QuantError(f"stacked_experts needs 3-D tensors of one type and equal expert count and "
                             f"width, got {', '.join(repr(x) for x in banks)}")
    if len(banks) == 1:
        return first.experts(ids)
    n_expert = first.shape[0]
    idx = np.asarray(ids)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise QuantError(f"expert ids must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_expert):
        raise QuantError(f"expert ids {idx.tolist()} out of range for {n_expert} experts")
    if all(isinstance(b.raw, np.ndarray) for b in banks):
        raw: mx.array | np.ndarray = np.concatenate([b.raw[idx] for b in banks], axis=1)
    else:
        take = mx.array(idx.astype(np.int32))
        raw = mx.concatenate([mx.take(b.raw if isinstance(b.raw, mx.array) else mx.array(np.ascontiguousarray(b.raw)),
                                      take, axis=0) for b in banks], axis=1)
    return dequantize(raw, first.ggml_type)


# --- matmul ------------------------------------------------------------------------------------

# Largest float32 tile of a dequantized weight materialised at once by matmul (bytes).
TILE_BYTES = 64 << 20
# "auto" uses mx.quantized_matmul for Q8_0 weights when x has at most this many rows.
AFFINE_MAX_ROWS = 1

MatmulMode = Literal["auto", "dequant", "affine"]


def q8_0_to_affine(qt: QTensor) -> tuple[mx.array, mx.array, mx.array]:
    """Re-express a 2-D Q8_0 tensor ``[out, in]`` as MLX affine 8-bit quantization (group 32).

    Q8_0 stores signed int8 q with an f16 scale d per 32 inputs; MLX stores unsigned
    ``q_u = q + 128`` with ``w = scale * q_u + bias``, so scale = d and bias = -128·d.
    Returns ``(w_q uint32 [out, in/4], scales float32 [out, in/32], biases float32
    [out, in/32])`` for ``mx.quantized_matmul(x, w_q, scales, biases, transpose=True,
    group_size=32, bits=8)``. For a finite d, the weight MLX reconstructs,
    ``d*(q+128) - 128*d``, equals ``d*q`` exactly in float32 (d has 11 significant bits and
    q + 128 fits in 8, so no step rounds), except that zeros come out as +0.0. Costs one
    pass over the bytes (~2 ms for [4096, 4096] on CPU).
    """
    if qt.ggml_type != Q8_0 or len(qt.shape) != 2:
        raise QuantError(f"q8_0_to_affine needs a 2-D Q8_0 tensor, got {qt!r}")
    out, n_in = qt.shape
    raw = qt.raw if isinstance(qt.raw, mx.array) else mx.array(np.ascontiguousarray(qt.raw))
    blocks = raw.reshape(out, n_in // 32, 34)
    d = _f16_to_f32(blocks[:, :, :2]).reshape(out, n_in // 32)
    q_u = (blocks[:, :, 2:] ^ 0x80).reshape(out, n_in)  # two's-complement int8 + 128
    w_q = q_u.view(mx.uint32)  # little-endian: element 4k+j in byte j of word k, as MLX packs
    return w_q, d, d * -128.0


def matmul(x: mx.array, w: QTensor | mx.array, mode: MatmulMode = "auto") -> mx.array:
    """``x @ W.T``: x ``[..., in]``, W ``[out, in]`` -> ``[..., out]`` in x's dtype.

    Modes for a QTensor weight:

    * "dequant": dequantize to float32, cast to x's dtype, BLAS matmul. A weight whose
      float32 form exceeds ``TILE_BYTES`` is done in row tiles, each evaluated before the
      next (MLX would otherwise materialise every tile at once), so e.g. the output head
      never exists whole in float32; such a call cannot be traced by ``mx.compile``.
    * "affine" (Q8_0 only): :func:`q8_0_to_affine` on each call, then ``mx.quantized_matmul``.
    * "auto": "affine" for a Q8_0 weight with float32 x of at most ``AFFINE_MAX_ROWS`` rows,
      else "dequant".

    Measured on MLX 0.32 CPU (2 shared, loaded cores; OpenBLAS), Q8_0 [4096, 4096], float32
    x, conversion counted in every call, GFLOP/s for 1 / 16 / 512 rows:

    * MLX's default 32 MiB buffer cache: dequant+BLAS 0.4-0.8 / 4-14 / 75-104;
      affine 1.3-3.2 / 2.1-3.2 / 1.8-2.6.
    * ``mx.set_cache_limit(4 << 30)`` (freed buffers reused, no page faults on each new
      temporary): dequant+BLAS 1.4-2.9 / 19-35 / 70-103; affine 1.2-2.3 / 2.1-2.7 / 1.6-2.5.

    quantized_matmul stays near 2-3 GFLOP/s whatever the rows (converting costs ~2 ms,
    dequantizing 10-33 ms), so it only pays for single-row decode, hence
    ``AFFINE_MAX_ROWS = 1``. float16 x is far slower on CPU for both (measured at 1 / 16
    rows: dequant 0.18 / 1.6, affine 0.03 / 0.04 GFLOP/s; no half-precision BLAS), so
    "auto" never picks affine for it: compute in float32 on CPU.

    A plain MLX weight is cast to x's dtype if needed and multiplied directly.
    """
    if mode not in ("auto", "dequant", "affine"):
        raise QuantError(f"unknown matmul mode {mode!r}; use 'auto', 'dequant' or 'affine'")
    if not isinstance(w, QTensor):
        if w.ndim != 2 or x.ndim == 0 or w.shape[1] != x.shape[-1]:
            raise QuantError(f"matmul: x {tuple(x.shape)} does not match weight {tuple(w.shape)}")
        return x @ (w if w.dtype == x.dtype else w.astype(x.dtype)).T
    if len(w.shape) != 2 or x.ndim == 0 or w.shape[1] != x.shape[-1]:
        raise QuantError(f"matmul: x {tuple(x.shape)} does not match weight {w!r}")
    if mode == "auto":
        n_rows = x.size // x.shape[-1]
        mode = ("affine" if w.ggml_type == Q8_0 and x.dtype == mx.float32
                and n_rows <= AFFINE_MAX_ROWS else "dequant")
    if mode == "affine":
        w_q, scales, biases = q8_0_to_affine(w)
        return mx.quantized_matmul(x, w_q, scales.astype(x.dtype), biases.astype(x.dtype),
                                   transpose=True, group_size=32, bits=8)
    out, n_in = w.shape
    tile = max(1, TILE_BYTES // (4 * n_in))
    if out <= tile:
        return x @ w.dequantize().astype(x.dtype).T
    parts = []
    for start in range(0, out, tile):
        part = x @ w.rows(start, min(out, start + tile)).astype(x.dtype).T
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts, axis=-1)
