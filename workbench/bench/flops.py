"""Floating-point operations of a ds4 prefill, counted from ``ModelArgs``.

A multiply-add is 2 FLOPs; element-wise work (norms, RoPE, softmax, SwiGLU, the Sinkhorn
iterations, the QAT rounding) is not counted, so the count is the matmul work the CPU
must do at least. Per token at position p (0-based), per layer L with ratio r:

* hyper-connections: two mixers ``hc_dim -> hc_mix``;
* attention projections: ``wq_a``, ``wq_b``, ``wkv``, the grouped ``wo_a`` and ``wo_b``;
* attention over the visible rows: QK and PV over ``min(p+1, n_swa)`` raw rows plus the
  compressed rows the query sees (``floor((p+1)/128)`` on ratio-128 layers; on ratio-4
  layers ``floor((p+1)/4)`` capped at ``idx_topk`` by the indexer): ``4·n_head·head_dim``
  per row;
* compressors: the value and gate projections (``coff·head_dim`` wide, coff 2 on
  ratio 4), and on ratio-4 layers the indexer's compressor (``2·idx_dim``), its query
  projection, head weights and, once more than ``idx_topk`` rows are visible, its scores
  over every visible row (``2·idx_heads·idx_dim`` per row);
* MoE: the router, the ``n_expert_used`` active routed experts and the shared experts,
  three ``n_embd x n_ff`` matrices each.

The output head (collapse + ``n_embd x n_vocab``) runs once per prefill call (logits of
the last token only), not per token.
"""

from __future__ import annotations

import numpy as np

from workbench.spec.args import ModelArgs


def dense_per_token(args: ModelArgs, layer: int) -> dict[str, float]:
    """FLOPs per token of one layer that do not depend on the position, by component."""
    a, r = args, args.ratio(layer)
    out = {
        "hyper_connections": 2 * (2 * a.hc_dim * a.hc_mix),
        "attention_projections": 2 * (a.n_embd * a.q_lora_rank + a.q_lora_rank * a.n_head * a.head_dim
                                      + a.n_embd * a.head_dim + a.n_head * a.head_dim * a.o_lora_rank
                                      + a.o_groups * a.o_lora_rank * a.n_embd),
        "compressors": 0.0,
        "indexer": 0.0,
        "moe": 2 * a.n_embd * a.n_expert + (a.n_expert_used + a.n_expert_shared) * 3 * 2 * a.n_embd * a.n_ff_exp,
    }
    if r:
        coff = 2 if r == 4 else 1
        out["compressors"] = 2 * 2 * a.n_embd * coff * a.head_dim
    if r == 4:
        out["compressors"] += 2 * 2 * a.n_embd * 2 * a.idx_dim
        out["indexer"] = 2 * (a.q_lora_rank * a.idx_heads * a.idx_dim + a.n_embd * a.idx_heads)
    return out


def visible_rows(args: ModelArgs, layer: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows attended, compressed rows visible) per query position of one layer."""
    r = args.ratio(layer)
    raw = np.minimum(positions + 1, args.n_swa)
    comp = (positions + 1) // r if r else np.zeros_like(positions)
    attended = raw + (np.minimum(comp, args.idx_topk) if r == 4 else comp)
    return attended, comp


def prefill_flops(args: ModelArgs, start: int, n_tokens: int) -> dict[str, float]:
    """FLOPs of one prefill call adding ``n_tokens`` tokens after ``start`` tokens, by
    component (keys of :func:`dense_per_token` plus ``attention`` and ``output_head``)."""
    pos = np.arange(start, start + n_tokens, dtype=np.int64)
    total: dict[str, float] = {"attention": 0.0}
    for L in range(args.n_layer):
        for k, v in dense_per_token(args, L).items():
            total[k] = total.get(k, 0.0) + v * n_tokens
        attended, comp = visible_rows(args, L, pos)
        total["attention"] += float(4 * args.n_head * args.head_dim * attended.sum())
        if args.ratio(L) == 4:
            scored = np.where(comp > args.idx_topk, comp, 0)
            total["indexer"] += float(2 * args.idx_heads * args.idx_dim * scored.sum())
    total["output_head"] = float(2 * args.hc_dim * args.n_hc + 2 * args.n_embd * args.n_vocab) if n_tokens else 0.0
    return total
