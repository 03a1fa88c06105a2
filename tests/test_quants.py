"""ggml dequantization in MLX against the reference ``gguf.quants.dequantize``, bit for bit.

Equality is on float32 bit patterns, NaN-aware: NaNs must sit at the same positions, every
other element must have the same bits (so -0.0 vs +0.0 or a one-ulp difference fails).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from workbench.errors import WorkbenchError
from workbench.gguf import quants
from workbench.gguf.quants import QTensor, QuantError, dequantize, matmul, q8_0_to_affine
from workbench.spec.ggml import BF16, F16, F32, GGML_TYPES, I32, IQ2_XXS, Q2_K, Q4_K, Q8_0

QUANTS = [Q8_0, Q2_K, Q4_K, IQ2_XXS]
# byte offsets of the f16 scales (d, then dmin where present) inside one block
SCALE_OFFSETS = {Q8_0: (0,), Q2_K: (80, 82), Q4_K: (0, 2), IQ2_XXS: (0,)}
# f16 bit patterns: largest, smallest normal, largest/smallest subnormal, ±0, ±inf, quiet,
# signalling and negative NaNs, ordinary values
EDGE_F16 = np.array([0x7BFF, 0xFBFF, 0x0400, 0x03FF, 0x0001, 0x8001, 0x0000, 0x8000,
                     0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE00, 0x7DFF, 0x3C00, 0xB800],
                    dtype=np.uint16)


NATIVE_BUILT = any((Path(quants.__file__).parent).glob("_native*.so"))


def test_native_kernels_load_when_built() -> None:
    """A built extension must be picked up (a stale or broken build would silently fall back)."""
    if not NATIVE_BUILT or os.environ.get("WORKBENCH_NATIVE") == "0":
        pytest.skip("native kernels not built (make native) or switched off")
    assert quants.native_available()


def test_native_off_switch(monkeypatch) -> None:
    monkeypatch.setenv("WORKBENCH_NATIVE", "0")
    assert quants._load_native() is None


def reference(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    if ggml_type == I32:  # gguf has no I32 decoder: it is a plain array
        return raw.view(np.int32)
    with np.errstate(all="ignore"):
        return ref_dequantize(raw, GGMLQuantizationType(ggml_type))


def assert_bits_equal(got: mx.array | np.ndarray, want: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype == np.int32:
        assert np.array_equal(got, want)
        return
    g_nan, w_nan = np.isnan(got), np.isnan(want)
    assert np.array_equal(g_nan, w_nan), f"NaN positions differ at {np.argwhere(g_nan != w_nan)[:5]}"
    g, w = got.view(np.uint32)[~g_nan], want.view(np.uint32)[~w_nan]
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, (f"{bad.size} elements differ, e.g. {got[~g_nan][bad[:3]]} "
                           f"vs {want[~w_nan][bad[:3]]}")


def random_blocks(ggml_type: int, n_blocks: int, rng: np.random.Generator,
                  normal_scales: bool) -> np.ndarray:
    """uint8 [n_blocks, block_bytes]; with normal_scales the f16 scales are ordinary values."""
    t = GGML_TYPES[ggml_type]
    blocks = rng.integers(0, 256, size=(n_blocks, t.block_bytes), dtype=np.uint8)
    if normal_scales:
        for off in SCALE_OFFSETS[ggml_type]:
            d = (rng.uniform(1e-4, 2.0, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
            blocks[:, off:off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("ggml_type", QUANTS, ids=lambda t: GGML_TYPES[t].name)
@pytest.mark.parametrize("normal_scales", [True, False], ids=["normal-scales", "random-bytes"])
def test_random_blocks_match_reference(ggml_type: int, normal_scales: bool, path: str) -> None:
    rng = np.random.default_rng(ggml_type * 2 + normal_scales)
    raw = random_blocks(ggml_type, 6 * 40, rng, normal_scales).reshape(6, -1)  # 6 rows
    assert_bits_equal(dequantize(raw, ggml_type), reference(raw, ggml_type))
    assert_bits_equal(dequantize(mx.array(raw), ggml_type), reference(raw, ggml_type))


@pytest.mark.parametrize("ggml_type", QUANTS, ids=lambda t: GGML_TYPES[t].name)
def test_edge_scales_match_reference(ggml_type: int, path: str) -> None:
    """Every edge f16 pattern as d (and, crossed with every other, as dmin)."""
    rng = np.random.default_rng(100 + ggml_type)
    offs = SCALE_OFFSETS[ggml_type]
    combos = [(a,) for a in EDGE_F16] if len(offs) == 1 else \
        [(a, b) for a in EDGE_F16 for b in EDGE_F16]
    blocks = random_blocks(ggml_type, len(combos), rng, normal_scales=False)
    for i, combo in enumerate(combos):
        for off, bits in zip(offs, combo):
            blocks[i, off:off + 2] = np.array([bits], dtype=np.uint16).view(np.uint8)
    # extreme payloads too: all-zero and all-0xFF quant bytes in some blocks
    keep = np.zeros(GGML_TYPES[ggml_type].block_bytes, dtype=bool)
    for off in offs:
        keep[off:off + 2] = True
    blocks[::3, ~keep] = 0
    blocks[1::3, ~keep] = 0xFF
    want = reference(blocks, ggml_type)
    assert np.isnan(want).any() and np.isinf(want).any()  # the edge cases are really there
    assert_bits_equal(dequantize(blocks, ggml_type), want)


def test_iq2_xxs_every_grid_index_and_sign_pattern(path: str) -> None:
    """All 256 × 128 (grid, sign) pairs, every 4-bit sub-block scale, one block per 32."""
    grid_idx, sign_idx = np.meshgrid(np.arange(256), np.arange(128), indexing="ij")
    grid_idx, sign_idx = grid_idx.ravel(), sign_idx.ravel()  # 32768 groups of 8 = 1024 blocks
    n_blocks = grid_idx.size // 32
    sub = np.arange(n_blocks * 8)
    a0 = np.zeros(n_blocks * 8, dtype=np.uint32)
    a1 = (sub % 16).astype(np.uint32) << 28
    for l in range(4):
        a0 |= grid_idx[l::4].astype(np.uint32) << (8 * l)
        a1 |= sign_idx[l::4].astype(np.uint32) << (7 * l)
    qs = np.stack([a0, a1], axis=1).reshape(n_blocks, 16).view(np.uint8)
    d = np.full(n_blocks, 0.3, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    blocks = np.concatenate([d, qs], axis=1)
    assert blocks.shape == (n_blocks, 66)
    got = dequantize(blocks, IQ2_XXS)
    assert_bits_equal(got, reference(blocks, IQ2_XXS))
    # every magnitude and both signs occur
    mags = np.unique(np.abs(np.asarray(got)) / np.asarray(got).max())
    assert mags.size > 3 and (np.asarray(got) < 0).any()


def test_iq2_xxs_tables_are_the_ggml_ones() -> None:
    signs = quants.IQ2XXS_SIGNS
    assert signs.shape == (128,)
    assert np.array_equal(signs & 127, np.arange(128))  # low 7 bits: the index itself
    assert all(bin(int(s)).count("1") % 2 == 0 for s in signs)  # bit 7 makes parity even
    grid = quants.IQ2XXS_GRID
    assert grid.shape == (256, 8) and set(np.unique(grid)) == {8.0, 25.0, 43.0}
    assert np.unique(grid, axis=0).shape[0] == 256


@pytest.mark.parametrize("ggml_type", [F16, BF16], ids=["F16", "BF16"])
def test_every_16_bit_pattern(ggml_type: int, path: str) -> None:
    raw = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(256, 512)
    assert_bits_equal(dequantize(raw, ggml_type), reference(raw, ggml_type))


@pytest.mark.parametrize("ggml_type", [F32, I32], ids=["F32", "I32"])
def test_plain_32_bit(ggml_type: int) -> None:
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(3, 4, 64), dtype=np.uint8)
    got = dequantize(raw, ggml_type)
    assert got.dtype == (mx.int32 if ggml_type == I32 else mx.float32)
    assert_bits_equal(got, reference(raw, ggml_type))


def test_leading_axes_and_memmap(tmp_path, path: str) -> None:
    rng = np.random.default_rng(8)
    blocks = random_blocks(Q4_K, 2 * 3 * 2, rng, normal_scales=True).reshape(2, 3, 2 * 144)
    path = tmp_path / "blocks.bin"
    blocks.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=blocks.shape)
    got = dequantize(mm[:, 1:], Q4_K)  # a non-contiguous memmap view
    assert got.shape == (2, 2, 512)
    assert_bits_equal(got, reference(blocks[:, 1:], Q4_K))
    strided = mx.array(blocks)[:, 1:]  # a non-contiguous MLX view
    assert_bits_equal(dequantize(strided, Q4_K), reference(blocks[:, 1:], Q4_K))


# --- errors ------------------------------------------------------------------------------------

def test_wrong_size_unknown_type_and_dtype_raise() -> None:
    with pytest.raises(QuantError, match=r"Q2_K.*100 bytes.*84-byte"):
        dequantize(np.zeros((2, 100), np.uint8), Q2_K)
    with pytest.raises(QuantError, match=r"Q4_0"):  # known to ggml, not decodable here
        dequantize(np.zeros(18, np.uint8), 2)
    with pytest.raises(QuantError, match=r"99"):
        dequantize(np.zeros(4, np.uint8), 99)
    with pytest.raises(QuantError, match=r"Q8_0.*uint8.*float32"):
        dequantize(np.zeros(34, np.float32), Q8_0)
    with pytest.raises(QuantError, match=r"IQ2_XXS.*\(2, 4096\).*2112 bytes.*got 1000 bytes"):
        QTensor(np.zeros(1000, np.uint8), IQ2_XXS, (2, 4096))
    with pytest.raises(QuantError, match=r"Q8_0.*multiple of 32"):
        QTensor(np.zeros(34, np.uint8), Q8_0, (1, 30))
    assert issubclass(QuantError, WorkbenchError)


# --- QTensor -----------------------------------------------------------------------------------

def make_qtensor(ggml_type: int, shape: tuple[int, ...], seed: int,
                 as_numpy: bool = False) -> tuple[QTensor, np.ndarray]:
    t = GGML_TYPES[ggml_type]
    rng = np.random.default_rng(seed)
    n_blocks = math.prod(shape) // t.block_elems
    if t.block_elems == 1:
        values = rng.standard_normal(math.prod(shape)).astype(np.float32) * 0.1
        raw = ref_quantize(values, GGMLQuantizationType(ggml_type)).view(np.uint8) \
            if ggml_type != F32 else values.view(np.uint8)
    else:
        raw = random_blocks(ggml_type, n_blocks, rng, normal_scales=True)
        for off in SCALE_OFFSETS[ggml_type]:  # small weights keep matmul sums tame
            d = np.abs(raw[:, off:off + 2].copy().view(np.float16)) * np.float16(0.01)
            raw[:, off:off + 2] = d.view(np.uint8)
    raw = raw.reshape(*shape[:-1], -1)
    qt = QTensor(raw if as_numpy else mx.array(raw), ggml_type, shape)
    return qt, reference(raw, ggml_type)


@pytest.mark.parametrize("ggml_type", QUANTS + [F16, F32], ids=lambda t: GGML_TYPES[t].name)
def test_qtensor_rows_and_experts(ggml_type: int) -> None:
    qt2, full2 = make_qtensor(ggml_type, (12, 512), seed=1)
    assert qt2.shape == (12, 512) and qt2.ggml_type == ggml_type
    assert qt2.nbytes == 12 * 512 // GGML_TYPES[ggml_type].block_elems * GGML_TYPES[ggml_type].block_bytes
    assert_bits_equal(qt2.dequantize(), full2)
    assert_bits_equal(qt2.rows(3, 8), full2[3:8])
    assert qt2.rows(5, 5).shape == (0, 512)
    for as_numpy in (False, True):
        qt3, full3 = make_qtensor(ggml_type, (5, 6, 256), seed=2, as_numpy=as_numpy)
        ids = [4, 0, 4, 2]
        assert_bits_equal(qt3.experts(mx.array(ids)), full3[ids])
        assert_bits_equal(qt3.experts(np.array([1])), full3[[1]])


def test_qtensor_keeps_a_memmap_without_copying(tmp_path) -> None:
    qt, full = make_qtensor(Q2_K, (4, 3, 256), seed=3, as_numpy=True)
    path = tmp_path / "experts.bin"
    np.asarray(qt.raw).tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(4, 3 * 84))  # flat rows, reshaped
    lazy = QTensor(mm, Q2_K, (4, 3, 256))
    assert isinstance(lazy.raw, np.ndarray) and np.shares_memory(lazy.raw, mm)
    assert_bits_equal(lazy.experts([3, 1]), full[[3, 1]])


def test_qtensor_bad_requests_raise() -> None:
    qt2, _ = make_qtensor(Q8_0, (4, 64), seed=4)
    qt3, _ = make_qtensor(Q8_0, (3, 2, 64), seed=5)
    with pytest.raises(QuantError, match="out of range"):
        qt2.rows(2, 5)
    with pytest.raises(QuantError, match="2-D"):
        qt3.rows(0, 1)
    with pytest.raises(QuantError, match="3-D"):
        qt2.experts([0])
    with pytest.raises(QuantError, match="out of range for 3 experts"):
        qt3.experts(mx.array([0, 3]))
    with pytest.raises(QuantError, match="1-D integer"):
        qt3.experts(np.array([[0]]))


# --- matmul ------------------------------------------------------------------------------------

def assert_matmul_close(y: mx.array, x: np.ndarray, w: np.ndarray) -> None:
    """|y - x@W.T| <= gamma_K * |x|@|W|.T, gamma_K = K*u/(1-K*u) with u the unit roundoff of
    y's dtype: the worst-case error of any float summation order (plus one final rounding
    for half precision). A wrong block, scale or row order is off by far more."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    want = x64 @ w64.T
    u = 2.0 ** -24 if y.dtype == mx.float32 else 2.0 ** -11
    k = x.shape[-1] + 1
    bound = k * u / (1 - k * u) * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    err = np.abs(np.asarray(y.astype(mx.float32), dtype=np.float64) - want)
    assert y.shape == want.shape
    assert (err <= bound).all(), f"max err/bound {np.max(err / bound):.3g}"


