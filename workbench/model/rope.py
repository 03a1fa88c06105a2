"""Rotary position embedding on the tail of each head, interleaved pairs, with YaRN.

ds4-architecture §2.5: RoPE rotates only the *last* ``n_rot`` dims of a row, pairing
adjacent dims ``(2i, 2i+1)`` (GPT-J / complex style). Dense layers use ``rope_freq_base``
without scaling; compressed layers use ``compress_rope_freq_base`` with YaRN frequency
blending and **no** magnitude scaling. Angles are computed in float64 on the host and
applied in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from workbench.spec.args import ModelArgs


@dataclass(frozen=True)
class YarnParams:
    """YaRN frequency scaling: ``factor`` (16), ``orig_ctx`` (65536), betas (32, 1)."""

    factor: float
    orig_ctx: int
    beta_fast: float
    beta_slow: float


@dataclass(frozen=True)
class RopeSpec:
    """The RoPE parameters of one layer: every rotary use in the layer shares them."""

    n_rot: int
    base: float
    yarn: YarnParams | None

    @classmethod
    def for_layer(cls, args: ModelArgs, layer: int) -> "RopeSpec":
        """Ratio-0 layers: ``rope_freq_base``, no YaRN; compressed layers: the compressed
        base with YaRN from the metadata."""
        if args.ratio(layer) == 0:
            return cls(args.n_rot, args.rope_freq_base, None)
        yarn = YarnParams(args.rope_scaling_factor, args.rope_orig_ctx, args.yarn_beta_fast, args.yarn_beta_slow)
        return cls(args.n_rot, args.compress_rope_freq_base, yarn)

    def __call__(self, x: mx.array, positions: mx.array | np.ndarray, inverse: bool = False) -> mx.array:
        return rope_tail(x, positions, self.n_rot, self.base, self.yarn, inverse)


def yarn_corr_range(n_rot: int, base: float, yarn: YarnParams) -> tuple[int, int]:
    """YaRN's (low, high) pair indices: ``corr(β) = n_rot·ln(orig/(2πβ)) / (2·ln base)``,
    ``low = max(0, floor(corr(beta_fast)))``, ``high = min(n_rot-1, ceil(corr(beta_slow)))``.
    (15, 25) for ds4's constants."""

    def corr(beta: float) -> float:
        return n_rot * math.log(yarn.orig_ctx / (2 * math.pi * beta)) / (2 * math.log(base))

    return max(0, math.floor(corr(yarn.beta_fast))), min(n_rot - 1, math.ceil(corr(yarn.beta_slow)))


def rope_frequencies(n_rot: int, base: float, yarn: YarnParams | None) -> np.ndarray:
    """Angle per position per pair, float64 ``[n_rot/2]``: ``base^(-2i/n_rot)``, YaRN-blended."""
    i = np.arange(n_rot // 2, dtype=np.float64)
    omega = base ** (-2.0 * i / n_rot)
    if yarn is None:
        return omega
    low, high = yarn_corr_range(n_rot, base, yarn)
    ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
    return omega * (ramp + (1.0 - ramp) / yarn.factor)


def rope_tail(
    x: mx.array,
    positions: mx.array | np.ndarray,
    n_rot: int,
    base: float,
    yarn: YarnParams | None,
    inverse: bool = False,
) -> mx.array:
    """Rotate the last ``n_rot`` dims of x ``[..., T, d]`` by positions ``[T]``.

    Pair i is ``(x[d-n_rot+2i], x[d-n_rot+2i+1])``: ``v0' = v0 cos θ - v1 sin θ``,
    ``v1' = v0 sin θ + v1 cos θ`` with ``θ = p·freq_i``; ``inverse`` uses ``-sin``.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)
    theta = pos[:, None] * rope_frequencies(n_rot, base, yarn)[None, :]
    cos = mx.array(np.cos(theta).astype(np.float32))
    sin = mx.array(np.sin(theta).astype(np.float32))
    if inverse:
        sin = -sin
    d = x.shape[-1]
    tail = x[..., d - n_rot :].reshape(*x.shape[:-1], n_rot // 2, 2)
    v0, v1 = tail[..., 0], tail[..., 1]
    rot = mx.stack([v0 * cos - v1 * sin, v0 * sin + v1 * cos], axis=-1).reshape(*x.shape[:-1], n_rot)
    if d == n_rot:
        return rot
    return mx.concatenate([x[..., : d - n_rot], rot], axis=-1)
