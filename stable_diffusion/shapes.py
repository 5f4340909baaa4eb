"""A procedural, captioned text-to-image dataset ("shapes"): deterministic by (seed, index), no download.

Each 64x64 RGB image shows one to three identical shapes (circle, square, triangle, star) of one named colour
and size, grouped at one of five positions, on a plain named background; its caption says all of it in
English, e.g. "two small red circles on a white background, top left". Labels come with every sample, so
a classifier trained on this generator gives in-domain quality metrics (`bench.metrics.shapes`).

Generalisation split: the (shape, colour) pairs in `HELDOUT_PAIRS` never appear in the "train" split; the
"heldout" split uses only those pairs (all other attributes vary freely). A model trained on "train" and
prompted with held-out captions must compose attributes it has only seen apart.

`ShapesDataset(split, seed)[i]` is a pure function of (split, seed, i, size): a numpy RNG seeded by
(seed, split, i) draws the labels, then PIL draws the scene 4x supersampled and box-downsamples it
(anti-aliased).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 210, 30),
    "purple": (150, 50, 190),
}
# Backgrounds are disjoint from the shape colours, so a shape never has its background's colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[str, ...] = ("one", "two", "three")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
# (shape, colour) pairs excluded from "train": one per shape, each with a different colour.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "green"), ("square", "yellow"), ("triangle", "blue"), ("star", "red")}
)
SPLITS = ("train", "heldout")
# Label heads, in a fixed order, with their vocabularies (used by the classifier and the metrics).
VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "count": COUNTS,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
TRAIN_LEN = 1_000_000  # "virtually infinite": indices are free, this is only what len() reports
HELDOUT_LEN = 100_000

_RADIUS = {"small": 6.0, "large": 10.0}  # at 64 px
_ANCHORS = {  # group centres at 64 px, before clamping into the image
    "top left": (17.0, 17.0),
    "top right": (47.0, 17.0),
    "bottom left": (17.0, 47.0),
    "bottom right": (47.0, 47.0),
    "center": (32.0, 32.0),
}
_SUPERSAMPLE = 4


def pairs(split: str) -> list[tuple[str, str]]:
    """The (shape, colour) pairs a split draws from."""
    _check_split(split)
    every = [(s, c) for s in SHAPES for c in COLOURS]
    return [p for p in every if (p in HELDOUT_PAIRS) == (split == "heldout")]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def caption_of(labels: dict[str, str]) -> str:
    """The English caption of a labels dict."""
    n = labels["count"]
    noun = labels["shape"] if n == "one" else PLURALS[labels["shape"]]
    return (
        f"{n} {labels['size']} {labels['colour']} {noun} on a {labels['background']} background, {labels['position']}"
    )


_CAPTION_RE = re.compile(
    r"^(?P<count>\w+) (?P<size>\w+) (?P<colour>\w+) (?P<noun>\w+) on an? (?P<background>\w+) background, "
    r"(?P<position>[\w ]+)$"
)
_SINGULAR = {p: s for s, p in PLURALS.items()} | {s: s for s in SHAPES}


def parse_caption(caption: str) -> dict[str, str] | None:
    """Labels of a caption written by `caption_of` (None if it is not one): the inverse of caption_of."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if not m:
        return None
    labels = {
        "shape": _SINGULAR.get(m["noun"], ""),
        "colour": m["colour"],
        "size": m["size"],
        "count": m["count"],
        "position": m["position"],
        "background": m["background"],
    }
    if any(labels[k] not in VOCAB[k] for k in VOCAB):
        return None
    return labels


def _offsets(count: int, r: float) -> list[tuple[float, float]]:
    d = 1.2 * r + 1.0  # centre-to-centre distance 2d > 2r: shapes never touch
    if count == 1:
        return [(0.0, 0.0)]
    if count == 2:
        return [(-d, 0.0), (d, 0.0)]
    h = d * math.sqrt(3)  # equilateral triangle, centred on its bounding box
    return [(-d, h / 2), (d, h / 2), (0.0, -h / 2)]


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        k, rr, start = 4, r * 1.25, math.pi / 4  # same area-ish as the circle: half side = 0.88 r
    elif shape == "triangle":
        k, rr, start = 3, r * 1.3, -math.pi / 2
    else:  # star: 5 points, alternating radii
        pts = []
        for j in range(10):
            a = -math.pi / 2 + rot + j * math.pi / 5
            rad = r * 1.25 if j % 2 == 0 else r * 0.5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return [
        (cx + rr * math.cos(start + rot + j * 2 * math.pi / k), cy + rr * math.sin(start + rot + j * 2 * math.pi / k))
        for j in range(k)
    ]


