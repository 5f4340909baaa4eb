"""The one small interface between the sweep runner and a quality metric.

A metric sees the images of one setting (same prompts and seeds in every setting), the prompts, and the
images the uncompressed model made for them; it returns named values for the CSV row. Metrics whose
weights are missing offline report `unavailable()` (one line: how to enable them) and leave their
columns empty. `protocol()` is stored in the manifest and the row so every number carries how it was made.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from stable_diffusion.errors import InputError, first_line

from ..registry import Column

log = logging.getLogger(__name__)


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
    columns: ClassVar[tuple[Column, ...]]  # the CSV columns this metric fills

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
