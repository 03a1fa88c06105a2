"""QAT simulations: FP8 E4M3 and FP4 E2M1 on hand-computed values, ties to even; Hadamard."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from workbench.model.qat import e2m1_round, e4m3_round, fp4_e2m1_sim, fp8_e4m3_sim, hadamard


def test_e4m3_round_ties_to_even_code() -> None:
    # 1.0625 is halfway between 1.0 (mantissa 0) and 1.125 (mantissa 1): even wins -> 1.0
    # 1.1875 halfway between 1.125 (m1) and 1.25 (m2) -> 1.25; 17 between 16 and 18 -> 16;
    # 232 between 224 (m6) and 240 (m7) -> 224; 1.9375 between 1.875 (m7) and 2.0 -> 2.0
    y = mx.array([1.0625, 1.1875, 17.0, 19.0, 232.0, 1.9375, -1.0625, 448.0])
    want = [1.0, 1.25, 16.0, 20.0, 224.0, 2.0, -1.0, 448.0]
    assert np.array(e4m3_round(y)).tolist() == want


def test_e4m3_subnormals_step_2_pow_minus_9() -> None:
    s = 2.0**-9
    y = mx.array([0.5 * s, 1.5 * s, 2.5 * s, 3.4 * s, 2.0**-6 + 0.5 * 2.0**-9])
    # 0.5 -> 0 (even), 1.5 -> 2 (even), 2.5 -> 2, 3.4 -> 3; 2^-6 is normal with step 2^-9
    assert np.array(e4m3_round(y)).tolist() == [0.0, 2 * s, 2 * s, 3 * s, 2.0**-6]


def test_fp8_block_scale_is_power_of_two() -> None:
    # block amax 1000 -> s = 2^ceil(log2(1000/448)) = 4; 1000/4 = 250 -> 256 (step 16 in
    # [128, 256)); 3/4 = 0.75 exact; 0.1/4 = 0.025 lies in [2^-6, 2^-5), step 2^-9:
    # 12.8 steps -> 13 -> 13·2^-9·4 = 0.1015625
    x = mx.array([[1000.0, 3.0, 0.1] + [0.0] * 61])
    y = np.array(fp8_e4m3_sim(x))[0]
    assert y[:3].tolist() == [1024.0, 3.0, 0.1015625]
    # blocks are independent: a second block of small values keeps its own fine scale
    x2 = mx.array([[1000.0] + [0.0] * 63 + [0.01] + [0.0] * 63])
    assert np.array(fp8_e4m3_sim(x2))[0, 64] == pytest.approx(0.01, rel=2**-4)


def test_fp8_amax_floor() -> None:
    # amax floored at 1e-4: s = 2^ceil(log2(1e-4/448)) = 2^-22; tiny inputs keep 3 mantissa bits
    x = mx.array([[3e-6] + [0.0] * 63])
    s = 2.0**-22  # 3e-6 / s = 12.58 -> binade [8, 16), step 1 -> 13
    assert np.array(fp8_e4m3_sim(x))[0, 0] == pytest.approx(13 * s)


def test_e2m1_round_ties_to_even_index() -> None:
    y = mx.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.5, 0.3, 6.0])
    assert np.array(e2m1_round(y)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0, 0.5, 6.0]


def test_fp4_block_scale() -> None:
    # amax 12 -> s = 2^ceil(log2(2)) = 2; 12/2 = 6; 5/2 = 2.5 -> 2 (tie to even) -> 4;
    # 1.4/2 = 0.7 -> 0.5 -> 1.0
    x = mx.array([[12.0, 5.0, 1.4] + [0.0] * 29])
    assert np.array(fp4_e2m1_sim(x))[0, :3].tolist() == [12.0, 4.0, 1.0]


def test_hadamard_sylvester_order_and_scale() -> None:
    h = np.array(hadamard(mx.eye(8)))
    i = np.arange(8)
    parity = np.array([[bin(a & b).count("1") & 1 for b in i] for a in i])
    np.testing.assert_allclose(h, (1 - 2 * parity) / np.sqrt(8), atol=1e-7)
    x = mx.random.normal((3, 128))
    np.testing.assert_allclose(np.array(hadamard(hadamard(x))), np.array(x), atol=1e-5)
