"""Hyper-connections: the residual stream is ``n_hc`` parallel streams (ds4 §2.1-2.3, §2.7).

Before each sublayer, ``hc_pre`` mixes the streams into one input and produces the gains
and the Sinkhorn-normalised combine matrix that ``hc_post`` uses to write the sublayer's
output back. The output head collapses the streams with its own sigmoid weights.
"""

from __future__ import annotations

import mlx.core as mx

from workbench.model.ops import linear, rms_norm


@mx.compile
def _sinkhorn(a: mx.array, iters: int, eps: float) -> mx.array:
    """Combine matrices ``[T, n, n]`` from logits: row softmax + eps and a column step
    (iteration 1), then ``iters - 1`` row/column rounds. Compiled: at decode (T = 1) the
    ~80 tiny ops cost more in dispatch than in arithmetic; results are bit-identical."""
    c = mx.softmax(a, axis=-1) + eps
    c = c / (c.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(axis=-1, keepdims=True) + eps)
        c = c / (c.sum(axis=-2, keepdims=True) + eps)
    return c


def hc_pre(
    x: mx.array,
    fn: mx.array,
    scale: mx.array,
    base: mx.array,
    iters: int,
    eps: float,
    norm_eps: float,
) -> tuple[mx.array, mx.array, mx.array]:
    """Reduce streams x ``[T, n_hc, D]`` to a sublayer input.

    fn ``[mix, n_hc*D]`` with mix = 2·n_hc + n_hc², scale ``[3]`` (pre, post, comb),
    base ``[mix]``. Returns ``y [T, D]``, ``post [T, n_hc]`` and ``comb [T, n_hc, n_hc]``
    with ``comb[t, a, b] = C[a][b]`` of ds4-architecture §2.2: row softmax + eps, a column
    normalisation (together iteration 1), then ``iters - 1`` row/column rounds, each sum
    offset by eps.
    """
    t, n, d = x.shape
    m = linear(rms_norm(x.reshape(t, n * d), None, norm_eps), fn)  # [T, mix]
    pre = mx.sigmoid(m[:, :n] * scale[0] + base[:n]) + eps
    post = 2.0 * mx.sigmoid(m[:, n : 2 * n] * scale[1] + base[n : 2 * n])
    a = (m[:, 2 * n :] * scale[2] + base[2 * n :]).reshape(t, n, n)
    y = (pre[:, :, None] * x).sum(axis=1)
    return y, post, _sinkhorn(a, iters, eps)


def hc_post(f: mx.array, x_res: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """Expand sublayer output f ``[T, D]`` back to streams: ``X_new[b] = post[b]·f +
    Σ_a C[a][b]·X_res[a]`` (the transposed combine), x_res ``[T, n_hc, D]`` being the
    streams that entered this sublayer's ``hc_pre``."""
    return post[:, :, None] * f[:, None, :] + comb.transpose(0, 2, 1) @ x_res


def hc_collapse(x: mx.array, fn: mx.array, scale: mx.array, base: mx.array, eps: float, norm_eps: float) -> mx.array:
    """The output head's stream collapse: ``w = sigmoid(fn @ RMS(flat X) · scale[0] + base)
    + eps`` (no Sinkhorn), ``y = Σ_h w[h]·X[h]``. x ``[T, n_hc, D]`` → ``[T, D]``."""
    t, n, d = x.shape
    m = linear(rms_norm(x.reshape(t, n * d), None, norm_eps), fn)  # [T, n_hc]
    w = mx.sigmoid(m * scale[0] + base) + eps
    return (w[:, :, None] * x).sum(axis=1)
