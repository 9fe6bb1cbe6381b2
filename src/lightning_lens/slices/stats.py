"""Vectorized statistics for slices: Wilson intervals, one-sided Fisher exact / G / Welch tests, FDR control.

Everything takes and returns NumPy arrays so thousands of candidate slices are scored in one call. The Fisher test
sums the hypergeometric tail with the pmf ratio recurrence (stopping once the rest is negligible): exact to ~1e-10
relative (the log-binomial normaliser limits it) and 5-10x faster than ``scipy.stats.hypergeom.sf`` on the same
arrays, more when only tails below a level matter (``stop_above``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import special, stats

from lightning_lens.utils.checks import check_choice, check_float

__all__ = [
    "adjust_pvalues",
    "fisher_greater",
    "g_test_greater",
    "hypergeom_sf",
    "welch_greater",
    "wilson_interval",
]

_Z95 = 1.959963984540054


def wilson_interval(successes, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion ``successes / n`` (vectorized).

    Args:
        successes: counts (array-like).
        n: trials (array-like, > 0).
        confidence: two-sided level.

    Returns:
        ``(low, high)`` arrays.

    Example:
        >>> low, high = wilson_interval(5, 10)
        >>> round(float(low), 4), round(float(high), 4)
        (0.2366, 0.7634)
    """
    check_float(confidence, "confidence", minimum=0.0, maximum=1.0, open_min=True, open_max=True)
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(n <= 0):
        raise ValueError("n must be positive for a Wilson interval")
    z = _Z95 if confidence == 0.95 else float(stats.norm.ppf(0.5 + confidence / 2.0))
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z / denom * np.sqrt(np.maximum(p * (1.0 - p) / n + z * z / (4.0 * n * n), 0.0))
    low = np.where(k <= 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    high = np.where(k >= n, 1.0, np.clip(centre + half, 0.0, 1.0))
    return low, high


def _log_choose(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    return special.gammaln(n + 1.0) - special.gammaln(k + 1.0) - special.gammaln(n - k + 1.0)


def hypergeom_sf(k, total, successes, draws, tol: float = 1e-15, stop_above: Optional[float] = None) -> np.ndarray:
    """``P(X >= k)`` for ``X ~ Hypergeometric(total, successes, draws)``, vectorized and exact.

    Sums pmf terms from ``k`` upwards (``k`` above the mode) or ``1 - P(X <= k - 1)`` summed downwards (``k`` at or
    below the mode), so every sum runs away from the mode over decreasing terms and stops when the remainder is below
    ``tol`` of the sum.

    Args:
        k, total, successes, draws: broadcastable arrays.
        tol: relative size of the neglected remainder.
        stop_above: if given, a tail known to exceed this is not summed further: the value returned is then only a
            lower bound that is ``> stop_above`` (enough for decisions at levels below it, and much faster).

    Example:
        >>> float(hypergeom_sf(3, 10, 4, 5).round(6))  # scipy.stats.hypergeom.sf(2, 10, 4, 5)
        0.261905
    """
    k, N, K, n = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (k, total, successes, draws)))
    shape = k.shape
    k, N, K, n = (a.ravel().copy() for a in (k, N, K, n))
    if np.any((K < 0) | (K > N) | (n < 0) | (n > N)):
        raise ValueError("hypergeom_sf needs 0 <= successes <= total and 0 <= draws <= total")
    lo = np.maximum(0.0, n - (N - K))
    hi = np.minimum(n, K)
    out = np.empty_like(k)
    out[k <= lo] = 1.0
    out[k > hi] = 0.0
    todo = (k > lo) & (k <= hi)
    if np.any(todo):
        mode = np.floor((n + 1.0) * (K + 1.0) / (N + 2.0))
        log_norm = _log_choose(N, n)
        exact = todo.copy()
        if stop_above is not None:
            # Sum upwards from k, or (k at/below the mode) from one s.d. below the mode: a subset of the tail's terms,
            # so the partial sum is a lower bound; stop as soon as it exceeds stop_above.
            i = np.flatnonzero(todo)
            sd = np.sqrt(n[i] * K[i] / N[i] * (N[i] - K[i]) / N[i] * (N[i] - n[i]) / np.maximum(N[i] - 1.0, 1.0))
            x0 = np.where(k[i] > mode[i], k[i], np.maximum(k[i], mode[i] - np.ceil(sd)))
            value, stopped = _tail_sum(x0, N[i], K[i], n[i], lo[i], hi[i], log_norm[i], True, tol, stop_above)
            settled = stopped | (x0 == k[i])
            out[i[settled]] = value[settled]
            exact[:] = False
            exact[i[~settled]] = True
        up = exact & (k > mode)
        down = exact & ~up
        if np.any(up):
            i = np.flatnonzero(up)
            out[i] = _tail_sum(k[i], N[i], K[i], n[i], lo[i], hi[i], log_norm[i], True, tol)[0]
        if np.any(down):
            i = np.flatnonzero(down)
            cdf = _tail_sum(k[i] - 1.0, N[i], K[i], n[i], lo[i], hi[i], log_norm[i], False, tol)[0]
            out[i] = np.clip(1.0 - cdf, 0.0, 1.0)
    return out.reshape(shape) if shape else out[0]


