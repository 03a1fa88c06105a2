"""The layout of a session state: which tensors each layer holds and their shapes at T tokens.

Per layer L with compression ratio r (0, 4 or 128), in ds4's terms and payload order:

* ``raw``       [min(T, n_swa), head_dim]   the raw sliding window, logical position order
                                            (positions T - n_raw .. T - 1)
* ``comp``      [floor(T / r), head_dim]    compressed KV rows (r > 0)
* ``comp_kv``   [coff*r, coff*head_dim]     compressor frontier values, coff = 2 if r == 4 else 1
* ``comp_score``[coff*r, coff*head_dim]     compressor frontier scores (empty slot: -1e30)
* ``idx``       [floor(T / 4), idx_dim]     indexer rows (r == 4 only)
* ``idx_kv``    [8, 2*idx_dim]              indexer compressor frontier values (r == 4)
* ``idx_score`` [8, 2*idx_dim]              indexer compressor frontier scores (r == 4)

:meth:`StateLayout.layer_shapes` is the one function giving these; the state's shape
checks and empty state, the byte counts per layer and kind, the DSV4 payload size, its
reader and its breakdown all derive from it. Every tensor is float32 (:data:`F32` bytes
per element) on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.spec.args import ModelArgs, ds4_ratio_schedule

F32 = 4  # bytes per stored element: every KV tensor is float32 on disk

LAYER_FIELDS = ("raw", "comp", "comp_kv", "comp_score", "idx", "idx_kv", "idx_score")  # payload order
SCORE_FIELDS = frozenset({"comp_score", "idx_score"})  # frontier scores (an empty slot is -1e30)

# payload fields grouped for the per-layer byte breakdown
KIND_OF = {
    "raw": "raw window",
    "comp": "compressed",
    "comp_kv": "frontiers",
    "comp_score": "frontiers",
    "idx": "indexer",
    "idx_kv": "frontiers",
    "idx_score": "frontiers",
}
IDX_FRONTIER_ROWS = 8  # the indexer compressor runs at ratio 4 with coff 2: 2 x 4 slots

TensorShapes = list[tuple[str, tuple[int, int]]]


@dataclass(frozen=True)
class StateLayout:
    """Shapes of a session state, derived from the model's config (or ds4's defaults)."""

    n_layer: int
    head_dim: int
    idx_dim: int
    n_vocab: int
    n_swa: int
    ratios: tuple[int, ...]

    @classmethod
    def from_args(cls, args: ModelArgs) -> "StateLayout":
        return cls(args.n_layer, args.head_dim, args.idx_dim, args.n_vocab, args.n_swa,
                   tuple(args.compress_ratios[: args.n_layer]))

    @classmethod
    def ds4(cls, n_layer: int = 43, head_dim: int = 512, idx_dim: int = 128,
            n_vocab: int = 129280, n_swa: int = 128) -> "StateLayout":
        """ds4-server's layout (its layer schedule is fixed, not stored in .kv files)."""
        return cls(n_layer, head_dim, idx_dim, n_vocab, n_swa, ds4_ratio_schedule(n_layer))

    @staticmethod
    def coff(ratio: int) -> int:
        return 2 if ratio == 4 else 1

    def comp_frontier_shape(self, layer: int) -> tuple[int, int]:
        """[coff*r, coff*head_dim]: the attention compressor's frontier (r > 0)."""
        r = self.ratios[layer]
        c = self.coff(r)
        return (c * r, c * self.head_dim)

    def idx_frontier_shape(self) -> tuple[int, int]:
        """[8, 2*idx_dim]: the indexer compressor's frontier (ratio-4 layers)."""
        return (IDX_FRONTIER_ROWS, 2 * self.idx_dim)

    def n_raw(self, n_tokens: int) -> int:
        return min(n_tokens, self.n_swa)

    def n_comp(self, layer: int, n_tokens: int) -> int:
        r = self.ratios[layer]
        return n_tokens // r if r else 0

    def n_idx(self, layer: int, n_tokens: int) -> int:
        return n_tokens // 4 if self.ratios[layer] == 4 else 0

    def layer_shapes(self, layer: int, n_tokens: int, n_raw: int | None = None) -> TensorShapes:
        """(field, [rows, cols]) of layer ``layer``'s tensors after ``n_tokens`` tokens, in
        payload order; ``n_raw`` overrides the raw window rows (a payload's raw_live)."""
        r = self.ratios[layer]
        out = [("raw", (self.n_raw(n_tokens) if n_raw is None else n_raw, self.head_dim))]
        if r:
            front = self.comp_frontier_shape(layer)
            out += [("comp", (n_tokens // r, self.head_dim)), ("comp_kv", front), ("comp_score", front)]
        if r == 4:
            front = self.idx_frontier_shape()
            out += [("idx", (n_tokens // 4, self.idx_dim)), ("idx_kv", front), ("idx_score", front)]
        return out

    def layer_kind_bytes(self, layer: int, n_tokens: int, n_raw: int | None = None) -> dict[str, int]:
        """Layer ``layer``'s float32 bytes by kind (raw window, compressed, frontiers, indexer)."""
        per: dict[str, int] = {}
        for name, (rows, cols) in self.layer_shapes(layer, n_tokens, n_raw):
            per[KIND_OF[name]] = per.get(KIND_OF[name], 0) + rows * cols * F32
        return per

    def layer_bytes_at(self, n_tokens: int, n_raw: int | None = None) -> list[dict]:
        """Per-layer, per-kind float32 KV bytes a state of ``n_tokens`` holds (no state
        needed); rows: layer, ratio, kind, bytes."""
        return [{"layer": L, "ratio": r, "kind": kind, "bytes": b}
                for L, r in enumerate(self.ratios) for kind, b in self.layer_kind_bytes(L, n_tokens, n_raw).items()]

    def kv_bytes(self, n_tokens: int, n_raw: int | None = None) -> int:
        """Total float32 bytes of every layer's tensors after ``n_tokens`` tokens."""
        return sum(rows * cols * F32 for L in range(self.n_layer)
                   for _, (rows, cols) in self.layer_shapes(L, n_tokens, n_raw))
