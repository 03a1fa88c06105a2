"""The lightning indexer of ratio-4 layers: which compressed rows each query may see
(ds4-architecture §2.5.2).

Only when a query has more than ``top_k`` visible compressed rows does it score them:
``score[c] = Σ_h wI[h]·relu(qI[h]·KI[c])`` with ``qI`` from the q latent (after its norm),
RoPE on its tail, Hadamard + FP4; ``wI = indexer.proj @ h / sqrt(heads·dim)``; ``KI``
the indexer rows (made by the layer's second compressor, already Hadamard + FP4). The
``top_k`` best visible rows are kept, ties to the lower index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from workbench.model.compressor import Compressor
from workbench.model.ops import linear, topk_mask
from workbench.model.qat import fp4_e2m1_sim, hadamard
from workbench.model.rope import RopeSpec

# float32 elements of one query block's [heads, block, rows] score tensor
SCORE_BLOCK_ELEMS = 1 << 24


@dataclass
class IndexerWeights:
    """``wq_b`` ``[heads·dim, q_lora]``, ``proj`` ``[heads, n_embd]`` (float32)."""

    wq_b: mx.array
    proj: mx.array


class Indexer:
    def __init__(self, heads: int, dim: int, top_k: int, ratio: int, weights: IndexerWeights,
                 compressor: Compressor, rope: RopeSpec) -> None:
        self.heads, self.dim, self.top_k, self.ratio = heads, dim, top_k, ratio
        self.w, self.compressor, self.rope = weights, compressor, rope

    def n_visible(self, positions: np.ndarray) -> np.ndarray:
        """Compressed rows visible to each query position: ``floor((p+1)/r)``."""
        return (positions + 1) // self.ratio

    def queries(self, qn: mx.array, h: mx.array, positions: np.ndarray) -> tuple[mx.array, mx.array]:
        """``qI`` ``[heads, T, dim]`` (RoPE, Hadamard, FP4) and head weights ``wI`` ``[T, heads]``."""
        t = qn.shape[0]
        q = linear(qn, self.w.wq_b).reshape(t, self.heads, self.dim).transpose(1, 0, 2)
        q = fp4_e2m1_sim(hadamard(self.rope(q, positions)))
        wi = linear(h, self.w.proj) / math.sqrt(self.heads * self.dim)
        return q, wi

    def scores(self, q: mx.array, wi: mx.array, rows: mx.array) -> mx.array:
        """``score[t, c] = Σ_h wI[t, h]·relu(qI[h, t]·KI[c])`` → ``[T, N]``."""
        s = mx.maximum(q @ rows.T, 0.0)  # [heads, T, N]
        return (wi.T[:, :, None] * s).sum(axis=0)

    def visible(self, qn: mx.array, h: mx.array, positions: np.ndarray, rows: mx.array) -> mx.array | None:
        """Boolean ``[T, N]`` mask of the compressed rows each query may attend to, or
        None when no query has more than ``top_k`` visible rows (then causality alone
        decides). rows: all ``N`` indexer rows, including those completed in this chunk."""
        n_vis = self.n_visible(positions)
        if int(n_vis.max()) <= self.top_k:
            return None
        q, wi = self.queries(qn, h, positions)
        n = rows.shape[0]
        causal = mx.arange(n)[None, :] < mx.array(n_vis.astype(np.int32))[:, None]  # [T, N]
        block = max(1, SCORE_BLOCK_ELEMS // (self.heads * max(n, 1)))
        masks = []
        for b in range(0, qn.shape[0], block):
            e = min(qn.shape[0], b + block)
            s = mx.where(causal[b:e], self.scores(q[:, b:e], wi[b:e], rows), -mx.inf)
            few = mx.array(n_vis[b:e] <= self.top_k)[:, None]
            masks.append(causal[b:e] & (few | topk_mask(s, self.top_k)))
            mx.eval(masks[-1])
        return mx.concatenate(masks)
