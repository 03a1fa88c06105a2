"""ggml blocks repacked into MLX's own quantized layouts, for ``mx.quantized_matmul`` / ``mx.gather_qmm``.

Three ggml formats are exactly one of MLX's (``mx.quantize`` modes, group size 32):

* **MXFP4** is MLX's ``mxfp4`` (OCP MX: E2M1 codes, one E8M0 scale byte per 32). The code
  and scale bytes are used as they are: ggml's byte j holds elements j and j + 16 of its
  group, MLX reads a byte as elements 2j and 2j + 1, so MLX's weight is ggml's with the
  inputs of each group of 32 permuted (:data:`MXFP4_ORDER`); the products permute the input
  ``x`` the same way instead of reordering nibbles (one gather over ``x``'s last axis, far
  cheaper than a pass over the weight). The values are ggml's bit for bit, except that code
  8 gives -0.0 instead of +0.0 and a scale byte of 255 (NaN in the MX spec, 2^127 in
  ggml) gives infinities and NaNs; no real file has one.
* **Q8_0** is affine 8-bit: ``q_u = q + 128`` (the int8 byte with its top bit flipped),
  scale ``d``, bias ``-128·d``; ``d·q_u - 128·d == d·q`` exactly in float32 for a finite d.
* **Q4_K** is affine 4-bit: each 32-element sub-block has scale ``d·sc`` and bias
  ``-(dmin·m)`` (both products exact in float32), so ``scale·q + bias`` rounds once, as
  ggml's ``(d·sc)·q - dmin·m`` does: the same bits for finite scales.

Repacking touches only the bytes it is given (e.g. the routed experts one batch uses) and
returns arrays the size of the raw blocks (MXFP4 17 -> 16 + 1 bytes per 32 values; Q8_0
34 -> 32 + 8; Q4_K 144 -> 128 + 64 per 256, float32 scales and biases): a file is mapped,
never converted as a whole. The products MLX computes from these weights differ from a
float32 BLAS product of the dequantized weights only by accumulation order (see
``workbench bench`` for the measured difference and speed).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from workbench.gguf.quants import QuantError
from workbench.spec.ggml import GGML_TYPES, MXFP4, Q4_K, Q8_0

GROUP = 32
# ggml type -> (MLX quantization mode, bits)
NATIVE_MODES: dict[int, tuple[str, int]] = {MXFP4: ("mxfp4", 4), Q8_0: ("affine", 8), Q4_K: ("affine", 4)}


@dataclass(frozen=True)
class MLXQuant:
    """A weight ``[..., out, in]`` in an MLX quantized layout (group size 32).

    ``w``: uint32 ``[..., out, in·bits/32]``; ``scales``: ``[..., out, in/32]`` (uint8 E8M0
    exponents for mxfp4, float32 for affine); ``biases``: float32 like ``scales`` (affine)
    or None (mxfp4). ``order``: None, or int32 ``[in]``: MLX's input k is the weight's input
    ``order[k]`` (products gather ``x[..., order]``).
    """

    w: mx.array
    scales: mx.array
    biases: mx.array | None
    mode: str
    bits: int
    order: mx.array | None = None

    def _x(self, x: mx.array) -> mx.array:
        return x if self.order is None else mx.take(x, self.order, axis=-1)

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape ``[..., out, in]``."""
        return (*self.w.shape[:-1], self.w.shape[-1] * 32 // self.bits)

    def _scales_biases(self, dtype: mx.Dtype) -> tuple[mx.array, mx.array | None]:
        if self.mode == "mxfp4":
            return self.scales, None
        return self.scales.astype(dtype), self.biases.astype(dtype)

    def dequantize(self) -> mx.array:
        """The weight as MLX reconstructs it: float32 ``shape``."""
        scales, biases = self._scales_biases(mx.float32)
        w = mx.dequantize(self.w, scales, biases, group_size=GROUP, bits=self.bits, mode=self.mode, dtype=mx.float32)
        return w if self.order is None else mx.take(w, mx.argsort(self.order), axis=-1)

    def matmul(self, x: mx.array) -> mx.array:
        """``x @ W.T`` for a 2-D weight: x ``[..., in]`` -> ``[..., out]`` in x's dtype."""
        scales, biases = self._scales_biases(x.dtype)
        return mx.quantized_matmul(self._x(x), self.w, scales, biases, transpose=True, group_size=GROUP,
                                   bits=self.bits, mode=self.mode)

    def gather_matmul(self, x: mx.array, index: mx.array) -> mx.array:
        """Row r of ``x`` times expert ``index[r]``'s ``W.T``, for a 3-D weight ``[E, out, in]``.

        x: ``[M, in]``; index: int32 ``[M]`` in ``[0, E)``, ascending. Returns ``[M, out]``
        in x's dtype.
        """
        scales, biases = self._scales_biases(x.dtype)
        y = mx.gather_qmm(self._x(x)[:, None, :], self.w, scales, biases, rhs_indices=index, transpose=True,
                          group_size=GROUP, bits=self.bits, mode=self.mode, sorted_indices=True)
        return y[:, 0, :]


def _pack_nibbles(codes: mx.array) -> mx.array:
    """4-bit codes uint8 ``[..., 2k]`` (element order) -> MLX bytes ``[..., k]``, low nibble first."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


# MXFP4 as MLX reads ggml's bytes: MLX input 2j + h of a group is ggml's input j + 16·h
MXFP4_ORDER = np.arange(32).reshape(2, 16).T.reshape(32)


def _mxfp4(blocks: mx.array) -> tuple[mx.array, mx.array, None]:
    return blocks[..., 1:], blocks[..., 0], None


def _f16(b: mx.array) -> mx.array:
    return b.view(mx.float16).astype(mx.float32)


def _q8_0(blocks: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    d = _f16(blocks[..., :2])[..., 0]
    return blocks[..., 2:] ^ 0x80, d, d * -128.0


def _q4_k(blocks: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])  # [..., 1]
    lo, mid, hi = blocks[..., 4:8], blocks[..., 8:12], blocks[..., 12:16]
    # 6-bit scale/min of sub-block j (as in quants._dequant_q4_k)
    sc = mx.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    mn = mx.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:].reshape(*blocks.shape[:-1], 4, 32)  # low nibbles: sub-block 2i, high: 2i + 1
    packed = mx.stack([_pack_nibbles(qs & 15), _pack_nibbles(qs >> 4)], axis=-2)  # [..., 4, 2, 16]
    return packed.reshape(*blocks.shape[:-1], 128), d * sc.astype(mx.float32), -(dmin * mn.astype(mx.float32))


_REPACK = {MXFP4: _mxfp4, Q8_0: _q8_0, Q4_K: _q4_k}


def to_mlx(raw: mx.array | np.ndarray, ggml_type: int) -> MLXQuant:
    """Repack raw ggml blocks uint8 ``[..., out, row_bytes]`` into an :class:`MLXQuant` ``[..., out, in]``.

    ``ggml_type``: MXFP4, Q8_0 or Q4_K (:data:`NATIVE_MODES`). NumPy input (e.g. the
    selected slabs of a memory-mapped file) is converted once. Raises QuantError for another
    type or a row that is not whole blocks.
    """
    if ggml_type not in NATIVE_MODES:
        names = ", ".join(GGML_TYPES[t].name for t in NATIVE_MODES)
        raise QuantError(f"no MLX quantized layout for {GGML_TYPES.get(ggml_type, ggml_type)}; one of {names}")
    t = GGML_TYPES[ggml_type]
    if isinstance(raw, np.ndarray):
        raw = mx.array(np.ascontiguousarray(raw))
    if raw.dtype != mx.uint8 or raw.ndim < 2 or raw.shape[-1] % t.block_bytes:
        raise QuantError(f"{t.name} raw buffer must be uint8 [..., out, whole {t.block_bytes}-byte blocks], "
                         f"got {raw.dtype} {tuple(raw.shape)}")
    lead, n_blocks = raw.shape[:-1], raw.shape[-1] // t.block_bytes
    codes, scales, biases = _REPACK[ggml_type](raw.reshape(*lead, n_blocks, t.block_bytes))
    mode, bits = NATIVE_MODES[ggml_type]
    w = mx.contiguous(codes).reshape(*lead, -1).view(mx.uint32)  # little-endian: bytes in MLX's order
    groups = n_blocks * t.block_elems // GROUP
    order = None
    if ggml_type == MXFP4:
        order = mx.array((np.arange(groups)[:, None] * GROUP + MXFP4_ORDER).reshape(-1).astype(np.int32))
    return MLXQuant(w, scales.reshape(*lead, groups), None if biases is None else biases.reshape(*lead, groups),
                    mode, bits, order)
