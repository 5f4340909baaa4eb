"""Metric parity with torchmetrics on random-weight feature extractors saved to tmp files (nothing is downloaded).

Every weights file here is random init, but it goes through the same loading path a user's real file takes
(`--fid-weights`, `--clip-weights`, `--lpips-weights`, the torch hub cache), and the reference numbers come
from torchmetrics built independently with the same weights.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.functional.multimodal import clip_score
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
from torchmetrics.multimodal import CLIPScore as TMCLIPScore
from torchvision.transforms.functional import to_pil_image

from bench.metrics.clip_score import CLIPScore
from bench.metrics.fid import FID
from bench.metrics.fidelity import Fidelity
from stable_diffusion.errors import InputError

SLOW = os.environ.get("SDBENCH_SLOW_TESTS") == "1"
PROMPTS = ["a red cube", "two blue spheres on a table", "a photo of a cat", "an empty room at night"]


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """Random [0, 1] images on the uint8 grid, as the runner passes them (PNG pixels / 255)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8).float() / 255


def _u8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8)


def _pngs(images: torch.Tensor, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:03d}.png" for i in range(len(images))]
    for path, image in zip(paths, _u8(images), strict=True):
        to_pil_image(image).save(path)
    return paths


def _rel_err(ours: float, ref: float) -> float:
    return abs(ours - ref) / abs(ref)


@pytest.fixture(autouse=True)
def _offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache per test, and any download attempt fails the test."""

    def no_download(url: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


# -- FID --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in pytorch-fid's file layout (torchvision inception_v3, 1008 classes, no aux head)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
        for m in net.modules():  # keep activations O(1) through ~90 layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


class TinyNet(nn.Module):
    """A small conv feature extractor (float [0, 1] images -> 16-d), as a custom FID feature."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.Conv2d(8, 16, 3, 2), nn.AdaptiveAvgPool2d(1))
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.body(x).flatten(1)


@pytest.mark.parametrize(
    "feature",
    [
        192,  # same Inception path (weights file, TF1 resize, uint8), but a 192x192 eigvals instead of 2048x2048
        pytest.param(2048, marks=pytest.mark.skipif(not SLOW, reason="2 x 2048^2 eigvals: SDBENCH_SLOW_TESTS=1")),
    ],
)
def test_fid_inception_matches_torchmetrics(tmp_path: Path, inception_file: Path, feature: int) -> None:
    real, fake = _images(6, 64, 1), _images(6, 64, 2)
    ours = FID(_pngs(real, tmp_path / "ref"), inception_file, feature=feature, bootstrap=0, device="cpu")
    got = ours.compute(fake, PROMPTS[:3] * 2, None)
    ref = FrechetInceptionDistance(feature, feature_extractor_weights_path=str(inception_file), antialias=False)
    ref.update(_u8(real), real=True)
    ref.update(_u8(fake), real=False)
    want = float(ref.compute())
    assert want > 0 and _rel_err(got["fid"], want) <= 1e-3, (got["fid"], want)  # stated tolerance: 1e-3 relative
    assert got["fid_n"] == 6 and got["fid_ci_low"] is None
    assert got["fid_features"].startswith(f"inception-v3-compat/{feature}:")
    proto = ours.protocol()
    assert proto["antialias"] is False and proto["n_generated"] == 6 and proto["n_reference"] == 6
    assert proto["resolution"] == "64x64" and len(proto["weights_sha256"]) == 64 and "biased" in proto["note"]