def _tail_sum(
    start, N, K, n, lo, hi, log_norm, upward: bool, tol: float, stop_above: Optional[float] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of pmf(x) for x from ``start`` upward (to ``hi``) or downward (to ``lo``); also which sums were cut short
    because they exceeded ``stop_above``.

    Works in blocks of terms (a cumulative product of pmf ratios) whose length doubles each round: most tails end
    within a few terms, the slow ones (start near the mode of a large slice) take a handful of long rounds.
    """
    log_first = _log_choose(K, start) + _log_choose(N - K, n - start) - log_norm
    # Accumulate relative to the first term and rescale at the end (the first term may be ~1e-300).
    rel_sum = np.ones_like(start)
    term = np.ones_like(start)
    stopped = np.zeros(start.size, dtype=bool)
    x = start.copy()
    active = np.arange(start.size)
    direction = 1.0 if upward else -1.0
    block = 4
    while active.size:
        steps = np.arange(block, dtype=np.float64)
        xa = x[active][:, None] + direction * steps[None, :]  # the x whose ratio to the next term we need
        Ka, na, Na = K[active][:, None], n[active][:, None], N[active][:, None]
        if upward:
            ratio = (Ka - xa) * (na - xa) / ((xa + 1.0) * (Na - Ka - na + xa + 1.0))
            ratio = np.where(xa >= hi[active][:, None], 0.0, ratio)
        else:
            ratio = xa * (Na - Ka - na + xa) / ((Ka - xa + 1.0) * (na - xa + 1.0))
            ratio = np.where(xa <= lo[active][:, None], 0.0, ratio)
        terms = term[active][:, None] * np.cumprod(ratio, axis=1)
        rel_sum[active] += terms.sum(axis=1)
        last = terms[:, -1]
        term[active] = last
        x[active] += direction * block
        # Past the mode terms shrink geometrically: remaining <= term * r / (1 - r) with r the last ratio (before
        # the mode r >= 1 and the bound never fires).
        r = np.minimum(ratio[:, -1], 1.0 - 1e-12)
        done = (last == 0.0) | (last * r / (1.0 - r) < tol * rel_sum[active])
        if stop_above is not None:
            over = np.exp(log_first[active] + np.log(rel_sum[active])) > stop_above
            stopped[active[over & ~done]] = True
            done |= over
        active = active[~done]
        block = min(2 * block, 1024)
    with np.errstate(divide="ignore"):
        return np.minimum(np.exp(log_first + np.log(rel_sum)), 1.0), stopped


def fisher_greater(errors_in, size_in, errors_total, size_total, stop_above: Optional[float] = None) -> np.ndarray:
    """One-sided Fisher exact p-value that a slice's error rate exceeds the rest's (vectorized).

    The 2x2 table is (slice, rest) x (error, correct); under the null the slice's error count is hypergeometric.
    Equals ``scipy.stats.fisher_exact(table, alternative="greater").pvalue`` (see :func:`hypergeom_sf` for
    ``stop_above``).

    Example:
        >>> f"{float(fisher_greater(8, 10, 20, 100)):.4e}"  # table [[8, 2], [12, 78]]
        '2.3783e-05'
    """
    return hypergeom_sf(errors_in, size_total, errors_total, size_in, stop_above=stop_above)


def g_test_greater(errors_in, size_in, errors_total, size_total) -> np.ndarray:
    """One-sided G-test (log-likelihood ratio, 1 d.o.f.) p-value that the slice's error rate exceeds the rest's."""
    k = np.asarray(errors_in, dtype=np.float64)
    s = np.asarray(size_in, dtype=np.float64)
    E = np.asarray(errors_total, dtype=np.float64)
    n = np.asarray(size_total, dtype=np.float64)
    observed = np.stack([k, s - k, E - k, (n - s) - (E - k)])
    row = np.stack([s, s, n - s, n - s])
    col = np.stack([E, n - E, E, n - E])
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = row * col / n
        terms = np.where(observed > 0, observed * np.log(observed / expected), 0.0)
    g = np.maximum(2.0 * terms.sum(axis=0), 0.0)
    half = 0.5 * stats.chi2.sf(g, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        higher = k / np.maximum(s, 1) > (E - k) / np.maximum(n - s, 1)
    return np.where(higher, half, 1.0 - half)


def welch_greater(mean_in, var_in, size_in, mean_out, var_out, size_out) -> np.ndarray:
    """One-sided Welch t-test p-value that the slice's mean (loss) exceeds the rest's (vectorized)."""
    m1, v1, n1, m2, v2, n2 = (np.asarray(a, dtype=np.float64) for a in (mean_in, var_in, size_in, mean_out,
                                                                         var_out, size_out))
    a, b = v1 / n1, v2 / n2
    se2 = a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (m1 - m2) / np.sqrt(se2)
        df = se2 * se2 / (a * a / np.maximum(n1 - 1, 1) + b * b / np.maximum(n2 - 1, 1))
    p = stats.t.sf(t, np.where(np.isfinite(df) & (df > 0), df, 1.0))
    # Zero variance on both sides: the means decide (a difference is then certain, equality is not evidence).
    degenerate = ~np.isfinite(t)
    p = np.where(degenerate, np.where(m1 > m2, 0.0, 1.0), p)
    return p


def adjust_pvalues(p_values, method: str = "bh") -> np.ndarray:
    """Benjamini-Hochberg (``"bh"``) or Benjamini-Yekutieli (``"by"``, valid under any dependence) q-values.

    Matches ``scipy.stats.false_discovery_control``.

    Example:
        >>> adjust_pvalues([0.01, 0.04, 0.03]).round(3).tolist()
        [0.03, 0.04, 0.04]
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D, got shape {p.shape}")
    check_choice(method, "method", ("bh", "by"))
    if np.any((p < 0) | (p > 1) | np.isnan(p)):
        raise ValueError("p_values must lie in [0, 1]")
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    if method == "by":
        scaled *= np.sum(1.0 / np.arange(1, m + 1))
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q
