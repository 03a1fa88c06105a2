"""Samplers: greedy, temperature, top-k, top-p and min-p relative to the top token."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.sampling import Sampler, SamplingError, greedy, log_softmax, top_tokens


def _logits(p: list[float]) -> np.ndarray:
    return np.log(np.array(p, dtype=np.float64))


def test_greedy_and_temperature_zero() -> None:
    x = _logits([0.1, 0.5, 0.4])
    assert greedy(x) == 1
    assert Sampler(temperature=0.0)(x) == 1
    assert Sampler(temperature=-1.0, seed=3)(x) == 1
    assert greedy(np.array([1.0, 3.0, 3.0])) == 1  # ties: lower id


def test_ds4_defaults() -> None:
    s = Sampler()
    assert (s.temperature, s.top_p, s.min_p, s.top_k) == (1.0, 1.0, 0.05, 0)


def test_min_p_is_relative_to_the_top_token() -> None:
    # top prob 0.5: min_p 0.2 keeps p >= 0.1 -> drops 0.05 and 0.04, keeps 0.1 (boundary)
    p = [0.5, 0.31, 0.1, 0.05, 0.04]
    q = Sampler(min_p=0.2).probabilities(_logits(p))
    assert (q > 0).tolist() == [True, True, True, False, False]
    np.testing.assert_allclose(q[:3], np.array(p[:3]) / sum(p[:3]))


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    p = [0.4, 0.3, 0.2, 0.1]
    assert (Sampler(top_p=0.65, min_p=0).probabilities(_logits(p)) > 0).tolist() == [True, True, False, False]
    assert (Sampler(top_p=0.7, min_p=0).probabilities(_logits(p)) > 0).tolist() == [True, True, False, False]
    assert (Sampler(top_p=0.71, min_p=0).probabilities(_logits(p)) > 0).tolist() == [True, True, True, False]


def test_top_k_and_temperature() -> None:
    p = [0.1, 0.4, 0.3, 0.2]
    q = Sampler(top_k=2, min_p=0).probabilities(_logits(p))
    assert (q > 0).tolist() == [False, True, True, False]
    hot = Sampler(temperature=2.0, min_p=0).probabilities(_logits(p))
    want = np.sqrt(p) / np.sqrt(p).sum()
    np.testing.assert_allclose(hot, want)


def test_seeded_sampling_is_reproducible_and_follows_the_distribution() -> None:
    x = _logits([0.6, 0.3, 0.1])
    a = [Sampler(seed=5, min_p=0)(x) for _ in range(3)]
    s1, s2 = Sampler(seed=5, min_p=0), Sampler(seed=5, min_p=0)
    draws1 = [s1(x) for _ in range(2000)]
    assert draws1[:50] == [s2(x) for _ in range(50)]
    freq = np.bincount(draws1, minlength=3) / 2000
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.04)
    assert len(set(a)) == 1  # same seed, first draw


def test_bad_parameters_raise() -> None:
    with pytest.raises(SamplingError):
        Sampler(top_p=0.0)
    with pytest.raises(SamplingError):
        Sampler(min_p=1.5)
    with pytest.raises(SamplingError):
        Sampler(top_k=-1)


def test_top_tokens_and_log_softmax() -> None:
    x = np.array([0.0, 2.0, 1.0, 2.0])
    lp = log_softmax(x)
    assert np.exp(lp).sum() == pytest.approx(1.0)
    top = top_tokens(x, 3)
    assert [i for i, _ in top] == [1, 3, 2]
    assert top[0][1] == pytest.approx(np.exp(lp[1]))
