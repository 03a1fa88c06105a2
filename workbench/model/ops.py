"""Small shared operations of the model: RMSNorm, linear layers over quantized weights,
top-k with ds4's tie rule, and the per-device compute dtype.

Weights reach the model in one of two forms (see :mod:`workbench.model.weights`):

* a float ``mx.array`` ``[out, in]`` (F16/F32 tensors of the GGUF, widened to float32);
* an :class:`AffineQ8` — a Q8_0 matrix re-expressed in MLX's affine 8-bit format
  (group 32, scale ``d``, bias ``-128·d``): as compact as the file, usable directly by
  the native few-row kernel (``quants.affine8_qmv``; ``mx.quantized_matmul`` when the
  native kernels are not built) for decode, and dequantized to float32 in a single fast
  pass for a prefill chunk, where a BLAS matmul is ~40x faster than the quantized kernel
  on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from workbench.gguf.quants import affine8_qmv, native_available

# rows of x up to which a quantized weight is used as is (matvec is memory bound there)
QMM_MAX_ROWS = 4
# largest float32 weight tile materialised at once by the dequantize-and-BLAS path (bytes)
DEQUANT_TILE_BYTES = 256 << 20


def compute_dtype() -> mx.Dtype:
    """Matmul dtype for the current default device.

    MLX's CPU backend runs float16 matmuls without BLAS (~30x slower) so the CPU computes
    in float32; a GPU computes matmuls in float16. Norms, softmaxes, the QAT simulations
    and the KV state stay float32 on every device.
    """
    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


@dataclass(frozen=True)
class AffineQ8:
    """A Q8_0 ``[out, in]`` matrix in MLX affine 8-bit form (group 32).

    ``wq`` uint32 ``[out, in/4]``, ``scales`` and ``biases`` float32 ``[out, in/32]``.
    """

    wq: mx.array
    scales: mx.array
    biases: mx.array

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.wq.shape[0]), int(self.wq.shape[1]) * 4)

    def rows(self, start: int, stop: int) -> "AffineQ8":
        """Output rows ``start:stop`` (a lazy slice, no copy until used)."""
        return AffineQ8(self.wq[start:stop], self.scales[start:stop], self.biases[start:stop])

    def dequantize(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The float matrix ``[out, in]``."""
        w = mx.dequantize(self.wq, self.scales, self.biases, group_size=32, bits=8)
        return w if w.dtype == dtype else w.astype(dtype)

    @property
    def nbytes(self) -> int:
        return int(self.wq.nbytes + self.scales.nbytes + self.biases.nbytes)


Weight = mx.array | AffineQ8


def linear(x: mx.array, w: Weight) -> mx.array:
    """``x @ W.T`` for x ``[..., in]`` and W ``[out, in]``; returns float32 ``[..., out]``."""
    dt = compute_dtype()
    if isinstance(w, AffineQ8):
        rows = x.size // x.shape[-1]
        if rows <= QMM_MAX_ROWS and dt == mx.float32 and native_available():
            y = affine8_qmv(x.reshape(rows, x.shape[-1]).astype(dt), w.wq, w.scales, w.biases)
            return y.reshape(*x.shape[:-1], w.shape[0])
        if rows <= QMM_MAX_ROWS:
            y = mx.quantized_matmul(x.astype(dt), w.wq, w.scales.astype(dt), w.biases.astype(dt),
                                    transpose=True, group_size=32, bits=8)
            return y.astype(mx.float32)
        out, n_in = w.shape
        tile = max(1, DEQUANT_TILE_BYTES // (4 * n_in))
        if out <= tile:
            return (x.astype(dt) @ w.dequantize(dt).T).astype(mx.float32)
        parts = []
        for start in range(0, out, tile):
            part = (x.astype(dt) @ w.rows(start, min(out, start + tile)).dequantize(dt).T).astype(mx.float32)
            mx.eval(part)
            parts.append(part)
        return mx.concatenate(parts, axis=-1)
    if w.dtype != dt or x.dtype != dt:
        return (x.astype(dt) @ w.astype(dt).T).astype(mx.float32)
    return x @ w.T


def grouped_linear(x: mx.array, w: Weight, groups: int) -> mx.array:
    """Block-diagonal linear: group g of x uses output rows ``g*R:(g+1)*R`` of W.

    x ``[G, T, X]``, W ``[G*R, X]`` → ``[T, G*R]`` (group-major output columns).
    """
    out = w.shape[0]
    r = out // groups
    if isinstance(w, AffineQ8) and x.shape[1] <= QMM_MAX_ROWS:
        parts = [linear(x[g], w.rows(g * r, (g + 1) * r)) for g in range(groups)]
        return mx.concatenate(parts, axis=-1)
    dt = compute_dtype()
    wf = w.dequantize(dt) if isinstance(w, AffineQ8) else w.astype(dt)
    y = x.astype(dt) @ wf.reshape(groups, r, -1).transpose(0, 2, 1)  # [G, T, R]
    return y.transpose(1, 0, 2).reshape(x.shape[1], out).astype(mx.float32)


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """``x / sqrt(mean(x², last axis) + eps) ⊙ weight`` (weight None: no weight), float32."""
    return mx.fast.rms_norm(x, weight, eps)


def topk_mask(scores: mx.array, k: int) -> mx.array:
    """Boolean mask of the top-k entries of the last axis, ties going to the lower index.

    scores ``[..., n]`` (``-inf`` entries are never preferred to finite ones); ``k <= n``.
    Exact and order-independent: everything above the k-th largest value is kept, then
    entries equal to it in index order until k are kept.
    """
    n = scores.shape[-1]
    kth = mx.sort(scores, axis=-1)[..., n - k : n - k + 1]
    above = scores > kth
    need = k - above.sum(axis=-1, keepdims=True)
    tie = scores == kth
    return above | (tie & (mx.cumsum(tie.astype(mx.int32), axis=-1) <= need))


def topk_indices(scores: mx.array, k: int) -> mx.array:
    """Indices ``[..., k]`` (ascending) of :func:`topk_mask`'s selection."""
    n = scores.shape[-1]
    ar = mx.arange(n, dtype=mx.int32)
    key = mx.where(topk_mask(scores, k), ar, ar + n)
    return mx.sort(key, axis=-1)[..., :k]
