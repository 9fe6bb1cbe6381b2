"""Slice statistics against hand-computed values and SciPy: Wilson intervals, exact tails, tests, FDR control."""

import numpy as np
import pytest
from scipy import stats

from lightning_lens.slices import (
    adjust_pvalues,
    fisher_greater,
    g_test_greater,
    hypergeom_sf,
    welch_greater,
    wilson_interval,
)


def test_wilson_interval_hand_values():
    z = 1.959963984540054
    # k = 0: the interval is [0, z^2 / (n + z^2)].
    low, high = wilson_interval(0, 30)
    assert low == 0.0 and high == pytest.approx(z * z / (30 + z * z), rel=1e-12)
    # k = n mirrors it.
    low, high = wilson_interval(30, 30)
    assert high == 1.0 and low == pytest.approx(30 / (30 + z * z), rel=1e-12)
    # k = 5, n = 10: centre 0.5, half-width z / (1 + z^2/n) * sqrt(0.025 + z^2/400).
    low, high = wilson_interval(5, 10)
    half = z / (1 + z * z / 10) * np.sqrt(0.25 / 10 + z * z / 400)
    assert (low, high) == (pytest.approx(0.5 - half, rel=1e-12), pytest.approx(0.5 + half, rel=1e-12))
    assert round(float(low), 4) == 0.2366  # the textbook value


def test_wilson_interval_matches_formula_vectorized_and_other_levels():
    k = np.array([1, 7, 40, 99])
    n = np.array([10, 20, 200, 100])
    low, high = wilson_interval(k, n, confidence=0.9)
    z = stats.norm.ppf(0.95)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    np.testing.assert_allclose(low, centre - half, rtol=1e-12)
    np.testing.assert_allclose(high, centre + half, rtol=1e-12)
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(1, 0)


def test_hypergeom_sf_matches_scipy_everywhere():
    rng = np.random.default_rng(0)
    N = rng.integers(2, 3000, 4000)
    K = rng.integers(0, N + 1)
    n = rng.integers(0, N + 1)
    lo, hi = np.maximum(0, n - (N - K)), np.minimum(n, K)
    k = rng.integers(lo - 1, hi + 2)
    ours = hypergeom_sf(k, N, K, n)
    ref = stats.hypergeom.sf(k - 1, N, K, n)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-14)


def test_hypergeom_sf_stop_above_is_exact_below_and_a_lower_bound_above():
    rng = np.random.default_rng(1)
    N, K = 10_000, 1_800
    n = rng.integers(30, 4000, 3000)
    k = rng.binomial(n, 0.18 + rng.normal(0, 0.04, n.size).clip(-0.15, 0.3))
    exact = stats.hypergeom.sf(k - 1, N, K, n)
    fast = hypergeom_sf(k, N, K, n, stop_above=0.1)
    small = exact <= 0.1
    assert small.any() and (~small).any()
    np.testing.assert_allclose(fast[small], exact[small], rtol=1e-9, atol=1e-300)
    assert np.all(fast[~small] > 0.1) and np.all(fast[~small] <= exact[~small] + 1e-9)


def test_fisher_greater_equals_scipy_fisher_exact():
    rng = np.random.default_rng(2)
    for _ in range(200):
        n = int(rng.integers(20, 400))
        s = int(rng.integers(1, n))
        total = int(rng.integers(0, n + 1))
        k = int(rng.integers(max(0, s - (n - total)), min(s, total) + 1))
        table = [[k, s - k], [total - k, n - s - (total - k)]]
        ref = stats.fisher_exact(table, alternative="greater").pvalue
        assert float(fisher_greater(k, s, total, n)) == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_g_test_greater_matches_scipy_log_likelihood_ratio():
    for k, s, total, n in [(30, 100, 150, 1000), (5, 100, 150, 1000), (12, 40, 60, 500)]:
        table = np.array([[k, s - k], [total - k, n - s - (total - k)]])
        g, p_two, _, _ = stats.chi2_contingency(table, correction=False, lambda_="log-likelihood")
        higher = k / s > (total - k) / (n - s)
        expected = p_two / 2 if higher else 1 - p_two / 2
        assert float(g_test_greater(k, s, total, n)) == pytest.approx(expected, rel=1e-9)


def test_welch_greater_matches_scipy_ttest_ind():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.2, 1.0, 40), rng.normal(1.0, 2.0, 300)
    ref = stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue
    ours = welch_greater(a.mean(), a.var(ddof=1), a.size, b.mean(), b.var(ddof=1), b.size)
    assert float(ours) == pytest.approx(ref, rel=1e-9)
    # Zero variance on both sides: decided by the means, not NaN.
    assert float(welch_greater(2.0, 0.0, 5, 1.0, 0.0, 5)) == 0.0
    assert float(welch_greater(1.0, 0.0, 5, 1.0, 0.0, 5)) == 1.0


def test_adjust_pvalues_hand_example_and_scipy():
    # BH by hand: sorted p = (0.01, 0.03, 0.04), m = 3 -> (0.03, 0.045, 0.04) -> step-up min -> (0.03, 0.04, 0.04).
    np.testing.assert_allclose(adjust_pvalues([0.01, 0.04, 0.03]), [0.03, 0.04, 0.04])
    # BY multiplies by 1 + 1/2 + 1/3 before the step-up.
    c = 1 + 1 / 2 + 1 / 3
    np.testing.assert_allclose(adjust_pvalues([0.01, 0.04, 0.03], "by"), np.minimum([0.03 * c, 0.04 * c, 0.04 * c], 1))
    rng = np.random.default_rng(4)
    p = rng.uniform(size=500) ** 4
    for method in ("bh", "by"):
        np.testing.assert_allclose(adjust_pvalues(p, method), stats.false_discovery_control(p, method=method),
                                   rtol=1e-12)
    with pytest.raises(ValueError, match="method must be"):
        adjust_pvalues(p, "holm")
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        adjust_pvalues([0.5, 1.5])
