"""Built-in quality metrics for the shapes world, needing no download: in-domain stand-ins for CLIP score and FID.

Both read images with the small CNN of `bench.metrics.shapes_classifier` (shipped weights
`data/weights/shapes-classifier.safetensors`), which only knows the procedural dataset of
`stable_diffusion.shapes`. They say something only for models trained on that dataset (the trained tiny
default) and prompts written in its caption language; they are NOT comparable with CLIP score or Inception FID.

- `PromptAccuracy` (CLIP-score analogue): parse each prompt with the dataset's own vocabulary, classify the
  image, and count the image correct when every attribute matches (`prompt_accuracy`); per-attribute accuracies
  go to `prompt_acc_<head>`. Chance level for all six attributes is 1/1800; per head 1/|vocabulary|.
- `ShapesFID` / `shapes_fid(...)`: `bench.metrics.fid.FID` on the classifier's 128-d penultimate features
  against real generator images (by default held-out-split images), reported in its own columns
  (`shapes_fid`, `shapes_fid_ci_low`, `shapes_fid_ci_high`, ...) so it can sit next to Inception FID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from stable_diffusion.shapes import VOCAB, ShapesDataset, parse_caption

from ..data import file_sha256, shapes_set
from ..registry import METRICS, Column
from .base import PER_IMAGE, Metric, per_image_columns
from .fid import FID, FID_CACHE, fid_columns

HEADS = tuple(VOCAB)
CHANCE_ALL = 1.0 / float(torch.tensor([len(v) for v in VOCAB.values()]).prod())
CHANCE_PER_HEAD = {h: 1.0 / len(v) for h, v in VOCAB.items()}
REFERENCE_SEED = 0  # default reference: ShapesDataset("heldout", seed=0); sweeps pass their prompt set's split/seed


# Wilson intervals; paired sign-flip test vs FP32 (same prompts and seeds)
ACCURACY_INTERVALS: dict[str, tuple[str, bool]] = {
    c: ("proportion", True) for c in ("prompt_accuracy", *(f"prompt_acc_{h}" for h in HEADS))
}
TRAIN = "python -m bench.metrics.shapes_classifier --train"  # how to make the classifier weights


def _weights_path() -> Path:
    from bench.metrics.shapes_classifier import WEIGHTS

    return WEIGHTS


@METRICS.register
class PromptAccuracy(Metric):
    """In-domain CLIP-score stand-in: fraction of images whose classified attributes all match their prompt.

    Prompts that are not shapes-dataset captions are skipped (`prompt_acc_n` counts the parsed ones); with
    none parsed the columns stay empty. Chance: 1/1800 for all attributes together.
    """

    name = "prompt_accuracy"
    order = 40
    intervals: ClassVar[dict[str, tuple[str, bool]]] = ACCURACY_INTERVALS
    columns = (
        *per_image_columns(
            Column("prompt_accuracy",
                   "images whose shapes-classifier attributes all match the prompt (chance 1/1800)",
                   label="prompt accuracy, all attributes (shapes classifier)", better="higher"),
            *ACCURACY_INTERVALS["prompt_accuracy"],
        ),
        *(c for h in HEADS for c in per_image_columns(
            Column(f"prompt_acc_{h}", f"prompt accuracy of the {h} attribute alone", better="higher"),
            *ACCURACY_INTERVALS[f"prompt_acc_{h}"],
        )),
        Column("prompt_acc_n", "prompts parsed as shapes captions", plot=False),
    )  # fmt: skip

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device | None = None) -> None:
        self.weights_path = Path(weights_path) if weights_path else _weights_path()
        self.device = torch.device(device or "cpu")
        self._model = None
        self._n: int | None = None

    def unavailable(self) -> str | None:
        if not self.weights_path.is_file():
            return f"no shapes classifier at {self.weights_path}: run `{TRAIN}`"
        return None

    def protocol(self) -> dict[str, Any]:
        ok = self.unavailable() is None
        return {
            "classifier": "bench.metrics.shapes_classifier.ShapesClassifier",
            "weights_sha256": file_sha256(self.weights_path) if ok else None,
            "n_images": self._n,
            "preprocess": "round(x * 255) / 255, bilinear antialiased resize to 64x64 if needed",
            "score": "fraction of images with all of " + ", ".join(HEADS) + " predicted as the prompt says",
            "chance": CHANCE_ALL,
            "note": "in-domain stand-in for CLIP score: meaningful only for shapes-dataset captions",
        }

    def model(self):
        if self._model is None:
            from bench.metrics.shapes_classifier import load_classifier

            self._model = load_classifier(self.weights_path).to(self.device)
        return self._model

    def per_image(self, images: torch.Tensor, prompts: list[str]) -> tuple[list[int], dict[str, list[bool]]]:
        """Indices of the parsed prompts and, per head, whether each of those images matched."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        parsed = [(i, lab) for i, p in enumerate(prompts) if (lab := parse_caption(p)) is not None]
        if not parsed:
            return [], {h: [] for h in HEADS}
        idx = [i for i, _ in parsed]
        x = (images[idx].clamp(0, 1) * 255).round() / 255
        pred = self.model().predict(x.to(self.device))
        return idx, {h: [pred[h][j] == lab[h] for j, (_, lab) in enumerate(parsed)] for h in HEADS}

    def compute(self, images: torch.Tensor, prompts: list[str], baseline: torch.Tensor | None) -> dict[str, Any]:
        idx, hits = self.per_image(images, prompts)
        self._n = len(idx)
        if not idx:
            return {"prompt_acc_n": 0}
        allok = [all(hits[h][j] for h in HEADS) for j in range(len(idx))]
        out: dict[str, Any] = {"prompt_accuracy": sum(allok) / len(allok)}
        out.update({f"prompt_acc_{h}": sum(v) / len(v) for h, v in hits.items()})
        out["prompt_acc_n"] = len(idx)
        per_image = {}
        for column, values in [("prompt_accuracy", allok), *((f"prompt_acc_{h}", v) for h, v in hits.items())]:
            full = torch.full((len(images),), float("nan"), dtype=torch.float64)  # NaN: prompt not a shapes caption
            full[idx] = torch.tensor(values, dtype=torch.float64)
            per_image[column] = full
        out[PER_IMAGE] = per_image
        return out


