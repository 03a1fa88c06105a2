"""Quantization-aware-training simulations that are part of the DeepSeek V4 graph.

* FP8 E4M3FN on the KV rows' nope dims (blocks of 64, power-of-two block scales);
* Hadamard-128 followed by FP4 E2M1 (blocks of 32) on indexer queries and keys.

Both round to the nearest representable value with ties to the even code, exactly as
ds4 does (ds4-architecture §2.5, §2.5.2). Everything is float32 and elementwise within
blocks along the last axis.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

FP8_MAX = 448.0  # largest E4M3FN value
FP8_AMAX_FLOOR = 1e-4
FP8_MIN_EXP = -6  # smallest normal exponent of E4M3; below it the step is 2^-9
FP8_MANT_BITS = 3
FP4_MAX = 6.0
FP4_AMAX_FLOOR = 7.052966104933725e-38


def _exponent(x: mx.array) -> mx.array:
    """floor(log2(x)) for positive normal float32 x, exactly (from the bit pattern)."""
    bits = x.astype(mx.float32).view(mx.int32)
    return ((bits >> 23) & 0xFF) - 127


def _ceil_log2(x: mx.array) -> mx.array:
    """ceil(log2(x)) for positive normal float32 x, exactly."""
    bits = x.astype(mx.float32).view(mx.int32)
    exact = (bits & 0x7FFFFF) == 0
    return _exponent(x) + mx.where(exact, 0, 1)


def _pow2(e: mx.array) -> mx.array:
    """2**e for integer e in the float32 normal range, exactly."""
    return ((e + 127).astype(mx.int32) << 23).view(mx.float32)


def _blocks(x: mx.array, block: int) -> mx.array:
    if x.shape[-1] % block:
        raise ValueError(f"last axis {x.shape[-1]} is not a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _block_scale(xb: mx.array, floor: float, qmax: float) -> mx.array:
    """Power-of-two scale 2^ceil(log2(max(amax, floor) / qmax)) per block, ``[..., nb, 1]``."""
    amax = mx.maximum(mx.abs(xb).max(axis=-1, keepdims=True), floor)
    return _pow2(_ceil_log2(amax / qmax))


def e4m3_round(y: mx.array) -> mx.array:
    """Round float32 values in [-448, 448] to the nearest E4M3FN value, ties to even code."""
    a = mx.abs(y)
    e = mx.maximum(_exponent(mx.maximum(a, 2.0**FP8_MIN_EXP)), FP8_MIN_EXP)
    step = _pow2(e - FP8_MANT_BITS)
    q = mx.round(a / step) * step  # mx.round rounds half to even
    return mx.where(y < 0, -q, q)


def fp8_e4m3_sim(x: mx.array, block: int = 64) -> mx.array:
    """FP8 E4M3FN quantize-dequantize in blocks of ``block`` along the last axis.

    Per block: ``amax = max(|x|, 1e-4)``, ``s = 2^ceil(log2(amax/448))``,
    ``x = e4m3_round(clamp(x/s, -448, 448)) * s``. x ``[..., n]`` with n a multiple of block.
    """
    xb = _blocks(x.astype(mx.float32), block)
    s = _block_scale(xb, FP8_AMAX_FLOOR, FP8_MAX)
    y = e4m3_round(mx.clip(xb / s, -FP8_MAX, FP8_MAX)) * s
    return y.reshape(x.shape)


def e2m1_round(y: mx.array) -> mx.array:
    """Round float32 values in [-6, 6] to the nearest E2M1 value
    {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code index."""
    a = mx.abs(y)
    # midpoints between neighbours; a tie goes to the even code (0, 1, 2, 4 win theirs)
    q = mx.where(a <= 0.25, 0.0,
        mx.where(a < 0.75, 0.5,
        mx.where(a <= 1.25, 1.0,
        mx.where(a < 1.75, 1.5,
        mx.where(a <= 2.5, 2.0,
        mx.where(a < 3.5, 3.0,
        mx.where(a <= 5.0, 4.0, 6.0)))))))
    return mx.where(y < 0, -q, q)


def fp4_e2m1_sim(x: mx.array, block: int = 32) -> mx.array:
    """FP4 E2M1 quantize-dequantize in blocks of ``block`` along the last axis.

    Per block: ``amax = max(|x|, 7.05e-38)``, ``s = 2^ceil(log2(amax/6))``,
    ``x = e2m1_round(clamp(x/s, -6, 6)) * s``.
    """
    xb = _blocks(x.astype(mx.float32), block)
    s = _block_scale(xb, FP4_AMAX_FLOOR, FP4_MAX)
    y = e2m1_round(mx.clip(xb / s, -FP4_MAX, FP4_MAX)) * s
    return y.reshape(x.shape)


@lru_cache(maxsize=8)
def hadamard_matrix(n: int) -> mx.array:
    """Sylvester-order Walsh-Hadamard matrix ``H[i, j] = (-1)^popcount(i & j) / sqrt(n)``."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    i = np.arange(n)
    parity = np.vectorize(lambda v: bin(v).count("1") & 1)(i[:, None] & i[None, :])
    return mx.array(((1 - 2 * parity) / math.sqrt(n)).astype(np.float32))


def hadamard(x: mx.array) -> mx.array:
    """Normalised Walsh-Hadamard transform of the last axis (H is symmetric: ``x @ H``)."""
    return x.astype(mx.float32) @ hadamard_matrix(int(x.shape[-1]))
