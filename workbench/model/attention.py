"""Attention of one layer: one shared K=V row per token, a 128-token raw window, the
layer's compressed rows, sinks, inverse RoPE and the grouped output projection
(ds4-architecture §2.5, §3.1).

A call processes a chunk of T consecutive tokens at once, given the layer's state before
the chunk, and returns the new state. Query t (absolute position p) sees raw rows of
positions ``p-n_swa+1 .. p`` and compressed rows ``c < floor((p+1)/r)`` (the indexer's
top-k among them on ratio-4 layers), exactly as if the tokens were fed one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from workbench.model.compressor import Compressor
from workbench.model.indexer import Indexer
from workbench.model.ops import Weight, grouped_linear, linear, rms_norm
from workbench.model.qat import fp8_e4m3_sim
from workbench.model.rope import RopeSpec
from workbench.state import LayerState, RowBuffer

# float32 elements of one query block's [heads, block, keys] score tensor
SCORE_BLOCK_ELEMS = 1 << 24
# queries per attention block: a block scores its own rows plus the n_swa before them
QUERY_BLOCK = 128


@dataclass
class AttentionWeights:
    """Logical ``[out, in]`` matrices (``Weight``) and float32 vectors of one layer."""

    wq_a: Weight  # [q_lora, n_embd]
    q_a_norm: mx.array  # [q_lora]
    wq_b: Weight  # [n_head·head_dim, q_lora]
    wkv: Weight  # [head_dim, n_embd]
    kv_norm: mx.array  # [head_dim]
    sinks: mx.array  # [n_head]
    wo_a: Weight  # [o_groups·o_lora, n_head·head_dim / o_groups]
    wo_b: Weight  # [n_embd, o_groups·o_lora]


class Attention:
    def __init__(self, n_head: int, head_dim: int, n_rot: int, n_swa: int, o_groups: int, eps: float,
                 weights: AttentionWeights, rope: RopeSpec, ratio: int = 0,
                 compressor: Compressor | None = None, indexer: Indexer | None = None) -> None:
        self.n_head, self.head_dim, self.n_nope, self.n_swa = n_head, head_dim, head_dim - n_rot, n_swa
        self.o_groups, self.eps, self.w, self.rope = o_groups, eps, weights, rope
        self.ratio, self.compressor, self.indexer = ratio, compressor, indexer

    def kv_row(self, h: mx.array, positions: np.ndarray) -> mx.array:
        """Raw K=V rows ``[T, head_dim]``: norm, RoPE, FP8 on the nope dims."""
        kv = self.rope(rms_norm(linear(h, self.w.wkv), self.w.kv_norm, self.eps), positions)
        return mx.concatenate([fp8_e4m3_sim(kv[:, : self.n_nope]), kv[:, self.n_nope :]], axis=1)

    def __call__(self, h: mx.array, p0: int, state: LayerState) -> tuple[mx.array, LayerState]:
        """h ``[T, n_embd]`` (attention-normed input) at positions p0.. → ``([T, n_embd], new state)``."""
        t = h.shape[0]
        pos = np.arange(p0, p0 + t)
        qn = rms_norm(linear(h, self.w.wq_a), self.w.q_a_norm, self.eps)
        q = linear(qn, self.w.wq_b).reshape(t, self.n_head, self.head_dim)
        q = self.rope(rms_norm(q, None, self.eps).transpose(1, 0, 2), pos)  # [H, T, Dh]

        raw = mx.concatenate([state.raw, self.kv_row(h, pos)])  # positions p0-n_prev .. p0+T-1
        new = replace(state, raw=raw[max(0, raw.shape[0] - self.n_swa) :])
        comp = allowed = None
        if self.compressor is not None:
            rows, new.comp_kv, new.comp_score = self.compressor(h, p0, state.comp_kv, state.comp_score)
            comp, new.comp_rows = RowBuffer.append(state.comp, state.comp_rows, rows)
            new.comp = comp
        if self.indexer is not None:
            rows, new.idx_kv, new.idx_score = self.indexer.compressor(h, p0, state.idx_kv, state.idx_score)
            new.idx, new.idx_rows = RowBuffer.append(state.idx, state.idx_rows, rows)
            allowed = self.indexer.visible(qn, h, pos, new.idx)

        o = self.attend(q, raw, p0, comp, allowed)  # [H, T, Dh]
        o = self.rope(o, pos, inverse=True)
        g = self.o_groups
        o = o.reshape(g, self.n_head // g, t, self.head_dim).transpose(0, 2, 1, 3).reshape(g, t, -1)
        return linear(grouped_linear(o, self.w.wo_a, g), self.w.wo_b), new

    def attend(self, q: mx.array, raw: mx.array, p0: int, comp: mx.array | None,
               allowed: mx.array | None) -> mx.array:
        """Softmax attention with sinks for queries q ``[H, T, Dh]`` at p0.. over the raw
        rows (``raw[j]`` at position ``p0 - n_prev + j``) and the compressed rows.
        ``allowed`` ``[T, n_comp]`` restricts compressed rows (indexer); None: causal only.
        A block of one query (decode) gathers the rows ``allowed`` keeps instead of masking
        the others, so its work is the indexer's top-k, not every compressed row."""
        heads, t, dh = q.shape
        n_prev = raw.shape[0] - t
        scale = 1.0 / math.sqrt(dh)
        n_comp_all = 0 if comp is None else comp.shape[0]
        block = max(1, min(t, QUERY_BLOCK, SCORE_BLOCK_ELEMS // (heads * (self.n_swa + QUERY_BLOCK + n_comp_all))))
        sink = self.w.sinks[:, None, None]
        outs = []
        for b in range(0, t, block):
            e = min(t, b + block)
            qpos = np.arange(p0 + b, p0 + e)
            j0 = max(0, n_prev + b - self.n_swa + 1)  # first raw row any query of the block sees
            rel = qpos[:, None] - np.arange(p0 - n_prev + j0, p0 + e)[None, :]
            mask = mx.array((rel >= 0) & (rel < self.n_swa))  # the raw window, this token included
            keys = raw[j0 : n_prev + e]
            if comp is not None:
                n_vis = (qpos + 1) // self.ratio  # rows whose window ended at or before the query
                nc = int(n_vis[-1])
                rows = comp[:nc]
                cmask = mx.array(np.arange(nc)[None, :] < n_vis[:, None])
                if allowed is not None and e - b == 1:  # one query (decode): only the indexer's rows, gathered
                    chosen = np.flatnonzero(np.asarray(allowed[b, :nc]))
                    rows, cmask = comp[mx.array(chosen.astype(np.int32))], mx.ones((1, chosen.size), mx.bool_)
                elif allowed is not None:
                    cmask = cmask & allowed[b:e, :nc]
                mask = mx.concatenate([mask, cmask], axis=1)
                keys = mx.concatenate([keys, rows])
            # the heads share the keys: one [H·B, Dh] @ [Dh, N] product, not H small ones
            s = (q[:, b:e].reshape(heads * (e - b), dh) @ keys.T).reshape(heads, e - b, -1)
            s = mx.where(mask, s * scale, -mx.inf)  # [H, B, N]
            s = mx.concatenate([mx.broadcast_to(sink, (heads, e - b, 1)), s], axis=-1)
            p = mx.softmax(s, axis=-1)[..., 1:]  # the sink takes probability mass, no value
            outs.append((p.reshape(heads * (e - b), -1) @ keys).reshape(heads, e - b, dh))
            if len(outs) > 1:
                mx.eval(outs[-1])
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