@METRICS.register
class ShapesFID(FID):
    """In-domain FID stand-in: FID on the shapes classifier's 128-d penultimate features, own columns.

    Same statistics, bootstrap CI and caching as `FID`; only the feature network (and the column names) differ.
    Not comparable with Inception FID.
    """

    name = "shapes_fid"
    order = 50
    columns = fid_columns(
        "shapes_fid", "FID on shapes-classifier features vs generator images of the prompt set's split and seed "
        "(held-out ones for non-shapes prompts; not comparable with FID)",
        "shapes-FID vs generator images", "generated images in the shapes-FID",
        "shapes-classifier weights sha256 prefix",
    )  # fmt: skip

    @classmethod
    def from_options(cls, options: Any, reference: Any) -> ShapesFID:
        # against the prompt set's own scenes (its split and seed); held-out scenes for other prompt sets
        _, split, seed = shapes_set(options.prompts) or shapes_set("shapes-heldout")
        return shapes_fid(n_reference=256, split=split, seed=seed, cache_dir=FID_CACHE)

    def __init__(self, reference: Any, weights_path: str | Path | None = None, **kwargs: Any) -> None:
        from bench.metrics.shapes_classifier import PenultimateFeatures, load_classifier

        path = Path(weights_path) if weights_path else _weights_path()
        self.classifier_path = path
        extractor = PenultimateFeatures(load_classifier(path)) if path.is_file() else None
        kwargs.setdefault("device", "cpu")
        super().__init__(reference, feature_extractor=extractor, feature_name="shapes-classifier", **kwargs)

    def unavailable(self) -> str | None:
        if self.custom is None:
            return f"no shapes classifier at {self.classifier_path}: run `{TRAIN}`"
        return super().unavailable()

    def protocol(self) -> dict[str, Any]:
        out = super().protocol()
        out["note"] = "in-domain stand-in for FID (shapes-classifier features, 128-d); " + out["note"]
        return out

    def compute(self, images: torch.Tensor, prompts: list[str], baseline: torch.Tensor | None) -> dict[str, Any]:
        out = super().compute(images, prompts, baseline)
        return {"shapes_" + k: v for k, v in out.items()}


def shapes_reference(n: int = 256, split: str = "heldout", seed: int = REFERENCE_SEED, size: int = 64) -> list:
    """n real generator images (PIL) of a split and seed: the shapes-FID reference of the prompt set drawn there."""
    return ShapesDataset(split, seed, size).images(0, n)


def shapes_fid(
    reference: Any | None = None, n_reference: int = 256, split: str = "heldout", seed: int = REFERENCE_SEED,
    **kwargs: Any,
) -> ShapesFID:  # fmt: skip
    """A `ShapesFID` against `reference` (default: `n_reference` generator images of `split`/`seed`)."""
    return ShapesFID(reference if reference is not None else shapes_reference(n_reference, split, seed), **kwargs)
