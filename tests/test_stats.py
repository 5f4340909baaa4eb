"""bench.stats against scipy.stats (the outside reference), with stated tolerances."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from bench.stats import bootstrap_ci, paired_permutation_p, summarize, wilson_interval


@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 16), (3, 16), (10, 64), (37, 64), (64, 64), (1, 5000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(k: int, n: int, confidence: float) -> None:
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    low, high = wilson_interval(k, n, confidence)
    assert low == pytest.approx(ref.low, abs=1e-12)
    assert high == pytest.approx(ref.high, abs=1e-12)


def test_wilson_rejects_bad_counts() -> None:
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_bootstrap_matches_scipy_percentile(seed: int) -> None:
    """Both are Monte Carlo with different generators: bounds agree within 5 % of the interval width."""
    x = np.random.default_rng(seed).gamma(2.0, 3.0, size=64)  # skewed, like PSNR or CLIP-score spreads
    ref = sps.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile", rng=seed)
    low, high = bootstrap_ci(x, resamples=20_000, seed=seed)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert abs(low - ref.confidence_interval.low) < 0.05 * width
    assert abs(high - ref.confidence_interval.high) < 0.05 * width
    assert low < x.mean() < high


def test_bootstrap_undefined_cases() -> None:
    assert bootstrap_ci([1.0]) is None
    assert bootstrap_ci([1.0, float("inf"), 2.0]) is None  # an image identical to FP32 has PSNR inf


def _scipy_paired_p(x: np.ndarray, y: np.ndarray, n_resamples: float) -> float:
    def statistic(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
        return np.mean(a - b, axis=axis)

    res = sps.permutation_test(
        (x, y), statistic, permutation_type="samples", n_resamples=n_resamples, vectorized=True, rng=0
    )
    return float(res.pvalue)


@pytest.mark.parametrize("binary", [False, True])
def test_paired_exact_equals_scipy(binary: bool) -> None:
    """n = 10: both enumerate all 2^10 sign flips, so the p-values are identical."""
    rng = np.random.default_rng(3)
    if binary:
        x, y = (rng.random(10) < 0.3).astype(float), (rng.random(10) < 0.7).astype(float)
    else:
        y = rng.normal(size=10)
        x = y + rng.normal(0.5, 1.0, size=10)
    assert paired_permutation_p(x, y) == pytest.approx(_scipy_paired_p(x, y, np.inf), abs=1e-12)


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_paired_monte_carlo_close_to_scipy(shift: float) -> None:
    """n = 64: Monte Carlo on both sides (10^4 resamples each); agree within 0.03 (a few MC standard errors)."""
    rng = np.random.default_rng(5)
    y = rng.normal(size=64)
    x = y + rng.normal(shift, 1.0, size=64)
    ours, ref = paired_permutation_p(x, y), _scipy_paired_p(x, y, 10_000)
    assert abs(ours - ref) < 0.03


def test_paired_detects_a_real_drop_and_not_identity() -> None:
    rng = np.random.default_rng(7)
    base = (rng.random(64) < 0.8).astype(float)
    worse = base * (rng.random(64) < 0.5)  # half the correct images become wrong
    assert paired_permutation_p(worse, base) < 0.001
    assert paired_permutation_p(base, base) == 1.0
    assert paired_permutation_p(base[:10], base) is None  # pairs must line up


def test_summarize_kinds() -> None:
    acc = summarize([1, 0, 1, 1], [1, 1, 1, 1], "proportion")
    ref = sps.binomtest(3, 4).proportion_ci(method="wilson")
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx((ref.low, ref.high))
    assert acc["p"] == pytest.approx(1.0)  # one discordant pair of 4: nowhere near significant
    assert summarize([1.0, 2.0, 3.0], None, "mean")["p"] is None
    with pytest.raises(ValueError):
        summarize([0.5, 1.0], None, "proportion")


def test_interval_fields_pair_only_images_applicable_in_both_rows() -> None:
    from bench.metrics.base import interval_fields

    nan = float("nan")
    intervals = {"acc": ("proportion", True), "psnr": ("mean", False)}
    row = {"acc": [1, 0, nan, 1, 1], "psnr": [20.0, 21.0, 22.0, 23.0, 24.0]}
    base = {"acc": [1, 1, nan, 1, nan]}
    out = interval_fields(intervals, row, base)
    ref = sps.binomtest(3, 4).proportion_ci(method="wilson")  # NaN in this row only drops image 2 from the CI
    assert (out["acc_ci_low"], out["acc_ci_high"]) == pytest.approx((ref.low, ref.high))
    assert out["acc_p"] == paired_permutation_p([1, 0, 1], [1, 1, 1])  # images 0, 1, 3 are in both rows
    assert "psnr_p" not in out and out["psnr_ci_low"] < 22.0 < out["psnr_ci_high"]
