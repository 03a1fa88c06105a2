"""The mixture-of-experts FFN: a router, routed experts and one shared expert (§2.6).

Router: ``prob = sqrt(softplus(Wr @ g))``. Hash layers (the first ``n_hash_layer``) take
the experts from ``tid2eid[token]``; the others take the top-k of ``prob + exp_probs_b``
(the bias only chooses). The chosen weights are the unbiased probs renormalised (sum
clamped below at 6.103515625e-5) times ``expert_weights_scale``. Each expert is a SwiGLU
with an asymmetric clamp (gate ≤ c, up in [-c, c]); the shared expert uses it too.

Routed experts stay quantized. Two ways to apply an expert to the rows routed to it:

* **native** (MXFP4, Q8_0 and Q4_K experts, :mod:`workbench.gguf.mlxquant`): the expert's raw
  blocks are taken as MLX's own quantized layout (``mxfp4`` as they are, with the inputs
  permuted; affine 8-bit and 4-bit after a repacking pass; group 32; the same weights, see
  that module) and applied with ``mx.gather_qmm``, every native expert of a batch in one call;
* **from blocks** (CPU, any type the native kernels decode): an expert with at most
  ``QMV_MAX_TOKENS`` rows is applied straight from its raw blocks (read in place from the
  mapped file) by the native few-row kernel (``quants.qmv``: each block's weights converted
  once and dotted with up to 4 rows at a time, no float32 weight written; ~10x MLX's CPU
  quantized matmul), when the native kernels are built; it takes precedence over the
  native path on the CPU;
* **dequantized**: the expert is dequantized to float32 once and its rows go through a
  float32 BLAS matmul.

On Metal every expert of those three types is native. On the CPU MLX's quantized matmul
is slow per row but saves the dequantization, so (when the few-row kernel is not built) an
expert is native when it has at most ``native_max_rows`` rows, by default
:data:`NATIVE_MAX_ROWS` for its types (measured by ``workbench bench --only experts`` on
real-width experts): decode of MXFP4 and Q8_0 experts is native, prefill mostly
dequantized. The dequantized path handles a batch of experts at a time
(``expert_batch_bytes`` of float32 weights). When gate and up are ``QTensor`` s of one type,
they are dequantized together as one ``[2·n_ff, n_embd]`` matrix per expert and applied in
one matmul. Dequantized batches are short-lived, equal-sized buffers: with MLX's buffer
cache large enough to hold a few of them (``workbench.session.load`` sets it on the CPU),
each batch reuses the previous one's memory instead of page-faulting fresh memory in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from workbench.gguf.mlxquant import NATIVE_MODES, to_mlx
from workbench.gguf.quants import NATIVE_TYPES, QTensor, native_available, qmv, stacked_experts
from workbench.spec.ggml import MXFP4, Q4_K, Q8_0
from workbench.model.ops import Weight, compute_dtype, linear, topk_indices

WEIGHT_SUM_FLOOR = 6.103515625e-5
# float32 bytes of dequantized expert weights materialised at once: one real-width expert
# (gate+up 64 MiB, down 32 MiB), so every batch has the same buffer sizes and MLX's buffer
# cache recycles them (3 experts per batch page-faulted 2x more memory in at real widths)
EXPERT_BATCH_BYTES = 128 << 20
# CPU: an expert with at most this many rows in a chunk is applied from its blocks by the
# native few-row kernel when the native kernels are built (every expert in decode). Measured
# on one real-width IQ2_XXS/Q2_K expert (2048 x 4096; two loaded cores), ms from blocks vs
# dequantized + BLAS at 8 / 16 / 32 / 48 rows: 33 vs 113, 72 vs 98, 148 vs 133, 285 vs 138.
QMV_MAX_TOKENS = 24
# raw bytes of natively applied experts repacked at once
NATIVE_BATCH_BYTES = 256 << 20
# CPU: the most rows an expert of this ggml type may have and still be applied natively.
# Measured (MoE.routed, 2 real-width experts 2048 x 4096, native dequantization kernels built,
# two loaded cores; ``workbench bench --only experts`` re-measures it), ms per expert native vs
# dequantized at 1 / 2 / 4 rows: MXFP4 168 vs 256, 184 vs 370, 457 vs 315; Q8_0 260 vs 346,
# 437 vs 302; Q4_K 400 vs 314 (its nibble repacking costs more than the dequantization saves).
NATIVE_MAX_ROWS: dict[int, int] = {MXFP4: 2, Q8_0: 1, Q4_K: 0}


class ExpertBank(Protocol):
    """Routed expert weights ``[n_expert, out, in]`` (e.g. a ``workbench.gguf.quants.QTensor``)."""

    shape: tuple[int, ...]

    def experts(self, ids: np.ndarray) -> mx.array:
        """float32 ``[len(ids), out, in]`` for the given expert ids."""
        ...


@dataclass
class MoEWeights:
    router: mx.array  # [n_expert, n_embd] float32
    bias: mx.array | None  # [n_expert] exp_probs_b, None when absent
    tid2eid: mx.array | None  # [n_vocab, n_expert_used] int32 (hash layers)
    gate_exps: ExpertBank  # [n_expert, n_ff, n_embd]
    up_exps: ExpertBank  # [n_expert, n_ff, n_embd]
    down_exps: ExpertBank  # [n_expert, n_embd, n_ff]
    gate_sh: Weight  # [n_ff, n_embd]
    up_sh: Weight
    down_sh: Weight  # [n_embd, n_ff]


def softplus(x: mx.array) -> mx.array:
    """ds4's softplus: x above 20, e^x below -20, log1p(e^x) between."""
    mid = mx.log1p(mx.exp(mx.clip(x, -20.0, 20.0)))
    return mx.where(x > 20.0, x, mx.where(x < -20.0, mx.exp(x), mid))


