"""FID of a setting's images against a real reference set, with a bootstrap confidence interval.

Why this shape: the Inception network and the Fréchet math are torchmetrics' own (`NoTrainInceptionV3`, the
module `FrechetInceptionDistance(feature=2048)` builds, and `FrechetInceptionDistance` itself), so numbers are
comparable with anyone using torchmetrics / torch-fidelity. Feature extraction is split from the statistics
only so that (a) the reference features are extracted once and cached on disk, and (b) the bootstrap can
resample features instead of re-running Inception; the statistics are fed to torchmetrics through its
custom-feature path (an identity "extractor" over precomputed features).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchvision.transforms.functional import pil_to_tensor

from stable_diffusion.checkpoint import safe_load
from stable_diffusion.defaults import REPO_ROOT
from stable_diffusion.errors import InputError

from ..data import file_sha256
from ..registry import METRICS, Column
from .base import Metric, weights_file

FID_CACHE = REPO_ROOT / "data" / "cache" / "fid"  # reference features, by content hash

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's file; torch-fidelity's has the same keys
PREPROCESS = "center-crop to the generated aspect, PIL bicubic resize to the generated size, uint8"
ImageLike = Image.Image | str | Path


class _DownloadFailedError(Exception):
    """The Inception weights could not be downloaded: FID columns stay empty (`unavailable()` says why)."""


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 by rounding, as the runner quantizes (torchmetrics' normalize=True truncates)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


class _Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics do the FID statistics on features we extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_low_rank(mu_r: torch.Tensor, sigma_r: torch.Tensor, fake: torch.Tensor) -> float:
    """FID from reference statistics and N generated features, exact when N <= d.

    The generated covariance is Xc^T Xc / (N-1) (rank < N), and the non-zero eigenvalues of sigma_r @ sigma_g
    equal those of the N x N matrix Xc sigma_r Xc^T / (N-1), so tr sqrt(sigma_r sigma_g) needs an N x N
    symmetric eigendecomposition instead of a d x d general one. Tested equal to torchmetrics' FID.
    """
    x = fake.double()
    mu_g = x.mean(0)
    xc = x - mu_g
    gram = xc @ sigma_r @ xc.T / (len(x) - 1)
    sqrt_trace = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp(min=0).sqrt().sum()
    trace_g = (xc * xc).sum() / (len(x) - 1)
    return float((mu_r - mu_g).square().sum() + sigma_r.trace() + trace_g - 2 * sqrt_trace)


def fid_columns(name: str, meaning: str, label: str, n: str, features: str) -> tuple[Column, ...]:
    """The five columns of an FID-like metric: value (with its bootstrap CI), CI bounds, N, features."""
    return (
        Column(name, meaning, label=label, better="lower", ci=(f"{name}_ci_low", f"{name}_ci_high")),
        Column(f"{name}_ci_low", "bootstrap 95% CI, low", plot=False),
        Column(f"{name}_ci_high", "bootstrap 95% CI, high", plot=False),
        Column(f"{name}_n", n, plot=False),
        Column(f"{name}_features", features, plot=False),
    )


@METRICS.register
class FID(Metric):
    """FID (torchmetrics, Inception pool3 2048-d) vs `reference`, plus a seeded bootstrap 95 % CI.

    reference: real images (PIL images, paths, or an object with `.images` paths like `bench.data.ReferenceSet`).
    weights_path: Inception weights (`--fid-weights`), pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
        or torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (same state-dict keys).
    allow_download: let torch-fidelity fetch its weights into the torch hub cache (opt-in; off in tests).
    feature: Inception layer, as torchmetrics' `feature` (64, 192, 768, 2048); 2048 (pool3) is standard FID.
    feature_extractor / feature_name: a custom `nn.Module` taking float [0, 1] images [N, 3, H, W] at the
        generated size and returning [N, d] (torchmetrics' custom-feature path), e.g. an in-domain extractor.
    cache_dir: where reference features are cached (safetensors: mean, cov, features); None = memory only.
    bootstrap / seed: resamples of the generated features for the CI (0 disables it).
    resize: square size both generated and reference images are bicubic-resized to before the extractor
        (BK-SDM's FID at 256 of 512 px images); None = the generated size.
    """

    name = "fid"
    order = 20
    columns = fid_columns(
        "fid", "FID vs the reference set (empty without Inception weights); small N is biased and noisy",
        "FID vs reference set", "generated images in the FID", "feature extractor and weights sha256 prefix",
    )  # fmt: skip

    @classmethod
    def from_options(cls, options: Any, reference: Any) -> FID:
        return cls(weights_path=options.fid_weights, reference=reference, cache_dir=FID_CACHE,
                   allow_download=options.allow_download, resize=options.fid_size)  # fmt: skip

    def __init__(
        self,
        reference: Sequence[ImageLike] | Any,
        weights_path: str | Path | None = None,
        *,
        allow_download: bool = False,
        feature_extractor: nn.Module | None = None,
        feature: int = 2048,
        feature_name: str | None = None,
        cache_dir: str | Path | None = None,
        bootstrap: int = 200,
        seed: int = 0,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        resize: int | None = None,
    ) -> None:
        self.resize = resize
        self.reference: list[ImageLike] = list(getattr(reference, "images", reference))
        self._reference_sha = getattr(reference, "sha256", None)  # ReferenceSet already hashed its files
        self.weights_path = Path(weights_path) if weights_path else None
        self.allow_download = allow_download
        self.custom = feature_extractor
        self.feature = feature
        default_name = type(feature_extractor).__name__ if feature_extractor else f"inception-v3-compat/{feature}"
        self.feature_name = feature_name or default_name
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.bootstrap, self.seed, self.batch_size = bootstrap, seed, batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._net: nn.Module | None = None
        self._weights_sha: str | None = None
        self._reference_features: dict[tuple[int, int], torch.Tensor] = {}
        self._last: dict[str, Any] = {}
        self._failed: str | None = None  # why a download failed

    # -- availability and protocol ---------------------------------------------------------------
    def _hub_file(self) -> Path:
        """Where torch-fidelity's own download lands (also used offline if a user put it there)."""
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)

    def unavailable(self) -> str | None:
        if self._failed:
            return self._failed
        if len(self.reference) < 2:
            return f"FID needs >= 2 reference images, got {len(self.reference)}: pass --reference DIR"
        if self.custom is not None:
            return None
        if self.weights_path is not None:  # an explicit file wins over the hub cache
            ok = self.weights_path.is_file()
            return None if ok else f"--fid-weights {self.weights_path} is not a file ({INCEPTION_FILE})"
        if self.allow_download or self._hub_file().is_file():
            return None
        return f"no Inception weights: pass --fid-weights PATH ({INCEPTION_FILE}) or --allow-download"

    def weights_sha256(self) -> str | None:
        """sha256 of the Inception file, or of the custom extractor's state dict (so retraining busts the cache)."""
        if self._weights_sha is None:
            if self.custom is not None:
                h = hashlib.sha256()
                for key, value in sorted(self.custom.state_dict().items()):
                    h.update(key.encode() + value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
                self._weights_sha = h.hexdigest()
            elif self.weights_path is not None:
                self._weights_sha = file_sha256(self.weights_path) if self.weights_path.is_file() else None
            elif self._hub_file().is_file():
                self._weights_sha = file_sha256(self._hub_file())
        return self._weights_sha

    def protocol(self) -> dict[str, Any]:
        sha = self.weights_sha256() if self.unavailable() is None else None
        return {
            "n_generated": self._last.get("n"),
            "n_reference": len(self.reference),
            "resolution": self._last.get("resolution"),
            "feature_extractor": self.feature_name,
            "weights_sha256": sha,
            "antialias": False if self.custom is None else None,  # torchmetrics 1.9 kwarg `antialias`
            "inception_resize": "to 299 by torch-fidelity's TF1-compatible bilinear (antialias=False), as the TF FID; "
            "pytorch-fid's torch bilinear is close but not bit-identical",
            "reference_preprocess": PREPROCESS,
            "generated_preprocess": "round(x * 255) to uint8 (custom extractors get that / 255)"
            + (f", then PIL bicubic resize to {self.resize}x{self.resize}" if self.resize else ""),
            "fid_size": self.resize,
            "statistics": "torchmetrics FrechetInceptionDistance on the features (float64 sums)",
            "bootstrap": {
                "resamples": self.bootstrap,
                "seed": self.seed,
                "what": "generated features resampled with replacement; reference fixed",
                "ci": "95 % percentile interval shifted by the bootstrap bias estimate (mean* - fid), because "
                "resampled FIDs are biased upward (duplicates) and the raw interval can exclude the estimate",
            },
            "note": "FID at small N (N << 2048 features: rank-deficient covariance) is strongly biased upward "
            "and noisy; compare only rows with the same N and reference set, never with published FIDs",
        }

    # -- features ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.unavailable() is None or self.weights_path is not None:
            try:
                self._extractor()
            except _DownloadFailedError:
                pass  # unavailable() now says why; the columns stay empty

    def _extractor(self) -> nn.Module:
        if self._net is None:
            self._net = self.custom if self.custom is not None else self._inception()
            self._net = self._net.eval().to(self.device)
        return self._net

    def _inception(self) -> nn.Module:
        """torchmetrics' Inception with weights read by `safe_load` (torch-fidelity itself unpickles with
        weights_only=False): they reach it as a safetensors copy, which torch.load reads without unpickling."""
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        source = weights_file("--fid-weights", self.weights_path, self._hub_file(), URL_INCEPTION_V3,
                              self.allow_download)  # fmt: skip
        if isinstance(source, str):
            self._failed = source
            raise _DownloadFailedError(source)
        state = safe_load(source, "--fid-weights")
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "inception.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(copy))
            try:
                return NoTrainInceptionV3(
                    name="inception-v3-compat", features_list=[str(self.feature)],
                    feature_extractor_weights_path=str(copy), antialias=False,
                )  # fmt: skip
            except RuntimeError as e:  # load_state_dict: missing / unexpected keys or shapes
                first = str(e).splitlines()[0]
                raise InputError(
                    f"--fid-weights {source}: not Inception weights of {INCEPTION_FILE} ({first})"
                ) from None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32 [N, d] on CPU, in batches."""
        net, out = self._extractor(), []
        with torch.inference_mode():
            for batch in images.split(self.batch_size):
                x = batch.to(self.device)
                if self.custom is not None:
                    x = x.float() / 255
                out.append(net(x).reshape(len(batch), -1).float().cpu())
        return torch.cat(out)

    def _reference_digest(self) -> str:
        """Content hash of the reference set, once per instance (a run's reference does not change)."""
        if self._reference_sha is None:
            h = hashlib.sha256()
            for item in self.reference:
                if isinstance(item, Image.Image):
                    h.update(f"{item.mode}{item.size}".encode() + item.tobytes())
                else:
                    h.update(file_sha256(item).encode())
            self._reference_sha = h.hexdigest()
        return self._reference_sha

    def cache_key(self, size: tuple[int, int]) -> str:
        parts = {
            "reference": self._reference_digest(),
            "n": len(self.reference),
            "features": self.feature_name,
            "weights": self.weights_sha256(),
            "resolution": list(size),
            "preprocess": PREPROCESS,  # the 299 resize is fixed by the feature name (inception-v3-compat/...)
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def load_reference(self, size: tuple[int, int]) -> torch.Tensor:
        """Reference images as uint8 [N, 3, H, W] at the generated (H, W): same path into the extractor."""
        h, w = size
        out = []
        for item in self.reference:
            image = item if isinstance(item, Image.Image) else Image.open(item)
            image = ImageOps.fit(image.convert("RGB"), (w, h), method=Image.Resampling.BICUBIC)
            out.append(pil_to_tensor(image))
        return torch.stack(out)

    def reference_features(self, size: tuple[int, int]) -> torch.Tensor:
        if size in self._reference_features:
            return self._reference_features[size]
        path = self.cache_dir / f"fid-ref-{self.cache_key(size)[:32]}.safetensors" if self.cache_dir else None
        if path is not None and path.is_file():
            feats = load_file(path)["features"]
        else:
            feats = self.features(self.load_reference(size))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                f64 = feats.double()
                tensors = {"features": feats, "mean": f64.mean(0), "cov": torch.cov(f64.T)}
                meta = {"feature_name": self.feature_name, "resolution": f"{size[1]}x{size[0]}", "n": str(len(feats))}
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file(tensors, str(tmp), metadata=meta)
                os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache
        self._reference_features[size] = feats
        return feats

    # -- FID --------------------------------------------------------------------------------------
    def fid_with_ci(
        self, real: torch.Tensor, fake: torch.Tensor
    ) -> tuple[float, float | None, float | None, float | None]:
        """(fid, ci_low, ci_high, bootstrap bias) with torchmetrics' statistics over precomputed features."""
        metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=False)
        metric = metric.to(self.device)
        metric.update(real.to(self.device), real=True)

        def fid_of(features: torch.Tensor) -> float:
            metric.reset()
            metric.update(features.to(self.device), real=False)
            return float(metric.compute())

        fid = fid_of(fake)
        if self.bootstrap < 1:
            return fid, None, None, None
        gen = torch.Generator().manual_seed(self.seed)
        indices = torch.randint(len(fake), (self.bootstrap, len(fake)), generator=gen)
        if len(fake) <= fake.shape[1]:  # the usual small-N case: exact and ~1000x cheaper than a 2048^2 eigvals
            r64 = real.double()
            mu_r, sigma_r = r64.mean(0), torch.cov(r64.T)
            boot = torch.tensor([fid_low_rank(mu_r, sigma_r, fake[i]) for i in indices], dtype=torch.float64)
        else:
            boot = torch.tensor([fid_of(fake[i]) for i in indices], dtype=torch.float64)
        bias = float(boot.mean()) - fid
        low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        return fid, low - bias, high - bias, bias

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images, bicubic-resized (PIL, as the reference) to `resize` when set."""
        pixels = _to_uint8(images)
        if not self.resize:
            return pixels
        size = (self.resize, self.resize)
        pil = [Image.fromarray(a.permute(1, 2, 0).numpy()).resize(size, Image.Resampling.BICUBIC) for a in pixels]
        return torch.stack([pil_to_tensor(p) for p in pil])

    def compute(self, images: torch.Tensor, prompts: list[str], baseline: torch.Tensor | None) -> dict[str, Any]:
        size = (self.resize, self.resize) if self.resize else (int(images.shape[-2]), int(images.shape[-1]))
        self._last = {"n": len(images), "resolution": f"{size[1]}x{size[0]}"}
        if len(images) < 2:  # a covariance needs two samples: leave FID empty rather than fail the row
            return {"fid_n": len(images)}
        self.prepare()
        if self.unavailable():
            return {}
        fake = self.features(self._resized(images))
        fid, low, high, bias = self.fid_with_ci(self.reference_features(size), fake)
        features = f"{self.feature_name}:{(self.weights_sha256() or 'unknown')[:12]}"
        return {"fid": fid, "fid_ci_low": low, "fid_ci_high": high, "fid_n": len(fake), "fid_features": features,
                "fid_bootstrap_bias": bias}  # fmt: skip  # the bias has no column: it lands in the row's `extra`
