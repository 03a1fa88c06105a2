"""The KV compressor: pools every ``ratio`` tokens of a layer into one row (ds4 §2.5.1).

Per token p (normed sublayer input h): ``kv_p = Wkv @ h`` and ``sc_p = Wg @ h +
ape[p mod r]``, both ``coff·d`` wide (coff = 2 for ratio 4, else 1). When token p
completes a window (``(p+1) % r == 0``) the window is pooled per channel with a softmax
over its tokens' scores:

* ratio 128: the window's 128 tokens;
* ratio 4: 8 candidates — the previous window's 4 tokens through the first half of the
  projection and the current window's 4 through the second half (none for the first
  window).

The pooled vector gets RMSNorm with weight, RoPE on its tail at the window's *first*
position, then the QAT step of its kind: FP8 on the nope dims (attention rows) or
Hadamard + FP4 on the whole row (indexer rows).

The frontier (pending tokens between calls) is held in ds4's slot layout, see
:mod:`workbench.state`: ratio 128 keeps token p in slot ``p % 128``; ratio 4 keeps the
previous complete window in slots 0..3 and the current partial one in ``4 + p % 4``.
Slots never written are empty (kv 0, score ``EMPTY_SCORE``); as in ds4, a slot keeps its
last token until a later token of the same phase overwrites it, and only the slots of
the current window's tokens (plus slots 0..3 for ratio 4) are ever read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import mlx.core as mx
import numpy as np

from workbench.model.ops import linear, rms_norm
from workbench.model.qat import fp4_e2m1_sim, fp8_e4m3_sim, hadamard
from workbench.model.rope import RopeSpec


@dataclass
class CompressorWeights:
    """``wkv``, ``wgate`` ``[coff·d, n_embd]``; ``ape`` ``[r, coff·d]``; ``norm`` ``[d]`` (float32)."""

    wkv: mx.array
    wgate: mx.array
    ape: mx.array
    norm: mx.array


class Compressor:
    """One compressor of a layer: ``kind`` "attn" (head_dim rows, FP8 on the first
    ``n_nope`` dims) or "index" (idx_dim rows, Hadamard + FP4)."""

    def __init__(self, ratio: int, width: int, weights: CompressorWeights, rope: RopeSpec, eps: float,
                 kind: Literal["attn", "index"], n_nope: int = 0) -> None:
        self.ratio, self.width, self.w, self.rope, self.eps = ratio, width, weights, rope, eps
        self.kind, self.n_nope = kind, n_nope
        self.coff = 2 if ratio == 4 else 1

    @property
    def frontier_shape(self) -> tuple[int, int]:
        return (self.coff * self.ratio, self.coff * self.width)

    def project(self, h: mx.array, p0: int) -> tuple[mx.array, mx.array]:
        """Per-token values and scores ``[T, coff·d]`` for positions p0.. (APE by phase)."""
        phase = mx.array((np.arange(p0, p0 + h.shape[0]) % self.ratio).astype(np.int32))
        kv = linear(h, self.w.wkv)
        sc = linear(h, self.w.wgate) + self.w.ape[phase]
        return kv, sc

    def __call__(self, h: mx.array, p0: int, front_kv: mx.array, front_score: mx.array
                 ) -> tuple[mx.array, mx.array, mx.array]:
        """Feed tokens p0..p0+T-1 (h ``[T, n_embd]``) after the frontier.

        Returns ``(rows [n_new, d], kv, score)``: the rows of the windows completed in
        this call, in order (row c covers tokens ``[c·r, c·r + r - 1]``), and the new
        frontier.
        """
        r, d = self.ratio, self.width
        kv, sc = self.project(h, p0)
        k0 = p0 % r  # tokens of the current window already in the frontier
        lo = r if r == 4 else 0  # first slot of the current window
        seq_kv = mx.concatenate([front_kv[lo : lo + k0], kv])
        seq_sc = mx.concatenate([front_score[lo : lo + k0], sc])
        n_new = seq_kv.shape[0] // r
        done = n_new * r
        w = seq_kv.shape[1]
        cur_kv = seq_kv[:done].reshape(n_new, r, w)
        cur_sc = seq_sc[:done].reshape(n_new, r, w)
        new_kv, new_sc = self.advance_frontier(front_kv, front_score, kv, sc, p0, cur_kv, cur_sc)
        if n_new == 0:
            return mx.zeros((0, d), mx.float32), new_kv, new_sc
        if r == 4:
            prev_kv = mx.concatenate([front_kv[None, :4], cur_kv[:-1]])
            prev_sc = mx.concatenate([front_score[None, :4], cur_sc[:-1]])
            cand_kv = mx.concatenate([prev_kv[..., :d], cur_kv[..., d:]], axis=1)  # [n_new, 8, d]
            cand_sc = mx.concatenate([prev_sc[..., :d], cur_sc[..., d:]], axis=1)
        else:
            cand_kv, cand_sc = cur_kv, cur_sc
        pooled = (mx.softmax(cand_sc, axis=1) * cand_kv).sum(axis=1)  # [n_new, d]
        first = np.arange(n_new) * r + (p0 - k0)  # each window's first position
        return self.finish(pooled, first), new_kv, new_sc

    def advance_frontier(self, front_kv: mx.array, front_score: mx.array, kv: mx.array, sc: mx.array,
                         p0: int, windows_kv: mx.array, windows_sc: mx.array) -> tuple[mx.array, mx.array]:
        """The frontier after tokens p0.. (values kv, scores sc ``[T, coff·d]``), as ds4's
        token-by-token updates leave it: each token overwrites its slot and, for ratio 4,
        a completed window (the last of ``windows_*`` ``[n_new, 4, 2d]``) moves to slots
        0..3. Slots not overwritten keep their old content."""
        r, t = self.ratio, kv.shape[0]
        lo = r if r == 4 else 0
        m = min(t, r)  # only the last r tokens can still own a slot
        src = np.arange(self.frontier_shape[0])
        src[lo + (np.arange(p0 + t - m, p0 + t) % r)] = self.frontier_shape[0] + np.arange(t - m, t)
        idx = mx.array(src.astype(np.int32))
        new_kv = mx.concatenate([front_kv, kv])[idx]
        new_sc = mx.concatenate([front_score, sc])[idx]
        if r == 4 and windows_kv.shape[0]:
            new_kv = mx.concatenate([windows_kv[-1], new_kv[4:]])
            new_sc = mx.concatenate([windows_sc[-1], new_sc[4:]])
        return new_kv, new_sc

    def finish(self, pooled: mx.array, first: np.ndarray) -> mx.array:
        """Norm, RoPE at the windows' first positions, then the kind's QAT step."""
        row = self.rope(rms_norm(pooled, self.w.norm, self.eps), first)
        if self.kind == "index":
            return fp4_e2m1_sim(hadamard(row))
        return mx.concatenate([fp8_e4m3_sim(row[:, : self.n_nope]), row[:, self.n_nope :]], axis=1)
