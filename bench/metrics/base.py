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

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from stable_diffusion.errors import InputError, first_line

from .. import stats
from ..registry import Column

log = logging.getLogger(__name__)
PER_IMAGE = "per_image"


def weights_file(flag: str, given: Path | None, cached: Path, url: str | None, allow_download: bool) -> Path | str:
    """The weights file a metric will load, or a one-line reason it cannot (its columns stay empty).

    A `given` path that is not a file is a user error (InputError, at plan time). Otherwise the cache file is
    used, or downloaded there when allowed; a failed download is the documented soft case: the reason.
    """
    if given is not None:
        if not given.is_file():
            raise InputError(f"{flag} {given} is not a file")
        return given
    if cached.is_file():
        return cached
    if not allow_download or url is None:
        return f"no weights: pass {flag} PATH ({cached.name}), put it in {cached.parent}, or --allow-download"
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), progress=False)  # writes a temp file, then renames
    except Exception as e:  # URLError, HTTPError, timeouts, a full disk...: the column stays empty
        return f"download of {url} failed ({first_line(e)})"
    return cached


class Metric:
    """Base class; a metric module registers its class with `@METRICS.register` and `from_options`."""

    name: ClassVar[str]
    order: ClassVar[int] = 100
    columns: ClassVar[tuple[Column, ...]]  # the CSV columns this metric fills (`per_image_columns` for CIs)
    # column -> (kind, paired): "proportion" (0/1 per image: Wilson) or "mean" (bootstrap); paired: test vs baseline
    intervals: ClassVar[dict[str, tuple[str, bool]]] = {}

    @classmethod
    def from_options(cls, options: Any, reference: Any) -> Metric:
        """The metric as a sweep configures it (`options`: SweepOptions; `reference`: the FID ReferenceSet)."""
        return cls()

    @classmethod
    def column_names(cls) -> list[str]:
        return [c.name for c in cls.columns]

    def prepare(self) -> None:
        """Load the weights now, at plan time: a bad file raises InputError before anything is sampled."""

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


def per_image_columns(column: Column, kind: str, paired: bool) -> tuple[Column, ...]:
    """`column` (with `ci` set) followed by its interval and, when paired, p-value columns (see `intervals`)."""
    low, high, *p = interval_columns(column.name, paired)
    what = "Wilson" if kind == "proportion" else "bootstrap (images)"
    out = (
        replace(column, ci=(low, high)),
        Column(low, f"95% {what} interval of {column.name}, low", plot=False),
        Column(high, f"95% {what} interval of {column.name}, high", plot=False),
    )
    if p:
        meaning = (
            f"paired test of {column.name} vs the baseline row's images (same seeds): two-sided p; "
            "< 0.05 lands in `differs`"
        )
        out += (Column(p[0], meaning, plot=False),)
    return out


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
