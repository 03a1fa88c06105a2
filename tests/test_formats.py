"""MXFP4 (ggml type 39) decoding, and MXFP4 / Q8_0 / Q4_K blocks repacked into MLX's own
quantized layouts (workbench.gguf.mlxquant), alone and inside the MoE."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from workbench.bench.dequant import random_blocks
from workbench.gguf import quants
from workbench.gguf.mlxquant import NATIVE_MODES, MLXQuant, to_mlx
from workbench.gguf.quants import QTensor, QuantError, dequantize
from workbench.spec.ggml import GGML_TYPES, MXFP4, Q2_K, Q4_K, Q8_0
from workbench.model import moe as moe_mod
from workbench.model.moe import MoE, MoEWeights


def reference(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    with np.errstate(all="ignore"):
        return ref_dequantize(raw, GGMLQuantizationType(ggml_type))


def assert_bits_equal(got: mx.array | np.ndarray, want: np.ndarray, ignore_zero_sign: bool = False) -> None:
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    g, w = got[~nan], want[~nan]
    if ignore_zero_sign:
        g, w = np.where(g == 0, 0, g), np.where(w == 0, 0, w)
    bad = np.flatnonzero(g.view(np.uint32) != w.view(np.uint32))
    assert bad.size == 0, f"{bad.size} differ, e.g. {g[bad[:3]]} vs {w[bad[:3]]}"


# --- MXFP4 decoding -----------------------------------------------------------------------------

def test_mxfp4_geometry() -> None:
    t = GGML_TYPES[39]
    assert (t.name, t.block_elems, t.block_bytes) == ("MXFP4", 32, 17) and MXFP4 == 39


def test_mxfp4_every_scale_byte_and_code_match_gguf(path: str) -> None:
    """All 256 E8M0 bytes (subnormal scales, 2^127, ggml's overflow to inf) x all 16 codes in
    both nibbles, bit for bit (code 8 is +0.0 as in ggml)."""
    codes = np.arange(16, dtype=np.uint8)
    qs = codes | (codes[::-1] << 4)  # byte j: code j low, code 15-j high
    blocks = np.concatenate([np.arange(256, dtype=np.uint8)[:, None], np.tile(qs, (256, 1))], axis=1)
    want = reference(blocks, MXFP4)
    assert np.isinf(want).any() and (want[0] != 0).any()  # the edges are there
    assert_bits_equal(dequantize(blocks, MXFP4), want)
    assert_bits_equal(dequantize(mx.array(blocks.reshape(4, -1)), MXFP4), want.reshape(4, -1))


def test_mxfp4_random_and_quantized_blocks_match_gguf(path: str) -> None:
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (6, 40 * 17), dtype=np.uint8)
    assert_bits_equal(dequantize(raw, MXFP4), reference(raw, MXFP4))
    w = rng.standard_normal((4, 256)).astype(np.float32)
    q = ref_quantize(w, GGMLQuantizationType.MXFP4)
    assert q.shape == (4, 8 * 17)
    got = np.asarray(dequantize(q, MXFP4))
    assert_bits_equal(got, reference(q, MXFP4))
    assert np.abs(got - w).max() < 0.5 * np.abs(w).max()  # a real quantization of w


def test_mxfp4_bad_sizes_raise() -> None:
    with pytest.raises(QuantError, match=r"MXFP4.*17-byte"):
        dequantize(np.zeros((2, 33), np.uint8), MXFP4)
    with pytest.raises(QuantError, match=r"MXFP4.*multiple of 32"):
        QTensor(np.zeros(17, np.uint8), MXFP4, (1, 16))


# --- repacking into MLX layouts ----------------------------------------------------------------

NATIVE = sorted(NATIVE_MODES)


def blocks_3d(ggml_type: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Random valid blocks for ``shape`` ``[E, out, in]`` as uint8 ``[E, out, row_bytes]``, weights ~0.01-1."""
    n = shape[0] * shape[1] * shape[2]
    raw = random_blocks(ggml_type, -(-n // 4096) * 4096, seed).reshape(-1)
    t = GGML_TYPES[ggml_type]
    return raw[: n // t.block_elems * t.block_bytes].reshape(shape[0], shape[1], -1).copy()


@pytest.mark.parametrize("ggml_type", NATIVE, ids=lambda t: GGML_TYPES[t].name)
def test_repacked_weight_is_the_dequantized_weight(ggml_type: int) -> None:
    raw = blocks_3d(ggml_type, (3, 8, 512), seed=ggml_type)
    q = to_mlx(raw, ggml_type)
    mode, bits = NATIVE_MODES[ggml_type]
    assert (q.mode, q.bits, q.shape) == (mode, bits, (3, 8, 512))
    assert q.w.dtype == mx.uint32 and q.w.shape == (3, 8, 512 * bits // 32)
    assert q.scales.shape == (3, 8, 16) and (q.biases is None) == (mode == "mxfp4")
    # the same values; MLX may give -0.0 where ggml gives +0.0
    assert_bits_equal(q.dequantize(), np.asarray(dequantize(raw, ggml_type)), ignore_zero_sign=True)
    # a 2-D weight and an MLX input too
    q2 = to_mlx(mx.array(raw[1]), ggml_type)
    assert_bits_equal(q2.dequantize(), np.asarray(dequantize(raw[1], ggml_type)), ignore_zero_sign=True)


@pytest.mark.parametrize("ggml_type", NATIVE, ids=lambda t: GGML_TYPES[t].name)
def test_native_products_match_float64(ggml_type: int) -> None:
    """quantized_matmul and gather_qmm on repacked weights = float64 products of ggml's
    dequantized weights, to float32 accumulation error."""
    raw = blocks_3d(ggml_type, (3, 16, 512), seed=10 + ggml_type)
    w = reference(raw.reshape(-1, raw.shape[-1]), ggml_type).reshape(3, 16, 512).astype(np.float64)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    idx = np.array([0, 0, 1, 2, 2], dtype=np.int32)
    q = to_mlx(raw, ggml_type)
    got = np.asarray(q.gather_matmul(mx.array(x), mx.array(idx)), dtype=np.float64)
    want = np.einsum("mi,moi->mo", x.astype(np.float64), w[idx])
    scale = np.abs(x).astype(np.float64) @ np.abs(w[0]).T
    assert got.shape == (5, 16) and np.all(np.abs(got - want) <= 1e-5 * scale.max())
    y = np.asarray(to_mlx(raw[2], ggml_type).matmul(mx.array(x)), dtype=np.float64)
    assert np.all(np.abs(y - x.astype(np.float64) @ w[2].T) <= 1e-5 * scale.max())


def test_to_mlx_refuses_other_types_and_bad_buffers() -> None:
    with pytest.raises(QuantError, match="no MLX quantized layout for .*Q2_K"):
        to_mlx(np.zeros((1, 84), np.uint8), Q2_K)
    with pytest.raises(QuantError, match="MXFP4 raw buffer"):
        to_mlx(np.zeros((1, 18), np.uint8), MXFP4)
    assert isinstance(to_mlx(np.zeros((1, 17), np.uint8), MXFP4), MLXQuant)


# --- inside the MoE ----------------------------------------------------------------------------

def small_moe(types: tuple[int, int, int], native_max_rows: int | None, seed: int = 0) -> MoE:
    """A MoE of 4 experts, n_embd 256, n_ff 512 with the given gate/up/down types (only routed() is used)."""
    n_expert, n_ff, n_embd = 4, 512, 256
    g, u, d = (QTensor(blocks_3d(t, shape, seed + i), t, shape) for i, (t, shape) in
               enumerate(zip(types, [(n_expert, n_ff, n_embd)] * 2 + [(n_expert, n_embd, n_ff)])))
    z = mx.zeros((1, 1))
    return MoE(2, False, 1.0, 10.0, MoEWeights(z, None, None, g, u, d, z, z, z), native_max_rows=native_max_rows)


@pytest.mark.parametrize("types", [(MXFP4,) * 3, (Q8_0,) * 3, (Q4_K,) * 3, (Q4_K, Q4_K, MXFP4), (Q8_0, MXFP4, Q8_0)],
                         ids=["mxfp4", "q8_0", "q4_k", "q4k-gate-up+mxfp4-down", "mixed-gate-up"])
def test_moe_native_matches_dequantized(types: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_mod, "native_available", lambda: False)  # MLX's quantized matmul, not the few-row kernel
    rng = np.random.default_rng(5)
    g = mx.array(rng.standard_normal((6, 256)).astype(np.float32))
    sel = mx.array(np.array([[0, 2], [2, 3], [0, 1], [3, 0], [2, 1], [0, 3]], dtype=np.int32))
    wt = mx.array(rng.uniform(0.2, 1.0, (6, 2)).astype(np.float32))
    want = np.asarray(small_moe(types, 0).routed(g, sel, wt))
    scale = np.abs(want).max()
    for rows in (1, 2, 100):  # some, more, all experts native (expert 0 has 4 rows, 1 has 2)
        got = np.asarray(small_moe(types, rows).routed(g, sel, wt))
        assert np.abs(got - want).max() <= 1e-5 * scale, rows


def test_native_threshold_per_type_and_device(monkeypatch) -> None:
    monkeypatch.setattr(moe_mod, "NATIVE_MAX_ROWS", {MXFP4: 7, Q8_0: 3, Q4_K: 5})
    assert small_moe((MXFP4,) * 3, None).native_max_rows() == 7
    assert small_moe((Q4_K, Q4_K, Q8_0), None).native_max_rows() == 3
    assert small_moe((MXFP4,) * 3, 2).native_max_rows() == 2
    from workbench.spec.ggml import IQ2_XXS
    assert small_moe((IQ2_XXS, IQ2_XXS, Q2_K), 9).native_max_rows() == 0  # no MLX layout
    monkeypatch.setattr(moe_mod.mx, "default_device", lambda: mx.gpu)
    assert small_moe((Q4_K,) * 3, None).native_max_rows() > 1 << 40


def test_moe_native_reads_only_the_used_experts(monkeypatch) -> None:
    monkeypatch.setattr(moe_mod, "native_available", lambda: False)  # MLX's quantized matmul, not the few-row kernel
    m = small_moe((MXFP4,) * 3, 100)
    seen = []
    real = QTensor.expert_raw
    monkeypatch.setattr(QTensor, "expert_raw", lambda self, ids: seen.append(list(ids)) or real(self, ids))
    monkeypatch.setattr(QTensor, "experts", lambda self, ids: pytest.fail("dequantized an expert"))
    g = mx.ones((2, 256))
    m.routed(g, mx.array([[3, 1], [1, 3]], dtype=mx.int32), mx.ones((2, 2)))
    assert seen and all(ids == [1, 3] for ids in seen)
