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

import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from stable_diffusion.checkpoint import safe_load
from stable_diffusion.errors import InputError

from ..registry import METRICS, Column
from .base import PER_IMAGE, Metric, per_image_columns, weights_file


def _alexnet_url() -> str:
    """torchvision's ImageNet AlexNet weights (the file name, alexnet-owt-7be5be79.pth, is its hub-cache name)."""
    from torchvision.models import AlexNet_Weights

    return AlexNet_Weights.IMAGENET1K_V1.url


def _alexnet_file_name() -> str:
    return os.path.basename(_alexnet_url())


def lpips_network(backbone: Path) -> torch.nn.Module:
    """torchmetrics' LPIPS (alex, v0.1 linear layers) with the AlexNet backbone read by `safe_load`.

    torchvision would unpickle the backbone with weights_only=False (code execution); so the network is built
    with a random backbone (`pnet_rand`) and torchvision's `features.<i>.*` tensors are copied into
    torchmetrics' `slice<k>.<i>.*` modules, which keep torchvision's layer indices.
    """
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    net = _NoTrainLpips(net="alex", pnet_rand=True)
    state = safe_load(backbone, "--lpips-weights")
    mapped = {key: state.get("features." + key.split(".", 1)[1]) for key in net.net.state_dict()}
    if missing := [k for k, v in mapped.items() if v is None]:
        raise InputError(f"--lpips-weights {backbone}: not torchvision's AlexNet weights (no {missing[0]})")
    try:
        net.net.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        raise InputError(
            f"--lpips-weights {backbone}: not torchvision's AlexNet weights ({str(e).splitlines()[-1].strip()})"
        ) from None
    return net.eval()


@METRICS.register
class Fidelity(Metric):
    """PSNR / SSIM / MSE / LPIPS of each image vs the baseline image of the same prompt and seed.

    lpips_weights: torchvision's ImageNet AlexNet file (`--lpips-weights`, alexnet-owt-7be5be79.pth); if not
        given, the same file in the torch hub cache is used; `allow_download` lets torchvision fetch it.
    """

    name = "fidelity"
    order = 10
    # bootstrap intervals only: these already compare with FP32 image by image, so a paired test has no null
    intervals: ClassVar[dict[str, tuple[str, bool]]] = {"psnr": ("mean", False), "ssim": ("mean", False)}
    columns = (
        *per_image_columns(
            Column("psnr", "dB vs the baseline images of reference_dtype (mean over images)",
                   label="PSNR vs FP32 images (dB)", better="higher"),
            *intervals["psnr"],
        ),
        *per_image_columns(
            Column("ssim", "SSIM vs the same reference images", label="SSIM vs FP32 images", better="higher"),
            *intervals["ssim"],
        ),
        Column("lpips", "LPIPS vs the same reference images (empty without backbone weights)",
               label="LPIPS vs FP32 images", better="lower"),
        Column("mse", "pixel MSE vs baseline, [0,1] range", label="pixel MSE vs FP32 images ([0,1] range)",
               better="lower"),
    )  # fmt: skip

    @classmethod
    def from_options(cls, options: Any, reference: Any) -> Fidelity:
        return cls(lpips_weights=options.lpips_weights, allow_download=options.allow_download)

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
        self._failed: str | None = None  # why a download failed: the lpips column stays empty

    def _hub_file(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / _alexnet_file_name()

    def lpips_source(self) -> Path | str | None:
        """The AlexNet file LPIPS will use, "download", or None when LPIPS cannot run."""
        if self._failed:
            return None
        if self.lpips_weights is not None:
            return self.lpips_weights if self.lpips_weights.is_file() else None
        if self._hub_file().is_file():
            return self._hub_file()
        return "download" if self.allow_download else None

    def prepare(self) -> None:
        if self.lpips_weights is not None or self.lpips_source() is not None:
            self._lpips_metric()

    def hints(self) -> list[str]:
        """How to enable the columns left empty (the metric itself always runs)."""
        if self._failed:
            return [f"lpips column empty: {self._failed}"]
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
            "reference": "the baseline's images of reference_dtype (same prompts and seeds)",
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
        """The LPIPS network, built once; None when its weights could not be downloaded."""
        if self._lpips is None and self._failed is None:
            flag = "--lpips-weights"
            source = weights_file(flag, self.lpips_weights, self._hub_file(), _alexnet_url(), self.allow_download)
            if isinstance(source, str):
                self._failed = source
            else:
                self._lpips = lpips_network(source).to(self.device)
        return self._lpips

    def lpips(self, images: torch.Tensor, baseline: torch.Tensor) -> float | None:
        if self.lpips_source() is None or (net := self._lpips_metric()) is None:
            return None
        scores = []
        with torch.inference_mode():
            for a, b in zip(images.split(self.batch_size), baseline.split(self.batch_size), strict=True):
                a, b = a.clamp(0, 1).to(self.device), b.clamp(0, 1).to(self.device)
                scores.append(net(a, b, normalize=True).reshape(-1).double().cpu())
        return float(torch.cat(scores).mean())

    def compute(self, images: torch.Tensor, prompts: list[str], baseline: torch.Tensor | None) -> dict[str, Any]:
        if baseline is None:
            return dict.fromkeys(self.column_names())
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
