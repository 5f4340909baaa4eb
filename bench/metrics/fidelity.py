"""Fidelity to the uncompressed model: each image against the FP32 image of the same prompt and seed.

Why this is the primary quality signal: with a handful of prompts FID is noise, but a compressed model that
keeps the same seed's image close to the FP32 one has provably changed little. PSNR, SSIM and MSE need no
weights and always run (torchmetrics, data_range=1.0, per image then mean). LPIPS (torchmetrics, AlexNet)
needs torchvision's ImageNet AlexNet weights; its linear layers ship with torchmetrics. Without the backbone
the `lpips` column is left empty and `hints()` says how to enable it; the other columns still fill.

The FP32 baseline row compares its images with themselves and honestly reports psnr=inf, ssim=1, lpips=0,
mse=0. With no baseline at all (baseline=None) there is nothing to compare and every column is empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .base import PER_IMAGE, Metric


def _alexnet_file_name() -> str:
    """The file name torchvision looks for in `<torch hub>/checkpoints` (alexnet-owt-7be5be79.pth)."""
    from torchvision.models import AlexNet_Weights

    return os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)


@contextlib.contextmanager
def _hub_with(weights: Path) -> Iterator[None]:
    """Point the torch hub cache at a temp dir holding `weights` under torchvision's name.

    torchmetrics' LPIPS always builds `torchvision.models.alexnet(weights=IMAGENET1K_V1)`, which reads the
    hub cache and only downloads when the file is missing; this lets it load a user-given file through its
    own code path, offline.
    """
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "checkpoints" / _alexnet_file_name()
        target.parent.mkdir()
        try:
            target.symlink_to(weights.resolve())
        except OSError:
            target.write_bytes(weights.read_bytes())
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)


class Fidelity(Metric):
    """PSNR / SSIM / MSE / LPIPS of each image vs the baseline image of the same prompt and seed.

    lpips_weights: torchvision's ImageNet AlexNet file (`--lpips-weights`, alexnet-owt-7be5be79.pth); if not
        given, the same file in the torch hub cache is used; `allow_download` lets torchvision fetch it.
    """

    name = "fidelity"
    columns = ("psnr", "ssim", "lpips", "mse")
    # bootstrap intervals only: these already compare with FP32 image by image, so a paired test has no null
    intervals: ClassVar[dict[str, tuple[str, bool]]] = {"psnr": ("mean", False), "ssim": ("mean", False)}

    def __init__(
        self,
        lpips_weights: str | Path | None = None,
        *,
        allow_download: bool = False,
        batch_size: int = 16,
        device: str | torch.device | None = None,
    ) -> None:
        self.lpips_weights = Path(lpips_weights) if lpips_weights else None
        self.allow_download = allow_download
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._lpips: Any = None

    def _hub_file(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / _alexnet_file_name()

    def lpips_source(self) -> Path | str | None:
        """The AlexNet file LPIPS will use, "download", or None when LPIPS cannot run."""
        if self.lpips_weights is not None:
            return self.lpips_weights if self.lpips_weights.is_file() else None
        if self._hub_file().is_file():
            return self._hub_file()
        return "download" if self.allow_download else None

    def hints(self) -> list[str]:
        """How to enable the columns left empty (the metric itself always runs)."""
        if self.lpips_source() is not None:
            return []
        given = f"--lpips-weights {self.lpips_weights} is not a file; " if self.lpips_weights else ""
        return [
            f"lpips column empty: {given}pass --lpips-weights PATH (torchvision's {_alexnet_file_name()}), "
            f"put it in {self._hub_file().parent}, or --allow-download"
        ]

    def protocol(self) -> dict[str, Any]:
        source = self.lpips_source()
        if isinstance(source, Path):
            with open(source, "rb") as f:
                backbone = "alexnet sha256 " + hashlib.file_digest(f, "sha256").hexdigest()
        else:
            backbone = "alexnet downloaded by torchvision" if source else None
        return {
            "reference": "the FP32 baseline's images (same prompts and seeds)",
            "psnr": "torchmetrics, data_range=1.0, per image then mean (inf when identical)",
            "ssim": "torchmetrics, gaussian 11x11 sigma 1.5, data_range=1.0, per image then mean",
            "mse": "torchmetrics, [0, 1] pixels, mean over all pixels of all images",
            "lpips": "torchmetrics LPIPS alex (v0.1 linear layers), inputs [0, 1], mean over images"
            if source
            else None,
            "lpips_backbone": backbone,
            "hints": self.hints(),
        }

    def _lpips_metric(self) -> Any:
        if self._lpips is None:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            given = self.lpips_weights  # else torchvision finds the hub-cache file (or downloads: opt-in)
            with _hub_with(given) if given is not None else contextlib.nullcontext():
                self._lpips = LearnedPerceptualImagePatchSimilarity(
                    net_type="alex", reduction="mean", normalize=True
                ).to(self.device)
        return self._lpips

    def lpips(self, images: torch.Tensor, baseline: torch.Tensor) -> float | None:
        if self.lpips_source() is None:
            return None
        metric = self._lpips_metric()
        metric.reset()
        with torch.inference_mode():
            for a, b in zip(images.split(self.batch_size), baseline.split(self.batch_size), strict=True):
                metric.update(a.clamp(0, 1).to(self.device), b.clamp(0, 1).to(self.device))
            return float(metric.compute())

    def compute(self, images: torch.Tensor, prompts: list[str], baseline: torch.Tensor | None) -> dict[str, Any]:
        if baseline is None:
            return dict.fromkeys(self.columns)
        if baseline.shape != images.shape:
            raise ValueError(f"images {tuple(images.shape)} vs baseline {tuple(baseline.shape)}")
        x, y = images.float(), baseline.float()
        psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
        return {
            "psnr": float(psnr.mean()),
            "ssim": float(ssim.mean()),
            "lpips": self.lpips(x, y),
            "mse": float(mean_squared_error(x, y)),
            PER_IMAGE: {"psnr": psnr.double(), "ssim": ssim.double()},
        }
