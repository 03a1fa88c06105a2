"""An independent float64 NumPy reference of DeepSeek V4 Flash as ds4 computes it.

Written plainly from ``shared/reference/ds4-architecture.md`` §2 (forward pass) and §3
(visibility rule, decode step): one token at a time, loops over heads, channels, windows
and experts where the spec describes them that way, float64 everywhere. It shares no code
with the workbench's reader, dequantizers or model: weights come from the ``gguf`` PyPI
package (``GGUFReader`` + ``gguf.quants.dequantize``) and every hyperparameter from the
file's ``deepseek4.*`` metadata. Each tensor is decoded by its own ggml type, so routed
experts may differ from layer to layer (the q2-q4 file) and be of any type gguf-py decodes
(IQ2_XXS, Q2_K, Q4_K, Q8_0, MXFP4, ...); tensors are found by name, whatever the file order.

Left out on purpose (ds4 implementation details, §2.9): float16 rounding of cached rows and
int8 activation quantization. Kept (part of the model graph): FP8-E4M3 simulation of KV
nope dims and Hadamard + FP4-E2M1 simulation of indexer vectors, built here from the code
tables rather than from a library.

Usage::

    ref = RefModel("tiny.gguf")
    logits = ref.feed(tokens)        # [n_vocab] float64 after the last token
    ref.raw[L], ref.comp[L], ref.idx[L]   # per-layer cached rows (lists of float64 rows)
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from workbench.errors import WorkbenchError

PREFIX = "deepseek4."
ROUTER_WEIGHT_FLOOR = 6.103515625e-5  # ds4's floor on the sum of the chosen experts' probs (§2.6)
FP8_AMAX_FLOOR = 1e-4  # §2.5
FP4_AMAX_FLOOR = 7.052966104933725e-38  # §2.5.2
EMPTY_SCORE = -1e30  # score of an empty compressor frontier slot (§2.5.1)


class ReferenceError(WorkbenchError):
    """The GGUF file lacks something the reference needs."""


# (kind, layer, index, exact row, rounded row) -> row to cache; see RefModel.row_hook
RowHook = Callable[[str, int, int, np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------
# Low-precision grids, built from their code tables
# ---------------------------------------------------------------------------------------

def e4m3_code_value(code: int) -> float:
    """Value of the non-negative E4M3FN code ``code`` (0..126), per §2.5's table definition."""
    exponent, mantissa = code >> 3, code & 7
    if exponent == 0:
        return mantissa * 2.0 ** -9
    return (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)


E4M3_GRID = np.array([e4m3_code_value(c) for c in range(127)], dtype=np.float64)  # max 448
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)  # codes 0..7