def swiglu(gate: mx.array, up: mx.array, clamp: float) -> mx.array:
    """``silu(min(gate, c)) * clip(up, -c, c)``."""
    gate = mx.minimum(gate, clamp)
    return gate * mx.sigmoid(gate) * mx.clip(up, -clamp, clamp)


class MoE:
    def __init__(self, n_expert_used: int, hash_routed: bool, weights_scale: float, clamp: float,
                 weights: MoEWeights, normalize: bool = True, expert_batch_bytes: int = EXPERT_BATCH_BYTES,
                 native_max_rows: int | None = None) -> None:
        self.k, self.hash_routed, self.scale, self.clamp = n_expert_used, hash_routed, weights_scale, clamp
        self.w, self.normalize, self.expert_batch_bytes = weights, normalize, expert_batch_bytes
        self.native_rows = native_max_rows

    def route(self, g: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """Expert ids ``[T, k]`` int32 and their weights ``[T, k]`` float32."""
        prob = mx.sqrt(softplus(linear(g, self.w.router)))  # [T, n_expert]
        if self.hash_routed:
            sel = self.w.tid2eid[tokens]
        else:
            choose = prob if self.w.bias is None else prob + self.w.bias
            sel = topk_indices(choose, self.k)
        wt = mx.take_along_axis(prob, sel, axis=-1)
        if self.normalize:  # expert_weights_norm (true for ds4)
            wt = wt / mx.maximum(wt.sum(axis=-1, keepdims=True), WEIGHT_SUM_FLOOR)
        return sel.astype(mx.int32), wt * self.scale

    def shared(self, g: mx.array) -> mx.array:
        return linear(swiglu(linear(g, self.w.gate_sh), linear(g, self.w.up_sh), self.clamp), self.w.down_sh)

    def native_max_rows(self) -> int:
        """The most rows an expert may have to be applied natively (0: never): unbounded on a
        GPU, :data:`NATIVE_MAX_ROWS` on the CPU (the smallest over gate, up and down's types);
        ``native_max_rows`` given to the constructor overrides both."""
        banks = (self.w.gate_exps, self.w.up_exps, self.w.down_exps)
        if not all(isinstance(b, QTensor) and b.ggml_type in NATIVE_MODES for b in banks):
            return 0
        if self.native_rows is not None:
            return self.native_rows
        if mx.default_device() != mx.cpu:
            return 1 << 62
        return min(NATIVE_MAX_ROWS[b.ggml_type] for b in banks)

    def routed(self, g: mx.array, sel: mx.array, wt: mx.array) -> mx.array:
        """Σ_k wt·expert_k(g) ``[T, n_embd]``, touching only the experts in ``sel``."""
        t, k = sel.shape
        flat = np.array(sel).reshape(-1)
        order = np.argsort(flat, kind="stable")
        experts, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
        tok = order // k  # token of each (sorted) assignment
        xs = g[mx.array(tok.astype(np.int32))]  # [T·k, n_embd] grouped by expert
        ws = wt.reshape(-1)[mx.array(order.astype(np.int32))][:, None]
        direct = counts <= QMV_MAX_TOKENS if self._blocks_direct() else np.zeros(len(experts), dtype=bool)
        native = ~direct & (counts <= self.native_max_rows())
        ys: list[mx.array] = []
        rows: list[np.ndarray] = []  # the sorted assignments each entry of ys holds
        for e, a, n in zip(experts[direct], starts[direct], counts[direct]):
            ys.append(self._from_blocks(int(e), xs[int(a) : int(a + n)], ws[int(a) : int(a + n)]))
            rows.append(np.arange(a, a + n))
        if native.any():
            r = np.concatenate([np.arange(a, a + n) for a, n in zip(starts[native], counts[native])])
            ys += self._native(experts[native], counts[native], xs[mx.array(r.astype(np.int32))],
                               ws[mx.array(r.astype(np.int32))])
            rows.append(r)
        rest = ~native & ~direct
        if rest.any():
            ys += self._dequantized(experts[rest], starts[rest], counts[rest], xs, ws)
            rows += [np.arange(a, a + n) for a, n in zip(starts[rest], counts[rest])]
        y = mx.concatenate(ys)
        dest = mx.array(tok[np.concatenate(rows)].astype(np.int32))
        return mx.zeros((t, g.shape[1]), mx.float32).at[dest].add(y)

    def _blocks_direct(self) -> bool:
        """Whether experts with few rows can be applied from their blocks: native kernels
        built, QTensor banks of types they decode, float32 compute (the CPU)."""
        banks = (self.w.gate_exps, self.w.up_exps, self.w.down_exps)
        return (native_available() and compute_dtype() == mx.float32
                and all(isinstance(b, QTensor) and b.ggml_type in NATIVE_TYPES for b in banks))

    def _from_blocks(self, e: int, x: mx.array, w: mx.array) -> mx.array:
        """Expert ``e`` on its few rows x ``[n, n_embd]`` (n <= QMV_MAX_TOKENS) weighted by w
        ``[n, 1]``, with the native few-row kernel on its blocks → float32 ``[n, n_embd]``."""
        gate, up, down = self.w.gate_exps, self.w.up_exps, self.w.down_exps

        def one(bank: QTensor) -> QTensor:
            return QTensor(bank.raw[e], bank.ggml_type, bank.shape[1:])

        hmid = swiglu(qmv(x, one(gate)), qmv(x, one(up)), self.clamp)
        return qmv(hmid * w, one(down))

    def _native(self, ids: np.ndarray, counts: np.ndarray, xs: mx.array, ws: mx.array) -> list[mx.array]:
        """Experts ``ids`` applied with ``mx.gather_qmm`` to their rows ``xs`` ``[Σcounts, n_embd]``
        (grouped by expert, in ``ids`` order), weighted by ``ws`` ``[Σcounts, 1]``;
        returns float32 outputs ``[Σcounts, n_embd]`` in pieces, a batch of experts each."""
        gate, up, down = self.w.gate_exps, self.w.up_exps, self.w.down_exps
        n_ff = gate.shape[1]
        dt = compute_dtype()
        per_expert = gate.nbytes // gate.shape[0] + up.nbytes // up.shape[0] + down.nbytes // down.shape[0]
        batch = max(1, NATIVE_BATCH_BYTES // per_expert)
        ends = np.cumsum(counts)
        out = []
        for i in range(0, len(ids), batch):
            b_ids, b_counts = ids[i : i + batch], counts[i : i + batch]
            a, z = int(ends[i] - counts[i]), int(ends[i + len(b_ids) - 1])
            local = mx.array(np.repeat(np.arange(len(b_ids), dtype=np.int32), b_counts))
            x = xs[a:z].astype(dt)
            if gate.ggml_type == up.ggml_type:  # gate rows then up rows: one product
                gu = to_mlx(mx.concatenate([gate.expert_raw(b_ids), up.expert_raw(b_ids)], axis=1), gate.ggml_type)
                h = gu.gather_matmul(x, local).astype(mx.float32)
                hg, hu = h[:, :n_ff], h[:, n_ff:]
            else:
                hg = to_mlx(gate.expert_raw(b_ids), gate.ggml_type).gather_matmul(x, local).astype(mx.float32)
                hu = to_mlx(up.expert_raw(b_ids), up.ggml_type).gather_matmul(x, local).astype(mx.float32)
            hmid = (swiglu(hg, hu, self.clamp) * ws[a:z]).astype(dt)
            y = to_mlx(down.expert_raw(b_ids), down.ggml_type).gather_matmul(hmid, local).astype(mx.float32)
            mx.eval(y)
            out.append(y)
        return out

    def _dequantized(self, experts: np.ndarray, starts: np.ndarray, counts: np.ndarray, xs: mx.array,
                     ws: mx.array) -> list[mx.array]:
        """Experts dequantized a batch at a time; expert j's rows are ``xs[starts[j]:+counts[j]]``.
        Returns float32 ``[counts[j], n_embd]`` per expert."""
        dt = compute_dtype()
        _, n_ff, n_embd = self.w.gate_exps.shape
        per_expert = 3 * n_ff * n_embd * 4
        batch = max(1, self.expert_batch_bytes // per_expert)
        ys = []
        for i in range(0, len(experts), batch):
            ids = experts[i : i + batch]
            wgu = self._gate_up(ids).astype(dt)  # [E, 2·n_ff, n_embd]
            wd = self.w.down_exps.experts(ids).astype(dt)
            for j in range(len(ids)):
                a, n = int(starts[i + j]), int(counts[i + j])
                h = (xs[a : a + n].astype(dt) @ wgu[j].T).astype(mx.float32)  # [n, 2·n_ff]
                hmid = swiglu(h[:, :n_ff], h[:, n_ff:], self.clamp)
                ys.append(((hmid * ws[a : a + n]).astype(dt) @ wd[j].T).astype(mx.float32))
            mx.eval(ys)
        return ys

    def _gate_up(self, ids: np.ndarray) -> mx.array:
        """Gate rows then up rows of the given experts: float32 ``[len(ids), 2·n_ff, n_embd]``."""
        gate, up = self.w.gate_exps, self.w.up_exps
        if isinstance(gate, QTensor) and isinstance(up, QTensor) and gate.ggml_type == up.ggml_type:
            return stacked_experts([gate, up], ids)
        return mx.concatenate([gate.experts(ids), up.experts(ids)], axis=1)

    def __call__(self, g: mx.array, tokens: mx.array) -> mx.array:
        """g ``[T, n_embd]`` (ffn-normed), tokens ``[T]`` int32 → ``[T, n_embd]``."""
        sel, wt = self.route(g, tokens)
        return self.routed(g, sel, wt) + self.shared(g)
