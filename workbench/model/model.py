"""DeepSeek V4 Flash: embedding into hyper-connection streams, the layers, the output head.

One forward call runs a chunk of consecutive tokens through every layer (layer-major:
all of the chunk's tokens through one layer, then the next), extending each layer's
state, and returns the next-token logits after the chunk's last token
(ds4-architecture §2, §3).

    X = [embed(tok)] * n_hc
    for each layer:
        y, post, C = hc_pre(X, hc_attn);   a = Attention(RMSw(y, attn_norm))
        X1 = hc_post(a, X, post, C)
        y2, post2, C2 = hc_pre(X1, hc_ffn); f = MoE(RMSw(y2, ffn_norm), tok)
        X = hc_post(f, X1, post2, C2)
    logits = output @ RMSw(hc_collapse(X), output_norm)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from workbench.model.attention import Attention
from workbench.spec.args import ModelArgs
from workbench.model.hyperconn import hc_collapse, hc_post, hc_pre
from workbench.model.moe import MoE
from workbench.model.ops import Weight, linear, rms_norm
from workbench.state import LayerState


@dataclass
class HCWeights:
    """One hyper-connection mixer: ``fn`` ``[mix, n_hc·n_embd]``, ``scale`` ``[3]``, ``base`` ``[mix]``."""

    fn: mx.array
    scale: mx.array
    base: mx.array


class Block:
    """One transformer layer with its two hyper-connection mixers."""

    def __init__(self, args: ModelArgs, hc_attn: HCWeights, attn_norm: mx.array, attention: Attention,
                 hc_ffn: HCWeights, ffn_norm: mx.array, moe: MoE) -> None:
        self.args = args
        self.hc_attn, self.attn_norm, self.attention = hc_attn, attn_norm, attention
        self.hc_ffn, self.ffn_norm, self.moe = hc_ffn, ffn_norm, moe

    def _pre(self, x: mx.array, w: HCWeights) -> tuple[mx.array, mx.array, mx.array]:
        a = self.args
        return hc_pre(x, w.fn, w.scale, w.base, a.sinkhorn_iters, a.hc_eps, a.rms_eps)

    def __call__(self, x: mx.array, tokens: mx.array, p0: int, state: LayerState) -> tuple[mx.array, LayerState]:
        """x ``[T, n_hc, n_embd]`` streams of tokens ``[T]`` at positions p0.. → new streams, state."""
        eps = self.args.rms_eps
        y, post, comb = self._pre(x, self.hc_attn)
        a, state = self.attention(rms_norm(y, self.attn_norm, eps), p0, state)
        x1 = hc_post(a, x, post, comb)
        y2, post2, comb2 = self._pre(x1, self.hc_ffn)
        f = self.moe(rms_norm(y2, self.ffn_norm, eps), tokens)
        return hc_post(f, x1, post2, comb2), state


class Model:
    """The network, or a pipeline rank's part of it. ``embedding`` is ``[n_vocab, n_embd]``
    (a NumPy float16 view of the GGUF, read row by row, or an MLX array); ``head`` is
    ``[n_vocab, n_embd]``. A part holds a range of blocks; its embedding is None unless it
    starts at layer 0, its head (and ``out_hc``, ``out_norm``) None unless it ends at the last."""

    def __init__(self, args: ModelArgs, embedding: np.ndarray | mx.array | None, blocks: list[Block],
                 out_hc: HCWeights | None, out_norm: mx.array | None, head: Weight | None) -> None:
        self.args, self.embedding, self.blocks = args, embedding, blocks
        self.out_hc, self.out_norm, self.head = out_hc, out_norm, head

    def embed(self, tokens: list[int]) -> mx.array:
        """Streams ``[T, n_hc, n_embd]``: every stream starts as the token's embedding."""
        ids = np.asarray(tokens, dtype=np.int64)
        if isinstance(self.embedding, np.ndarray):
            e = mx.array(np.asarray(self.embedding[ids], dtype=np.float32))
        else:
            e = self.embedding[mx.array(ids.astype(np.int32))].astype(mx.float32)
        return mx.broadcast_to(e[:, None, :], (e.shape[0], self.args.n_hc, e.shape[1]))

    def logits(self, x: mx.array) -> mx.array:
        """Output head on streams ``[T, n_hc, n_embd]`` → ``[T, n_vocab]`` float32."""
        a, w = self.args, self.out_hc
        y = hc_collapse(x, w.fn, w.scale, w.base, a.hc_eps, a.rms_eps)
        return linear(rms_norm(y, self.out_norm, a.rms_eps), self.head)

    def run_layers(self, x: mx.array, tokens: list[int], p0: int, states: list[LayerState],
                   on_layer: Callable[[int], None] | None = None) -> tuple[mx.array, list[LayerState]]:
        """Streams x ``[T, n_hc, n_embd]`` of tokens at positions p0.. through this model's
        blocks (all of them, or a pipeline rank's range), each evaluated before the next;
        returns the output streams and the blocks' new states. ``on_layer(i)`` after block i."""
        tok = mx.array(np.asarray(tokens, dtype=np.int32))
        new_states = []
        for i, block in enumerate(self.blocks):
            x, st = block(x, tok, p0, states[i])
            mx.eval(x, *(v for _, v in st.tensors()))
            new_states.append(st)
            if on_layer is not None:
                on_layer(i)
        return x, new_states

    def __call__(self, tokens: list[int], p0: int, states: list[LayerState],
                 on_layer: Callable[[int], None] | None = None,
                 logits: bool = True) -> tuple[mx.array | None, list[LayerState]]:
        """Run tokens at positions p0.. through every layer, extending ``states``.

        Returns the logits ``[n_vocab]`` after the last token (None when ``logits`` is
        False, e.g. for a prefill chunk that is not the last) and the new per-layer states
        (the inputs are not modified). ``on_layer(L)`` is called after layer L.
        """
        x, new_states = self.run_layers(self.embed(tokens), tokens, p0, states, on_layer)
        if not logits:
            return None, new_states
        out = self.logits(x[-1:])[0]
        mx.eval(out)
        return out, new_states