def render(labels: dict[str, str], rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Draw the scene of `labels` (jitter from `rng`): uint8 [size, size, 3]."""
    s = size / 64.0
    ss = size * _SUPERSAMPLE
    img = Image.new("RGB", (ss, ss), BACKGROUNDS[labels["background"]])
    draw = ImageDraw.Draw(img)
    count = COUNTS.index(labels["count"]) + 1
    r = _RADIUS[labels["size"]] * (1.0 + rng.uniform(-0.08, 0.08))
    offs = _offsets(count, r)
    reach = r * 1.3 + 1.5  # max extent of any shape around its centre
    xs = [o[0] for o in offs]
    ys = [o[1] for o in offs]
    ax, ay = _ANCHORS[labels["position"]]
    ax += rng.uniform(-2, 2)
    ay += rng.uniform(-2, 2)
    # clamp the group's bounding box into the image
    ax = min(max(ax, reach - min(xs)), 64 - reach - max(xs))
    ay = min(max(ay, reach - min(ys)), 64 - reach - max(ys))
    colour = COLOURS[labels["colour"]]
    rot = rng.uniform(-0.15, 0.15)
    k = s * _SUPERSAMPLE
    for ox, oy in offs:
        cx, cy, rr = (ax + ox) * k, (ay + oy) * k, r * k
        if labels["shape"] == "circle":
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=colour)
        else:
            draw.polygon(_polygon(labels["shape"], cx, cy, rr, rot), fill=colour)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index)])


def sample_labels(split: str, seed: int, index: int) -> dict[str, str]:
    """The labels of sample `index` (cheap: no drawing)."""
    return _labels(_rng(seed, split, index), split)


def _labels(rng: np.random.Generator, split: str) -> dict[str, str]:
    ps = pairs(split)
    shape, colour = ps[rng.integers(len(ps))]
    return {
        "shape": shape,
        "colour": colour,
        "size": SIZES[rng.integers(len(SIZES))],
        "count": COUNTS[rng.integers(len(COUNTS))],
        "position": POSITIONS[rng.integers(len(POSITIONS))],
        "background": tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
    }


@dataclass
class ShapesDataset:
    """`ds[i] -> (image uint8 [size, size, 3], caption, labels)`, a pure function of (split, seed, i, size)."""

    split: str = "train"
    seed: int = 0
    size: int = 64

    def __post_init__(self) -> None:
        _check_split(self.split)
        if self.size % 8:
            raise ValueError(f"size must be a multiple of 8, got {self.size}")

    def __len__(self) -> int:
        return TRAIN_LEN if self.split == "train" else HELDOUT_LEN

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, dict[str, str]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = _rng(self.seed, self.split, index)
        labels = _labels(rng, self.split)
        return render(labels, rng, self.size), caption_of(labels), labels

    def labels(self, index: int) -> dict[str, str]:
        return sample_labels(self.split, self.seed, index)

    def batch(self, start: int, n: int) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
        """Samples start..start+n-1: images uint8 [n, size, size, 3], captions, labels."""
        items = [self[i] for i in range(start, start + n)]
        return np.stack([a for a, _, _ in items]), [c for _, c, _ in items], [lab for _, _, lab in items]

    def images(self, start: int, n: int) -> list[Image.Image]:
        """Samples start..start+n-1 as PIL images (e.g. an FID reference)."""
        return [Image.fromarray(self[i][0]) for i in range(start, start + n)]


def captions(split: str = "heldout", n: int = 32, seed: int = 0, start: int = 0) -> list[str]:
    """Captions of samples start..start+n-1 of a split (e.g. sweep prompts from held-out combinations)."""
    return [caption_of(sample_labels(split, seed, i)) for i in range(start, start + n)]


def to_tensor(images: np.ndarray) -> torch.Tensor:  # noqa: F821
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