@pytest.mark.parametrize("ggml_type", QUANTS + [F16, F32, BF16], ids=lambda t: GGML_TYPES[t].name)
def test_matmul_matches_float64(ggml_type: int) -> None:
    qt, w = make_qtensor(ggml_type, (48, 512), seed=6)
    rng = np.random.default_rng(9)
    for rows in [(1,), (3,), (2, 5)]:
        x = rng.standard_normal((*rows, 512)).astype(np.float32)
        for mode in ("auto", "dequant") + (("affine",) if ggml_type == Q8_0 else ()):
            y = matmul(mx.array(x), qt, mode=mode)
            assert y.dtype == mx.float32
            assert_matmul_close(y, x, w)


def test_matmul_row_tiles(monkeypatch) -> None:
    qt, w = make_qtensor(Q4_K, (37, 256), seed=10)
    monkeypatch.setattr(quants, "TILE_BYTES", 8 * 256 * 4)  # 8-row tiles, ragged last one
    x = np.random.default_rng(11).standard_normal((4, 256)).astype(np.float32)
    assert_matmul_close(matmul(mx.array(x), qt, mode="dequant"), x, w)


def test_matmul_half_precision_and_plain_weights() -> None:
    qt, w = make_qtensor(Q8_0, (16, 256), seed=12)
    x = np.random.default_rng(13).standard_normal((2, 256)).astype(np.float16)
    y = matmul(mx.array(x), qt)
    assert y.dtype == mx.float16
    assert_matmul_close(y, x.astype(np.float32), w)
    y2 = matmul(mx.array(x.astype(np.float32)), mx.array(w))
    assert_matmul_close(y2, x.astype(np.float32), w)
    with pytest.raises(QuantError, match="does not match"):
        matmul(mx.zeros((2, 128)), qt)
    with pytest.raises(QuantError, match="mode"):
        matmul(mx.zeros((2, 256)), qt, mode="fast")


