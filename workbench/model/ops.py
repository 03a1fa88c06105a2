"""Small shared operations of the model: RMSNorm, linear layers over quantized weights,
top-k with ds4's tie rule, and the per-device compute dtype.

Weights reach the model in one of three forms (see :mod:`workbench.model.weights`):

* a float ``mx.array`` ``[out, in]`` (F16/F32 tensors of the GGUF, widened to float32);
* a Q8_0 :class:`~workbench.gguf.quants.QTensor` over the mapped file (when the native
  kernels are built): few-row products (decode) read its blocks in place with the native
  kernel (``quants.qmv``: the Q8_0 bytes are the only weight bytes read), larger ones
  (prefill chunks) dequantize it in tiles for a float32 BLAS matmul;
* an :class:`AffineQ8` — a Q8_0 matrix re-expressed in MLX's affine 8-bit format
  (group 32, scale ``d``, bias ``-128·d``) when the native kernels are not built: used
  by ``mx.quantized_matmul`` for decode and dequantized in one pass for a prefill chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from workbench.gguf.quants import QTensor, affine8_qmv, native_available, qmv

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


Weight = mx.array | AffineQ8 | QTensor


def _few_rows_native(rows: int) -> bool:
    """Whether a product with ``rows`` rows of x runs on the native few-row kernels."""
    return rows <= QMM_MAX_ROWS and compute_dtype() == mx.float32 and native_available()


def _dense(w: AffineQ8 | QTensor, start: int, stop: int, dt: mx.Dtype) -> mx.array:
    """Output rows ``start:stop`` of a quantized weight as a float ``[stop - start, in]``."""
    if isinstance(w, QTensor):
        return w.rows(start, stop).astype(dt)
    return w.rows(start, stop).dequantize(dt)


def linear(x: mx.array, w: Weight) -> mx.array:
    """``x @ W.T`` for x ``[..., in]`` and W ``[out, in]``; returns float32 ``[..., out]``."""
    dt = compute_dtype()
    if isinstance(w, mx.array):
        if w.dtype != dt or x.dtype != dt:
            return (x.astype(dt) @ w.astype(dt).T).astype(mx.float32)
        return x @ w.T
    rows = x.size // x.shape[-1]
    out, n_in = w.shape
    if _few_rows_native(rows):
        x2 = x.reshape(rows, n_in).astype(dt)
        y = qmv(x2, w) if isinstance(w, QTensor) else affine8_qmv(x2, w.wq, w.scales, w.biases)
        return y.reshape(*x.shape[:-1], out)
    if rows <= QMM_MAX_ROWS and isinstance(w, AffineQ8):
        y = mx.quantized_matmul(x.astype(dt), w.wq, w.scales.astype(dt), w.biases.astype(dt),
                                transpose=True, group_size=32, bits=8)
        return y.astype(mx.float32)
    tile = max(1, DEQUANT_TILE_BYTES // (4 * n_in))
    if out <= tile:
        return (x.astype(dt) @ _dense(w, 0, out, dt).T).astype(mx.float32)
    parts = []
    for start in range(0, out, tile):
        part = (x.astype(dt) @ _dense(w, start, min(out, start + tile), dt).T).astype(mx.float32)
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts, axis=-1)


def grouped_linear(x: mx.array, w: Weight, groups: int) -> mx.array:
    """Block-diagonal linear: group g of x uses output rows ``g*R:(g+1)*R`` of W.

    x ``[G, T, X]``, W ``[G*R, X]`` → ``[T, G*R]`` (group-major output columns).
    """
    out = w.shape[0]
    r = out // groups
    if isinstance(w, QTensor) and _few_rows_native(x.shape[1]):
        return qmv(x.astype(mx.float32), w)  # one call: row o takes group o // R
    if isinstance(w, AffineQ8) and x.shape[1] <= QMM_MAX_ROWS:
        parts = [linear(x[g], w.rows(g * r, (g + 1) * r)) for g in range(groups)]
        return mx.concatenate(parts, axis=-1)
    dt = compute_dtype()
    wf = w.astype(dt) if isinstance(w, mx.array) else _dense(w, 0, out, dt)
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