def round_to_grid(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Round each element of ``x`` to the nearest ±grid value, ties to the even code index.

    ``grid`` holds the non-negative values of codes 0..n-1 in increasing order; |x| must not
    exceed ``grid[-1]`` (callers clamp first). The sign is kept.
    """
    out = np.empty_like(x, dtype=np.float64)
    flat_in, flat_out = np.asarray(x, dtype=np.float64).reshape(-1), out.reshape(-1)
    grid = grid.tolist()
    for k, v in enumerate(flat_in.tolist()):
        a = abs(v)
        hi = bisect.bisect_left(grid, a)  # grid[hi-1] < a <= grid[hi]
        if hi == 0 or grid[hi] == a:
            code = hi
        else:
            lo = hi - 1
            below, above = a - grid[lo], grid[hi] - a
            if below < above:
                code = lo
            elif above < below:
                code = hi
            else:
                code = lo if lo % 2 == 0 else hi
        flat_out[k] = math.copysign(grid[code], v)
    return out


def _pow2_scale(amax: float, top: float) -> float:
    """The power-of-two block scale ``2^ceil(log2(amax / top))``."""
    return 2.0 ** math.ceil(math.log2(amax / top))


def fp8_e4m3_sim(x: np.ndarray, block: int = 64) -> np.ndarray:
    """FP8-E4M3FN simulation over the last axis in blocks of ``block`` (§2.5).

    Per block: amax = max(|x|) floored at 1e-4, s = 2^ceil(log2(amax/448)),
    x = e4m3_round(clamp(x/s, -448, 448)) * s. Shape preserved; last axis % block == 0.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    top = E4M3_GRID[-1]
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        for b0 in range(0, row.shape[0], block):
            blk = row[b0:b0 + block]
            s = _pow2_scale(max(float(np.max(np.abs(blk))), FP8_AMAX_FLOOR), top)
            out[idx][b0:b0 + block] = round_to_grid(np.clip(blk / s, -top, top), E4M3_GRID) * s
    return out


def fp4_e2m1_sim(x: np.ndarray, block: int = 32) -> np.ndarray:
    """FP4-E2M1 simulation over the last axis in blocks of ``block`` (§2.5.2).

    Per block: amax floored at 7.052966104933725e-38, s = 2^ceil(log2(amax/6)),
    x = e2m1_round(clamp(x/s, -6, 6)) * s. Shape preserved; last axis % block == 0.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    top = E2M1_GRID[-1]
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        for b0 in range(0, row.shape[0], block):
            blk = row[b0:b0 + block]
            s = _pow2_scale(max(float(np.max(np.abs(blk))), FP4_AMAX_FLOOR), top)
            out[idx][b0:b0 + block] = round_to_grid(np.clip(blk / s, -top, top), E2M1_GRID) * s
    return out


def hadamard_matrix(n: int = 128) -> np.ndarray:
    """Natural-order Walsh-Hadamard matrix H[i, j] = (-1)^popcount(i & j) / sqrt(n), [n, n]."""
    h = np.empty((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(n):
            h[i, j] = -1.0 if bin(i & j).count("1") % 2 else 1.0
    return h / math.sqrt(n)


_HADAMARD: dict[int, np.ndarray] = {}


def hadamard(x: np.ndarray) -> np.ndarray:
    """H @ v for every vector v along the last axis (length a power of two, 128 in ds4)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    if n not in _HADAMARD:
        _HADAMARD[n] = hadamard_matrix(n)
    return x @ _HADAMARD[n].T


# ---------------------------------------------------------------------------------------
# Norms, hyper-connections, RoPE, activations
# ---------------------------------------------------------------------------------------

def rms(x: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x²) + eps) over one vector (no weight)."""
    return x / math.sqrt(float(np.mean(x * x)) + eps)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def sinkhorn(a: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """§2.2: row softmax + eps, column-normalise, then (iters-1) × (row, column) normalising.

    a: [n_hc, n_hc] logits, a[src][dst]. Returns C [n_hc, n_hc], close to doubly stochastic.
    """
    n = a.shape[0]
    c = np.empty((n, n), dtype=np.float64)
    for row in range(n):
        e = np.exp(a[row] - np.max(a[row]))
        c[row] = e / np.sum(e) + eps
    c = c / (c.sum(axis=0, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(axis=1, keepdims=True) + eps)
        c = c / (c.sum(axis=0, keepdims=True) + eps)
    return c


def hc_pre(x: np.ndarray, fn: np.ndarray, scale: np.ndarray, base: np.ndarray,
           iters: int, eps: float, norm_eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§2.2 for one token: reduce n_hc streams to one sublayer input.

    x: [n_hc, D] streams; fn: [2n+n², n·D]; scale: [3]; base: [2n+n²].
    Returns y [D], post [n_hc] (gains in (0, 2)), C [n_hc, n_hc] with C[src][dst].
    """
    n = x.shape[0]
    m = fn @ rms(x.reshape(-1), norm_eps)  # stream-major flattening
    pre = sigmoid(m[0:n] * scale[0] + base[0:n]) + eps
    post = 2.0 * sigmoid(m[n:2 * n] * scale[1] + base[n:2 * n])
    a = (m[2 * n:] * scale[2] + base[2 * n:]).reshape(n, n)
    c = sinkhorn(a, iters, eps)
    y = np.zeros(x.shape[1], dtype=np.float64)
    for h in range(n):
        y += pre[h] * x[h]
    return y, post, c