def test_matmul_auto_uses_affine_only_for_single_float32_rows(monkeypatch) -> None:
    qt, w = make_qtensor(Q8_0, (8, 64), seed=16)
    calls = []
    real = quants.q8_0_to_affine
    monkeypatch.setattr(quants, "q8_0_to_affine", lambda t: calls.append(t) or real(t))
    for shape, dtype, affine in [((1, 64), mx.float32, True), ((64,), mx.float32, True),
                                 ((2, 64), mx.float32, False), ((1, 64), mx.float16, False)]:
        calls.clear()
        y = matmul(mx.ones(shape, dtype=dtype), qt)
        assert bool(calls) == affine and y.shape == (*shape[:-1], 8)
    q4, _ = make_qtensor(Q4_K, (2, 256), seed=17)
    calls.clear()
    matmul(mx.ones((1, 256)), q4)
    assert not calls


def test_q8_0_to_affine_reconstructs_the_weight() -> None:
    qt, w = make_qtensor(Q8_0, (8, 128), seed=14)
    w_q, scales, biases = q8_0_to_affine(qt)
    assert w_q.dtype == mx.uint32 and w_q.shape == (8, 32) and scales.shape == (8, 4)
    back = np.asarray(mx.dequantize(w_q, scales, biases, group_size=32, bits=8))
    assert np.array_equal(back, w)  # exact values (a zero's sign may differ)
    with pytest.raises(QuantError, match="Q8_0"):
        q8_0_to_affine(make_qtensor(Q4_K, (2, 256), seed=15)[0])