def test_fid_inception_pool3_features_match_torchmetrics(inception_file: Path) -> None:
    """The default 2048-d pool3 features, without the (slow) 2048^2 Fréchet distance."""
    images = _u8(_images(3, 64, 3))
    ours = FID([Image.new("RGB", (8, 8))] * 2, inception_file, device="cpu").features(images)
    ref = FrechetInceptionDistance(2048, feature_extractor_weights_path=str(inception_file), antialias=False)
    want = ref.inception(images)
    assert ours.shape == (3, 2048) and float(want.abs().max()) > 0
    assert float((ours - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_fid_custom_extractor_matches_torchmetrics() -> None:
    real, fake, net = _images(24, 32, 3), _images(24, 32, 4), TinyNet()
    ours = FID([to_pil_image(x) for x in _u8(real)], feature_extractor=net, feature_name="tiny", bootstrap=0)
    got = ours.compute(fake, [""] * 24, None)["fid"]
    ref = FrechetInceptionDistance(feature=net, normalize=True, input_img_size=(3, 32, 32))
    ref.update(real, real=True)
    ref.update(fake, real=False)
    want = float(ref.compute())
    assert want > 0 and _rel_err(got, want) <= 1e-4, (got, want)
    assert ours.protocol()["feature_extractor"] == "tiny"


def test_fid_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    real, fake = _images(24, 32, 5), _images(24, 32, 6).mul(0.8)
    refs = [to_pil_image(x) for x in _u8(real)]

    def run(seed: int) -> dict[str, float]:
        return FID(refs, feature_extractor=TinyNet(), bootstrap=40, seed=seed).compute(fake, [""] * 24, None)

    a, b, c = run(0), run(0), run(1)
    assert a["fid_ci_low"] < a["fid"] < a["fid_ci_high"]
    assert (a["fid_ci_low"], a["fid_ci_high"]) == (b["fid_ci_low"], b["fid_ci_high"])
    assert (a["fid_ci_low"], a["fid_ci_high"]) != (c["fid_ci_low"], c["fid_ci_high"])
    assert a["fid"] == c["fid"]
    assert a["fid_bootstrap_bias"] > 0  # duplicates inflate resampled FIDs: why the interval is re-centred
    assert FID(refs, feature_extractor=TinyNet()).compute(fake[:1], [""], None) == {"fid_n": 1}  # no covariance


def test_fid_reference_cache_is_reused_and_keyed_on_the_images(tmp_path: Path) -> None:
    paths, fake, cache = _pngs(_images(12, 32, 7), tmp_path / "ref"), _images(12, 32, 8), tmp_path / "cache"
    net = TinyNet()

    def run() -> tuple[FID, dict[str, float]]:
        fid = FID(paths, feature_extractor=net, feature_name="tiny", cache_dir=cache, bootstrap=0)
        return fid, fid.compute(fake, [""] * 12, None)

    first, first_result = run()
    key = first.cache_key((32, 32))
    assert net.seen == 24  # reference + generated
    (file,) = cache.glob("*.safetensors")
    stored = load_file(file)
    assert set(stored) == {"features", "mean", "cov"} and stored["features"].shape == (12, 16)
    assert stored["cov"].shape == (16, 16)
    net.seen = 0
    _, second_result = run()
    assert net.seen == 12 and second_result == first_result  # reference features came from the cache
    assert key != first.cache_key((64, 64))
    _pngs(_images(1, 32, 9), tmp_path / "ref")  # overwrite 000.png: different reference set
    net.seen = 0
    third, _ = run()
    assert net.seen == 24 and third.cache_key((32, 32)) != key
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_fid_reference_is_center_cropped_and_resized() -> None:
    image = Image.new("RGB", (80, 48), (255, 0, 0))  # red bands left and right ...
    image.paste((0, 0, 255), (16, 0, 64, 48))  # ... around a centred blue square
    ref = FID([image, image], feature_extractor=TinyNet()).load_reference((24, 24))
    assert ref.shape == (2, 3, 24, 24) and ref.dtype == torch.uint8
    inner = ref[..., 2:-2]  # bicubic support reaches 1-2 px past the crop box at the edges
    assert (inner[:, 2] == 255).all() and (inner[:, 0] == 0).all()
    assert ref[:, 0].max() < 64  # a plain (stretching) resize would put ~5 px of pure red at each side


def test_fid_unavailable_without_weights(tmp_path: Path, _offline_hub: Path) -> None:
    refs = [Image.new("RGB", (8, 8))] * 2
    assert "--fid-weights" in FID(refs).unavailable()
    assert "--fid-weights" in FID(refs, weights_path=tmp_path / "missing.pth").unavailable()
    assert FID(refs, allow_download=True).unavailable() is None  # opt-in only; never computed here
    assert FID(refs).protocol()["weights_sha256"] is None
    cached = FID(refs)._hub_file()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"torch-fidelity's file, already in the hub cache")
    assert FID(refs).unavailable() is None
    assert "--fid-weights" in FID(refs, weights_path=tmp_path / "missing.pth").unavailable()  # explicit path wins
    pickled = tmp_path / "not-a-state-dict.pth"
    torch.save({"anything": Path("a")}, pickled)  # torch-fidelity would unpickle this with weights_only=False
    with pytest.raises(InputError, match="refused for safety"):  # one line, exit 2 (issue 9)
        FID(refs, weights_path=pickled).features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# -- CLIP score ---------------------------------------------------------------------------------------


class _HFStyleCLIP(nn.Module):
    """The two methods torchmetrics calls on a Hugging Face CLIPModel, over an open_clip model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = SimpleNamespace()  # torchmetrics reads `model.config.text_config` when it exists

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def test_clip_score_matches_torchmetrics(clip_file: Path) -> None:
    images = _images(4, 48, 10)
    ours = CLIPScore("sdbench-tiny-clip", weights_path=clip_file, device="cpu")
    assert ours.unavailable() is None
    got = ours.compute(images, PROMPTS, None)

    # torchmetrics' CLIPScore takes a callable returning (model, processor) with the HF interface; we adapt the
    # same open_clip model (loaded independently from the same file) and its own transform and tokenizer.
    model, _, preprocess = open_clip.create_model_and_transforms(
        "sdbench-tiny-clip", pretrained=str(clip_file), force_quick_gelu=True
    )
    tokenizer = open_clip.get_tokenizer("sdbench-tiny-clip")

    def processor(images: list[torch.Tensor] | None = None, text: list[str] | None = None, **_: object) -> dict:
        if images is not None:
            return {"pixel_values": torch.stack([preprocess(to_pil_image(x)) for x in images])}
        ids = tokenizer(text)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def load() -> tuple[nn.Module, object]:
        return _HFStyleCLIP(model.eval()), processor

    with torch.no_grad():
        ref = TMCLIPScore(model_name_or_path=load)
        ref.update(_u8(images), PROMPTS)
        want = float(ref.compute())
        per_image = torch.stack([clip_score(x, p, load) for x, p in zip(_u8(images), PROMPTS, strict=True)])
    assert want > 0 and (per_image > 0).all()  # the comparison is not decided by the clamp
    assert _rel_err(got["clip_score"], want) <= 1e-4, (got, want)
    assert _rel_err(got["clip_score_std"], float(per_image.double().std())) <= 1e-4
    assert got["clip_model"].startswith("sdbench-tiny-clip+quickgelu:")
    assert ours.protocol()["n_images"] == 4


def test_clip_score_unavailable_without_weights(tmp_path: Path) -> None:
    assert "--clip-weights" in CLIPScore().unavailable()
    assert "--clip-weights" in CLIPScore(weights_path=tmp_path / "missing.safetensors").unavailable()
    assert CLIPScore(allow_download=True).unavailable() is None  # opt-in only; never loaded here


# -- fidelity -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.pth"
    torch.save(state, path)
    return path


def _pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    base = _images(3, 64, seed)
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed + 1))
    return _u8((base + 0.05 * noise).clamp(0, 1)).float() / 255, base


def test_fidelity_psnr_ssim_mse_match_torchmetrics() -> None:
    images, base = _pair(11)
    got = Fidelity(device="cpu").compute(images, PROMPTS[:3], base)
    pairs = list(zip(images.split(1), base.split(1), strict=True))
    psnr = torch.stack([peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in pairs]).mean()
    ssim = torch.stack([structural_similarity_index_measure(a, b, data_range=1.0) for a, b in pairs]).mean()
    assert _rel_err(got["psnr"], float(psnr)) <= 1e-5 and _rel_err(got["ssim"], float(ssim)) <= 1e-5
    assert _rel_err(got["mse"], float((images - base).square().mean())) <= 1e-5


def test_fidelity_of_the_baseline_itself_and_without_baseline() -> None:
    _, base = _pair(12)
    same = Fidelity(device="cpu").compute(base, PROMPTS[:3], base.clone())
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0, abs=1e-6) and same["mse"] == 0.0
    empty = ("psnr", "psnr_ci_low", "psnr_ci_high", "ssim", "ssim_ci_low", "ssim_ci_high", "lpips", "mse")
    assert Fidelity().compute(base, PROMPTS[:3], None) == dict.fromkeys(empty)  # no baseline: every column empty


def test_lpips_matches_torchmetrics(alexnet_file: Path, monkeypatch: pytest.MonkeyPatch, _offline_hub: Path) -> None:
    images, base = _pair(13)
    ours = Fidelity(lpips_weights=alexnet_file, device="cpu")
    assert ours.hints() == [] and ours.protocol()["lpips_backbone"].startswith("alexnet sha256 ")
    got = ours.compute(images, PROMPTS[:3], base)
    assert torch.hub.get_dir() == str(_offline_hub)  # the temporary hub redirect was undone
    assert ours.compute(base, PROMPTS[:3], base)["lpips"] == pytest.approx(0.0, abs=1e-6)

    # Reference: torchmetrics' LPIPS with torchvision's weight loader handing it the same file.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: torch.load(alexnet_file))
    ref = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    ref.update(images, base)
    want = float(ref.compute())
    assert want > 0 and _rel_err(got["lpips"], want) <= 1e-5, (got["lpips"], want)


def test_lpips_from_the_hub_cache(alexnet_file: Path, _offline_hub: Path) -> None:
    cached = Fidelity()._hub_file()
    cached.parent.mkdir(parents=True)
    cached.symlink_to(alexnet_file)
    images, base = _pair(13)
    from_cache = Fidelity(device="cpu")
    assert from_cache.hints() == [] and from_cache.lpips_source() == cached
    given = Fidelity(lpips_weights=alexnet_file, device="cpu")
    assert from_cache.compute(images, [], base)["lpips"] == given.compute(images, [], base)["lpips"]


def test_lpips_missing_weights_leaves_the_column_empty(tmp_path: Path) -> None:
    images, base = _pair(14)
    metric = Fidelity(device="cpu")
    got = metric.compute(images, PROMPTS[:3], base)
    assert got["lpips"] is None and got["psnr"] > 0 and metric.unavailable() is None
    (hint,) = metric.hints()
    assert "--lpips-weights" in hint and "alexnet-owt-7be5be79.pth" in hint
    assert "--lpips-weights" in Fidelity(lpips_weights=tmp_path / "missing.pth").hints()[0]
    assert metric.protocol()["lpips"] is None


def test_metrics_import_quickly() -> None:
    """The sweep builds metrics even when they are unavailable: construction must not load any weights."""
    start = time.perf_counter()
    FID([Image.new("RGB", (8, 8))] * 2).unavailable()
    CLIPScore().unavailable()
    Fidelity().hints()
    assert time.perf_counter() - start < 1.0


def test_low_rank_fid_equals_torchmetrics():
    """The bootstrap's small-N shortcut equals torchmetrics' FID on the same features."""
    from torchmetrics.image.fid import _compute_fid

    from bench.metrics.fid import fid_low_rank

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(40, 64, generator=gen, dtype=torch.float64) * 2 + 1
    fake = torch.randn(9, 64, generator=gen, dtype=torch.float64) @ torch.randn(64, 64, generator=gen).double() / 8
    mu_r, sigma_r = real.mean(0), torch.cov(real.T)
    ref = float(_compute_fid(mu_r, sigma_r, fake.mean(0), torch.cov(fake.T)))
    assert abs(fid_low_rank(mu_r, sigma_r, fake) - ref) <= 1e-6 * abs(ref)