def hc_post(f: np.ndarray, x_res: np.ndarray, post: np.ndarray, c: np.ndarray) -> np.ndarray:
    """§2.3: X_new[b] = post[b]·f + Σ_a C[a][b]·X_res[a]. f [D], x_res [n_hc, D] -> [n_hc, D]."""
    n = x_res.shape[0]
    out = np.empty_like(x_res, dtype=np.float64)
    for b in range(n):
        acc = post[b] * f
        for a in range(n):
            acc = acc + c[a][b] * x_res[a]
        out[b] = acc
    return out


@dataclass(frozen=True)
class Yarn:
    """YaRN frequency-blend parameters (§2.5); no magnitude scaling anywhere."""

    factor: float
    orig_ctx: int
    beta_fast: float
    beta_slow: float


def rope_angles(p: float, n_rot: int, base: float, yarn: Yarn | None) -> np.ndarray:
    """θ_i for the n_rot/2 interleaved pairs at position p (§2.5 RoPE)."""
    half = n_rot // 2
    theta = np.empty(half, dtype=np.float64)
    if yarn is not None:
        def corr(beta: float) -> float:
            return n_rot * math.log(yarn.orig_ctx / (2.0 * math.pi * beta)) / (2.0 * math.log(base))
        low = max(0.0, math.floor(corr(yarn.beta_fast)))
        high = min(n_rot - 1.0, math.ceil(corr(yarn.beta_slow)))
    for i in range(half):
        omega = base ** (-i / half)
        if yarn is None:
            theta[i] = p * omega
        else:
            ramp = 1.0 - min(1.0, max(0.0, (i - low) / max(0.001, high - low)))
            theta[i] = p * omega * (ramp + (1.0 - ramp) / yarn.factor)
    return theta


@lru_cache(maxsize=1 << 16)
def _cos_sin(p: float, n_rot: int, base: float, yarn: Yarn | None) -> tuple[tuple[float, float], ...]:
    """(cos θ_i, sin θ_i) per pair, memoised: every layer and row kind reuses a position."""
    return tuple((math.cos(t), math.sin(t)) for t in rope_angles(p, n_rot, base, yarn))