# --- benchmark (pytest -m bench tests/test_quants.py); dequant rates are `workbench bench` figures ---

def _best_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.bench
@pytest.mark.parametrize("rows", [1, 16, 512])
def test_bench_q8_0_matmul_auto_picks_a_fast_path(rows: int) -> None:
    """x @ W.T for a [4096, 4096] Q8_0 weight: ``mode="auto"`` runs at least half the rate
    of the faster of its two paths (dequantize + float32 matmul, or MLX affine 8-bit)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 4096)).astype(np.float32) * 0.02
    qt = QTensor(mx.array(ref_quantize(w, GGMLQuantizationType.Q8_0)), Q8_0, (4096, 4096))
    x = mx.array(rng.standard_normal((rows, 4096)).astype(np.float32))
    mx.eval(x)
    seconds = {mode: _best_seconds(lambda: mx.eval(matmul(x, qt, mode=mode)))
               for mode in ("dequant", "affine", "auto")}
    best = min(seconds["dequant"], seconds["affine"])
    assert seconds["auto"] <= 2 * best, seconds


@pytest.mark.parametrize("ggml_type", QUANTS + [F16, BF16], ids=lambda t: GGML_TYPES[t].name)
@pytest.mark.parametrize("m", [1, 3, 8, 13])
def test_native_qmv_matches_float64(ggml_type: int, m: int) -> None:
    """The few-row kernel on blocks: x @ W.T within float32 rounding of the float64 product."""
    if not quants.native_available():
        pytest.skip("native kernels not built (make native)")
    rng = np.random.default_rng(200 + ggml_type + m)
    t = GGML_TYPES[ggml_type]
    n_in, n_out = 2 * 4096 + 512, 40  # more than one 4,096-element span per row
    if t.block_elems == 1:
        raw = rng.standard_normal((n_out, n_in)).astype(np.float16 if ggml_type == F16 else np.float32)
        raw = raw.view(np.uint8) if ggml_type == F16 else (raw.view("<u4") >> 16).astype("<u2").view(np.uint8)
    else:
        raw = random_blocks(ggml_type, n_out * n_in // t.block_elems, rng, True).reshape(n_out, -1)
    x = rng.standard_normal((m, n_in)).astype(np.float32)
    w = reference(raw, ggml_type).astype(np.float64)
    want = x.astype(np.float64) @ w.T
    for w_raw in (raw, mx.array(raw)):  # read in place from NumPy (a mapped file), or an MLX array
        got = np.asarray(quants.qmv(mx.array(x), QTensor(w_raw, ggml_type, (n_out, n_in))))
        assert got.shape == (m, n_out)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("ggml_type", QUANTS, ids=lambda t: GGML_TYPES[t].name)
def test_native_grouped_qmv_is_block_diagonal(ggml_type: int) -> None:
    """x [G, m, in]: output row o is group o // (out / G) of x times row o of W."""
    if not quants.native_available():
        pytest.skip("native kernels not built (make native)")
    rng = np.random.default_rng(400 + ggml_type)
    n_in, n_out, groups = 512, 32, 4
    raw = random_blocks(ggml_type, n_out * n_in // GGML_TYPES[ggml_type].block_elems, rng, True).reshape(n_out, -1)
    x = rng.standard_normal((groups, 2, n_in)).astype(np.float32)
    w = reference(raw, ggml_type).astype(np.float64).reshape(groups, n_out // groups, n_in)
    want = np.concatenate([x[g].astype(np.float64) @ w[g].T for g in range(groups)], axis=1)
    got = np.asarray(quants.qmv(mx.array(x), QTensor(raw, ggml_type, (n_out, n_in))))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_native_affine8_qmv_matches_float64() -> None:
    if not quants.native_available():
        pytest.skip("native kernels not built (make native)")
    rng = np.random.default_rng(300)
    raw = random_blocks(Q8_0, 24 * 4096 // 32, rng, True).reshape(24, -1)
    wq, scales, biases = q8_0_to_affine(QTensor(raw, Q8_0, (24, 4096)))
    x = rng.standard_normal((2, 4096)).astype(np.float32)
    want = x.astype(np.float64) @ reference(raw, Q8_0).astype(np.float64).T
    got = np.asarray(quants.affine8_qmv(mx.array(x), wq, scales, biases))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
