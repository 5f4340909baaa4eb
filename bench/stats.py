"""Intervals and paired tests for per-image quality values, so a row says how sure its numbers are.

Why these three: accuracies are proportions of N images, for which the Wilson interval keeps its coverage at
small N and near 0 or 1 (the normal interval does not); other per-image means (CLIP score, PSNR, SSIM) get a
seeded percentile bootstrap; and every setting uses the baseline's prompts and seeds, so image i of a row and
image i of FP32 form a pair: a sign-flip permutation test of the mean paired difference is exact under the
null "compression does not change the expected value" without assuming normality. All are checked against
scipy.stats in tests/test_stats.py.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05  # a row "differs" from the baseline when p < ALPHA
BOOTSTRAP_RESAMPLES = 2000
PERMUTATION_RESAMPLES = 10_000


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (as scipy's `binomtest(...).proportion_ci("wilson")`)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes}/{n}")
    z, p = _z(confidence), successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _as_array(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(x) == 0:
        raise ValueError("no values")
    return x


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean; None when it is undefined (n < 2 or a non-finite value)."""
    x = _as_array(values)
    if len(x) < 2 or not np.isfinite(x).all():
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_permutation_p(
    values: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    resamples: int = PERMUTATION_RESAMPLES,
    seed: int = 0,
) -> float | None:
    """Two-sided p-value that mean(values - baseline) is 0, by randomly flipping the sign of each pair's difference.

    Exact (all 2^n flips) when 2^n <= resamples, else Monte Carlo with the +1 correction; two-sided as
    scipy's `permutation_test` (twice the smaller one-sided p, at most 1). None when undefined (a non-finite
    value, or lengths that differ: the pairs must be the same prompts and seeds).
    """
    x, y = _as_array(values), _as_array(baseline)
    if len(x) != len(y) or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    d = x - y
    observed = d.mean()
    if 2 ** len(d) <= resamples:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        adjust = 0
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(resamples, len(d)))
        adjust = 1
    null = (signs * d).mean(axis=1)
    tol = max(abs(observed), 1.0) * 1e-12  # float noise must not split ties (e.g. binary differences)
    greater = ((null >= observed - tol).sum() + adjust) / (len(null) + adjust)
    less = ((null <= observed + tol).sum() + adjust) / (len(null) + adjust)
    return float(min(1.0, 2 * min(greater, less)))


def summarize(
    values: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray | None,
    kind: str,
    seed: int = 0,
) -> dict[str, float | None]:
    """{ci_low, ci_high, p} of one per-image column: Wilson for kind "proportion" (0/1 values), else bootstrap.

    p is the paired test vs `baseline` (None without a baseline).
    """
    x = _as_array(values)
    if kind == "proportion":
        if not np.isin(x, (0.0, 1.0)).all():
            raise ValueError("a proportion needs 0/1 values")
        ci: tuple[float, float] | None = wilson_interval(int(x.sum()), len(x))
    elif kind == "mean":
        ci = bootstrap_ci(x, seed=seed)
    else:
        raise ValueError(f"kind must be 'proportion' or 'mean', got {kind!r}")
    p = paired_permutation_p(x, baseline, seed=seed) if baseline is not None else None
    return {"ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None, "p": p}
