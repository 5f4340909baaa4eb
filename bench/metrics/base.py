"""The one small interface between the sweep runner and a quality metric.

A metric sees the images of one setting (same prompts and seeds in every setting), the prompts, and the
images the uncompressed model made for them; it returns named values for the CSV row. Metrics whose
weights are missing offline report `unavailable()` (one line: how to enable them) and leave their
columns empty. `protocol()` is stored in the manifest and the row so every number carries how it was made.

Per-image values: `compute()` may also return `{PER_IMAGE: {column: [N] values}}` (NaN = not applicable to that
image) for the columns in `intervals`; `interval_fields` turns them into a 95 % interval per column and, where
the column is paired, a p-value against the baseline's per-image values (same prompts and seeds). Columns:
`<col>_ci_low`, `<col>_ci_high`, `<col>_p` (see `interval_columns`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from .. import stats

PER_IMAGE = "per_image"


class Metric:
    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]  # the CSV columns this metric fills
    # column -> (kind, paired): "proportion" (0/1 per image: Wilson) or "mean" (bootstrap); paired: test vs baseline
    intervals: ClassVar[dict[str, tuple[str, bool]]] = {}

    def unavailable(self) -> str | None:
        """None when the metric can run; otherwise one line saying how to enable it."""
        return None

    def hints(self) -> list[str]:
        """One line per column left empty although the metric runs (e.g. LPIPS without its backbone)."""
        return []

    def protocol(self) -> dict[str, Any]:
        """How the numbers are made: N, resolution, feature weights, antialias, ..."""
        return {}

    def compute(self, images: torch.Tensor, prompts: list[str], baseline: torch.Tensor | None) -> dict[str, float]:
        """images, baseline: [N, 3, H, W] float in [0, 1]; baseline is the FP32 model's images (same seeds)."""
        raise NotImplementedError


def interval_columns(column: str, paired: bool) -> list[str]:
    """CSV columns holding the interval (and p-value when paired) of a per-image column."""
    return [f"{column}_ci_low", f"{column}_ci_high", *([f"{column}_p"] if paired else [])]


def interval_fields(
    intervals: dict[str, tuple[str, bool]],
    per_image: dict[str, Any],
    baseline: dict[str, Any] | None,
) -> dict[str, float | None]:
    """Interval and paired-test columns from per-image values.

    The interval covers this row's applicable (non-NaN) images, as its scalar does; the paired test uses the
    images applicable in both rows.
    """
    out: dict[str, float | None] = {}
    for column, (kind, paired) in intervals.items():
        if column not in per_image:
            continue
        x = np.asarray(per_image[column], dtype=np.float64)
        if np.isnan(x).all():
            continue
        names = interval_columns(column, paired)
        ci = stats.summarize(x[~np.isnan(x)], None, kind)
        out.update({names[0]: ci["ci_low"], names[1]: ci["ci_high"]})
        if not paired:
            continue
        y = np.asarray(baseline[column], dtype=np.float64) if baseline and column in baseline else None
        both = ~(np.isnan(x) | np.isnan(y)) if y is not None and len(y) == len(x) else None
        ok = both is not None and both.any()
        out[names[2]] = stats.paired_permutation_p(x[both], y[both]) if ok else None
    return out