def rope_tail(v: np.ndarray, p: float, n_rot: int, base: float, yarn: Yarn | None,
              inverse: bool = False) -> np.ndarray:
    """Rotate the last n_rot dims of the vector v in adjacent pairs (2i, 2i+1) by θ_i(p).

    ``inverse`` rotates by -θ (sin -> -sin). Returns a new [len(v)] array.
    """
    out = np.array(v, dtype=np.float64)
    start = out.shape[0] - n_rot
    cos_sin = _cos_sin(p, n_rot, base, yarn)
    for i in range(n_rot // 2):
        cos, sin = cos_sin[i]
        if inverse:
            sin = -sin
        v0, v1 = out[start + 2 * i], out[start + 2 * i + 1]
        out[start + 2 * i] = v0 * cos - v1 * sin
        out[start + 2 * i + 1] = v0 * sin + v1 * cos
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def softplus(x: float) -> float:
    """ds4's softplus: x above 20, e^x below -20, else log1p(e^x)."""
    if x > 20.0:
        return x
    if x < -20.0:
        return math.exp(x)
    return math.log1p(math.exp(x))


def clamped_swiglu(gate: np.ndarray, up: np.ndarray, clamp: float) -> np.ndarray:
    """silu(min(gate, clamp)) * clip(up, -clamp, clamp) (§2.6, asymmetric clamp)."""
    return silu(np.minimum(gate, clamp)) * np.clip(up, -clamp, clamp)


def top_indices(score: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest scores, ties going to the lower index, in that rank order."""
    return sorted(range(len(score)), key=lambda c: (-float(score[c]), c))[:k]


# ---------------------------------------------------------------------------------------
# Compressor (§2.5.1)
# ---------------------------------------------------------------------------------------

class Compressor:
    """Turns every r consecutive tokens into one pooled d-wide vector (before norm/RoPE).

    Frontier state (§2.5.1): ``kv`` and ``score`` [slots, coff·d]; ratio 128 uses slot p % 128,
    ratio 4 keeps the previous complete window in slots 0..3 and the current one in 4..7.
    """

    def __init__(self, ratio: int, d: int, wkv: np.ndarray, wgate: np.ndarray, ape: np.ndarray):
        """wkv, wgate [coff·d, n_embd]; ape [ratio, coff·d]."""
        self.ratio, self.d = ratio, d
        self.coff = 2 if ratio == 4 else 1
        self.wkv, self.wgate, self.ape = wkv, wgate, ape
        slots = 2 * ratio if ratio == 4 else ratio
        self.kv = np.zeros((slots, self.coff * d), dtype=np.float64)
        self.score = np.full((slots, self.coff * d), EMPTY_SCORE, dtype=np.float64)

    def step(self, h: np.ndarray, p: int) -> np.ndarray | None:
        """Take token p's normed input h [n_embd]; return pooled [d] when p completes a window."""
        r, d = self.ratio, self.d
        kv = self.wkv @ h
        sc = self.wgate @ h + self.ape[p % r]
        slot = 4 + p % 4 if r == 4 else p % r
        self.kv[slot], self.score[slot] = kv, sc
        if (p + 1) % r != 0:
            return None
        pooled = np.empty(d, dtype=np.float64)
        for j in range(d):
            if r == 4:  # previous window's first half, current window's second half
                scores = np.concatenate([self.score[0:4, j], self.score[4:8, d + j]])
                values = np.concatenate([self.kv[0:4, j], self.kv[4:8, d + j]])
            else:
                scores, values = self.score[:, j], self.kv[:, j]
            w = np.exp(scores - np.max(scores))
            pooled[j] = np.sum(w * values) / np.sum(w)
        if r == 4:
            self.kv[0:4], self.score[0:4] = self.kv[4:8].copy(), self.score[4:8].copy()
        return pooled


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hyper:
    """Hyperparameters read from ``deepseek4.*`` metadata."""

    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    head_dim: int
    n_rot: int
    q_lora: int
    o_lora: int
    o_groups: int
    n_expert: int
    n_expert_used: int
    n_hash_layer: int
    n_swa: int
    idx_heads: int
    idx_dim: int
    idx_topk: int
    n_hc: int
    sinkhorn_iters: int
    ratios: tuple[int, ...]
    swiglu_clamp: tuple[float, ...]
    rope_base: float
    compress_rope_base: float
    yarn: Yarn
    expert_scale: float
    rms_eps: float
    hc_eps: float


def _read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every ``deepseek4.*`` key of the file, scalars as Python numbers, arrays as lists."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith(PREFIX):
            out[key[len(PREFIX):]] = field.contents()
    return out


def _expect_true(value: Any, key: str, path: Path) -> None:
    """The spec defines the router only with renormalised weights (§1.2, §2.6)."""
    if not bool(value):
        raise ReferenceError(f"{path}: {PREFIX}{key} is false; the spec defines only true")


def _hyper(meta: dict[str, Any], path: Path) -> Hyper:
    def get(key: str) -> Any:
        if key not in meta:
            raise ReferenceError(f"{path}: metadata key {PREFIX}{key} is missing")
        return meta[key]

    _expect_true(get("expert_weights_norm"), "expert_weights_norm", path)
    n_layer = int(get("block_count"))
    return Hyper(
        n_layer=n_layer,
        n_embd=int(get("embedding_length")),
        n_vocab=int(get("vocab_size")),
        n_head=int(get("attention.head_count")),
        head_dim=int(get("attention.key_length")),
        n_rot=int(get("rope.dimension_count")),
        q_lora=int(get("attention.q_lora_rank")),
        o_lora=int(get("attention.output_lora_rank")),
        o_groups=int(get("attention.output_group_count")),
        n_expert=int(get("expert_count")),
        n_expert_used=int(get("expert_used_count")),
        n_hash_layer=int(get("hash_layer_count")),
        n_swa=int(get("attention.sliding_window")),
        idx_heads=int(get("attention.indexer.head_count")),
        idx_dim=int(get("attention.indexer.key_length")),
        idx_topk=int(get("attention.indexer.top_k")),
        n_hc=int(get("hyper_connection.count")),
        sinkhorn_iters=int(get("hyper_connection.sinkhorn_iterations")),
        ratios=tuple(int(r) for r in get("attention.compress_ratios")[:n_layer]),
        swiglu_clamp=tuple(float(c) for c in get("swiglu_clamp_exp")[:n_layer]),
        rope_base=float(get("rope.freq_base")),
        compress_rope_base=float(get("attention.compress_rope_freq_base")),
        yarn=Yarn(factor=float(get("rope.scaling.factor")),
                  orig_ctx=int(get("rope.scaling.original_context_length")),
                  beta_fast=float(get("rope.scaling.yarn_beta_fast")),
                  beta_slow=float(get("rope.scaling.yarn_beta_slow"))),
        expert_scale=float(get("expert_weights_scale")),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        hc_eps=float(get("hyper_connection.epsilon")),
    )


class RefModel:
    """DeepSeek V4 Flash, one token at a time in float64 (§3.2 decode step).

    Per-layer caches after the tokens fed so far (lists of float64 rows, oldest first):
    ``raw[L]`` the last n_swa KV rows [head_dim], ``comp[L]`` compressed KV rows [head_dim]
    (ratio > 0), ``idx[L]`` indexer rows [idx_dim] (ratio 4). ``raw_exact``, ``comp_exact`` and
    ``idx_exact`` hold the same rows before their FP8 / FP4 rounding (after RoPE, and after the
    Hadamard for indexer rows), so a comparison can tell a rounding-boundary flip from an
    error. ``selected[L]`` the compressed rows the indexer let the last token see (None when
    all were visible) and ``index_scores[L]`` the last token's indexer scores [n_comp] (None
    when not scored).

    ``row_hook``, when set, sees every new cached row before it is used and returns the row
    to cache instead: ``row_hook(kind, layer, index, exact, rounded)`` with kind "raw"
    (index = position), "comp" or "idx" (index = row number). A comparison uses it to adopt
    the other side's choice at a rounding tie, so one float32 flip does not cascade.
    """

    row_hook: RowHook | None = None

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ReferenceError(f"{self.path}: no such GGUF file")
        self.reader = GGUFReader(self.path)
        self.hp = _hyper(_read_metadata(self.reader), self.path)
        self._tensors = {t.name: t for t in self.reader.tensors}
        hp = self.hp
        self.token_embd = self._raw("token_embd.weight")  # [n_vocab, n_embd], widened per row
        self.output = self._dequant("output.weight", dtype=np.float32)  # exact in float32
        self.output_hc_fn = self._w("output_hc_fn.weight")
        self.output_hc_scale = self._w("output_hc_scale.weight")
        self.output_hc_base = self._w("output_hc_base.weight")
        self.output_norm = self._w("output_norm.weight")
        self.layers = [self._layer_weights(L) for L in range(hp.n_layer)]
        self.reset()

    # ---- weights -------------------------------------------------------------------
    def _tensor(self, name: str):
        if name not in self._tensors:
            raise ReferenceError(f"{self.path}: tensor {name} is missing")
        return self._tensors[name]

    def _raw(self, name: str) -> np.ndarray:
        return self._tensor(name).data

    def _dequant(self, name: str, dtype: Any = np.float64) -> np.ndarray:
        t = self._tensor(name)
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                             GGMLQuantizationType.I32):
            return np.asarray(t.data).astype(dtype)
        return dequantize(t.data, t.tensor_type).astype(dtype)

    def _w(self, name: str) -> np.ndarray:
        return self._dequant(name)

    def _layer_weights(self, L: int) -> dict[str, Any]:
        hp, r = self.hp, self.hp.ratios[L]
        b = f"blk.{L}."
        names = ["hc_attn_fn", "hc_attn_scale", "hc_attn_base", "attn_norm", "attn_q_a",
                 "attn_q_a_norm", "attn_q_b", "attn_kv", "attn_kv_a_norm", "attn_sinks",
                 "attn_output_a", "attn_output_b", "hc_ffn_fn", "hc_ffn_scale", "hc_ffn_base",
                 "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
                 "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
        w: dict[str, Any] = {n: self._w(b + n + ".weight") for n in names}
        w["exp_probs_b"] = self._w(b + "exp_probs_b.bias") if b + "exp_probs_b.bias" in self._tensors else None
        if L < hp.n_hash_layer:
            w["tid2eid"] = np.asarray(self._raw(b + "ffn_gate_tid2eid.weight"))  # [n_vocab, n_used]
        if r:
            w["compressor"] = (self._w(b + "attn_compressor_kv.weight"), self._w(b + "attn_compressor_gate.weight"),
                               self._w(b + "attn_compressor_ape.weight"))
            w["compressor_norm"] = self._w(b + "attn_compressor_norm.weight")
        if r == 4:
            w["indexer_q_b"] = self._w(b + "indexer.attn_q_b.weight")
            w["indexer_proj"] = self._w(b + "indexer.proj.weight")
            w["indexer_compressor"] = (self._w(b + "indexer_compressor_kv.weight"),
                                       self._w(b + "indexer_compressor_gate.weight"),
                                       self._w(b + "indexer_compressor_ape.weight"))
            w["indexer_compressor_norm"] = self._w(b + "indexer_compressor_norm.weight")
        return w

    # ---- state ---------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all tokens: empty caches and fresh compressor frontiers."""
        hp = self.hp
        self.n_past = 0
        self.raw: list[list[np.ndarray]] = [[] for _ in range(hp.n_layer)]
        self.comp: list[list[np.ndarray]] = [[] for _ in range(hp.n_layer)]
        self.idx: list[list[np.ndarray]] = [[] for _ in range(hp.n_layer)]
        self.raw_exact: list[list[np.ndarray]] = [[] for _ in range(hp.n_layer)]
        self.comp_exact: list[list[np.ndarray]] = [[] for _ in range(hp.n_layer)]
        self.idx_exact: list[list[np.ndarray]] = [[] for _ in range(hp.n_layer)]
        self.selected: list[list[int] | None] = [None] * hp.n_layer
        self.index_scores: list[np.ndarray | None] = [None] * hp.n_layer
        self.compressors: list[Compressor | None] = []
        self.indexer_compressors: list[Compressor | None] = []
        for L, w in enumerate(self.layers):
            r = hp.ratios[L]
            self.compressors.append(Compressor(r, hp.head_dim, *w["compressor"]) if r else None)
            self.indexer_compressors.append(Compressor(4, hp.idx_dim, *w["indexer_compressor"]) if r == 4 else None)

    def rope_params(self, L: int) -> tuple[float, Yarn | None]:
        """(base, yarn) of layer L: dense layers plain base, compressed layers base + YaRN (§2.5)."""
        hp = self.hp
        if hp.ratios[L] == 0:
            return hp.rope_base, None
        return hp.compress_rope_base, hp.yarn

    # ---- forward -------------------------------------------------------------------
    def step(self, token_id: int) -> np.ndarray:
        """Feed one token at position n_past; return next-token logits [n_vocab] float64."""
        return self.logits(self.advance(token_id))

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Feed tokens one by one (same math as ``step``); return the last logits [n_vocab]."""
        if not tokens:
            raise ReferenceError(f"{self.path}: feed() needs at least one token")
        x = None
        for t in tokens:
            x = self.advance(t)
        return self.logits(x)

    def advance(self, token_id: int) -> np.ndarray:
        """Run every layer for one token without the output head; return the final HC
        state [n_hc, n_embd] (``logits(state)`` gives the logits)."""
        hp = self.hp
        if not 0 <= token_id < hp.n_vocab:
            raise ReferenceError(f"{self.path}: token id {token_id} outside vocab of {hp.n_vocab}")
        p = self.n_past
        e = np.asarray(self.token_embd[token_id], dtype=np.float64)
        x = np.empty((hp.n_hc, hp.n_embd), dtype=np.float64)
        for h in range(hp.n_hc):
            x[h] = e
        for L in range(hp.n_layer):
            x = self._layer(L, x, token_id, p)
        self.n_past += 1
        return x

    def _layer(self, L: int, x: np.ndarray, token_id: int, p: int) -> np.ndarray:
        """§2.4: attention and MoE sublayers, each wrapped in HC pre/post."""
        hp, w = self.hp, self.layers[L]
        y, post, c = hc_pre(x, w["hc_attn_fn"], w["hc_attn_scale"], w["hc_attn_base"],
                            hp.sinkhorn_iters, hp.hc_eps, hp.rms_eps)
        h = rms(y, hp.rms_eps) * w["attn_norm"]
        a = self._attention(L, h, p)
        x1 = hc_post(a, x, post, c)
        y2, post2, c2 = hc_pre(x1, w["hc_ffn_fn"], w["hc_ffn_scale"], w["hc_ffn_base"],
                               hp.sinkhorn_iters, hp.hc_eps, hp.rms_eps)
        g = rms(y2, hp.rms_eps) * w["ffn_norm"]
        f = self._moe(L, g, token_id) + self._shared_expert(L, g)
        return hc_post(f, x1, post2, c2)

    def _attention(self, L: int, h: np.ndarray, p: int) -> np.ndarray:
        """§2.5 for token p with attention-normed input h [n_embd]; returns [n_embd]."""
        hp, w, r = self.hp, self.layers[L], self.hp.ratios[L]
        base, yarn = self.rope_params(L)
        n_nope = hp.head_dim - hp.n_rot

        # Q path
        qn = rms(w["attn_q_a"] @ h, hp.rms_eps) * w["attn_q_a_norm"]
        q = (w["attn_q_b"] @ qn).reshape(hp.n_head, hp.head_dim)
        for i in range(hp.n_head):
            q[i] = rope_tail(rms(q[i], hp.rms_eps), p, hp.n_rot, base, yarn)

        # KV path: one shared row, RoPE on the tail, FP8 on the nope dims, into the raw window
        kv = rms(w["attn_kv"] @ h, hp.rms_eps) * w["attn_kv_a_norm"]
        kv = rope_tail(kv, p, hp.n_rot, base, yarn)
        rounded = kv.copy()
        rounded[:n_nope] = fp8_e4m3_sim(kv[:n_nope])
        self._cache_row("raw", L, p, kv, rounded)
        if len(self.raw[L]) > hp.n_swa:
            self.raw[L].pop(0)
            self.raw_exact[L].pop(0)

        # compressors (attention rows; ratio-4 layers also indexer rows)
        if r:
            pooled = self.compressors[L].step(h, p)
            if pooled is not None:
                row = rms(pooled, hp.rms_eps) * w["compressor_norm"]
                row = rope_tail(row, p + 1 - r, hp.n_rot, base, yarn)
                rounded = row.copy()
                rounded[:n_nope] = fp8_e4m3_sim(row[:n_nope])
                self._cache_row("comp", L, len(self.comp[L]), row, rounded)
        if r == 4:
            pooled = self.indexer_compressors[L].step(h, p)
            if pooled is not None:
                row = rms(pooled, hp.rms_eps) * w["indexer_compressor_norm"]
                row = hadamard(rope_tail(row, p + 1 - r, hp.n_rot, base, yarn))
                self._cache_row("idx", L, len(self.idx[L]), row, fp4_e2m1_sim(row))

        # which compressed rows this token sees (§3.1)
        visible = list(range(len(self.comp[L])))
        self.selected[L], self.index_scores[L] = None, None
        if r == 4 and len(self.idx[L]) > hp.idx_topk:
            scores = self._index_scores(L, h, qn, p)
            visible = sorted(top_indices(scores, hp.idx_topk))
            self.selected[L], self.index_scores[L] = visible, scores

        rows = np.stack(list(self.raw[L]) + [self.comp[L][c] for c in visible])  # [n_rows, head_dim]
        o = np.empty((hp.n_head, hp.head_dim), dtype=np.float64)
        sinks = w["attn_sinks"]
        for i in range(hp.n_head):
            s = (rows @ q[i]) / math.sqrt(hp.head_dim)  # s_j for every row j
            m = max(float(sinks[i]), float(np.max(s)))
            e = np.exp(s - m)
            den = math.exp(float(sinks[i]) - m) + float(np.sum(e))
            o[i] = rope_tail((e @ rows) / den, p, hp.n_rot, base, yarn, inverse=True)

        # grouped low-rank output projection (§2.5, §7.16)
        heads_per_group = hp.n_head // hp.o_groups
        group_in = heads_per_group * hp.head_dim
        flat = o.reshape(-1)
        low = np.empty(hp.o_groups * hp.o_lora, dtype=np.float64)
        for g in range(hp.o_groups):
            wa = w["attn_output_a"][g * hp.o_lora:(g + 1) * hp.o_lora]
            low[g * hp.o_lora:(g + 1) * hp.o_lora] = wa @ flat[g * group_in:(g + 1) * group_in]
        return w["attn_output_b"] @ low

    def _cache_row(self, kind: str, L: int, index: int, exact: np.ndarray, rounded: np.ndarray) -> None:
        """Append a new row of ``kind`` (and its unrounded form), through ``row_hook`` if set."""
        if self.row_hook is not None:
            rounded = self.row_hook(kind, L, index, exact, rounded)
        getattr(self, kind)[L].append(rounded)
        getattr(self, kind + "_exact")[L].append(exact)

    def _index_scores(self, L: int, h: np.ndarray, qn: np.ndarray, p: int) -> np.ndarray:
        """§2.5.2: indexer score of every indexer row for token p; returns [n_idx]."""
        hp, w = self.hp, self.layers[L]
        base, yarn = self.rope_params(L)
        q_idx = (w["indexer_q_b"] @ qn).reshape(hp.idx_heads, hp.idx_dim)
        for hh in range(hp.idx_heads):
            q_idx[hh] = fp4_e2m1_sim(hadamard(rope_tail(q_idx[hh], p, hp.n_rot, base, yarn)))
        head_w = (w["indexer_proj"] @ h) / math.sqrt(hp.idx_heads * hp.idx_dim)
        keys = self.idx[L]
        score = np.zeros(len(keys), dtype=np.float64)
        for c, key in enumerate(keys):
            for hh in range(hp.idx_heads):
                score[c] += head_w[hh] * max(0.0, float(q_idx[hh] @ key))
        return score

    def _moe(self, L: int, g: np.ndarray, token_id: int) -> np.ndarray:
        """§2.6 routed experts for the ffn-normed g [n_embd]; returns [n_embd]."""
        hp, w = self.hp, self.layers[L]
        logits = w["ffn_gate_inp"] @ g
        prob = np.array([math.sqrt(softplus(float(v))) for v in logits])
        if L < hp.n_hash_layer:
            sel = [int(e) for e in w["tid2eid"][token_id]]
        else:
            choose = prob + w["exp_probs_b"] if w["exp_probs_b"] is not None else prob
            sel = top_indices(choose, hp.n_expert_used)
        chosen = np.array([prob[e] for e in sel])
        weights = chosen / max(float(np.sum(chosen)), ROUTER_WEIGHT_FLOOR) * hp.expert_scale
        out = np.zeros(hp.n_embd, dtype=np.float64)
        for k, e in enumerate(sel):
            mid = clamped_swiglu(w["ffn_gate_exps"][e] @ g, w["ffn_up_exps"][e] @ g, hp.swiglu_clamp[L])
            out += w["ffn_down_exps"][e] @ (mid * weights[k])
        return out

    def _shared_expert(self, L: int, g: np.ndarray) -> np.ndarray:
        """§2.6 shared expert, with the same asymmetric clamp; returns [n_embd]."""
        hp, w = self.hp, self.layers[L]
        mid = clamped_swiglu(w["ffn_gate_shexp"] @ g, w["ffn_up_shexp"] @ g, hp.swiglu_clamp[L])
        return w["ffn_down_shexp"] @ mid

    def logits(self, x: np.ndarray) -> np.ndarray:
        """§2.7 output head for the final HC state x [n_hc, n_embd]; returns [n_vocab] float64."""
        hp = self.hp
        pre = self.output_hc_fn @ rms(x.reshape(-1), hp.rms_eps)
        wts = sigmoid(pre * self.output_hc_scale[0] + self.output_hc_base) + hp.hc_eps
        y = np.zeros(hp.n_embd, dtype=np.float64)
        for h in range(hp.n_hc):
            y += wts[h] * x[h]
        z = rms(y, hp.rms_eps) * self.output_norm
        out = np.empty(self.output.shape[0], dtype=np.float64)
        chunk = 16384
        for r0 in range(0, out.shape[0], chunk):
            out[r0:r0 + chunk] = self.output[r0:r0 + chunk].astype(np.float64) @ z
        return out
