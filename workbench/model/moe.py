"""The mixture-of-experts FFN: a router, routed experts and one shared expert (§2.6).

Router: ``prob = sqrt(softplus(Wr @ g))``. Hash layers (the first ``n_hash_layer``) take
the experts from ``tid2eid[token]``; the others take the top-k of ``prob + exp_probs_b``
(the bias only chooses). The chosen weights are the unbiased probs renormalised (sum
clamped below at 6.103515625e-5) times ``expert_weights_scale``. Each expert is a SwiGLU
with an asymmetric clamp (gate ≤ c, up in [-c, c]); the shared expert uses it too.

Routed experts stay quantized; a chunk dequantizes each expert its tokens use exactly once,
a batch of experts at a time (``expert_batch_bytes`` of float32 weights), and runs float32
BLAS matmuls over each expert's tokens. When gate and up are ``QTensor`` s of one type,
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

from workbench.gguf.quants import QTensor, stacked_experts
from workbench.model.ops import Weight, compute_dtype, linear, topk_indices

WEIGHT_SUM_FLOOR = 6.103515625e-5
# float32 bytes of dequantized expert weights materialised at once
EXPERT_BATCH_BYTES = 384 << 20


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
                 weights: MoEWeights, normalize: bool = True, expert_batch_bytes: int = EXPERT_BATCH_BYTES) -> None:
        self.k, self.hash_routed, self.scale, self.clamp = n_expert_used, hash_routed, weights_scale, clamp
        self.w, self.normalize, self.expert_batch_bytes = weights, normalize, expert_batch_bytes

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

    def routed(self, g: mx.array, sel: mx.array, wt: mx.array) -> mx.array:
        """Σ_k wt·expert_k(g) ``[T, n_embd]``, touching only the experts in ``sel``."""
        t, k = sel.shape
        flat = np.array(sel).reshape(-1)
        order = np.argsort(flat, kind="stable")
        experts, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
        tok = order // k  # token of each (sorted) assignment
        xs = g[mx.array(tok.astype(np.int32))]  # [T·k, n_embd] grouped by expert
        ws = wt.reshape(-1)[mx.array(order.astype(np.int32))][:, None]
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
        y = mx.concatenate(ys)
        return mx.zeros((t, g.shape[1]), mx.float32).at[mx.array(tok.astype(np.int32))].add(y)

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
