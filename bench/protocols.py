"""`--protocol NAME`: published evaluation protocols as presets, so a number is comparable with a paper's.

A preset fixes the prompts, N, resolution, sampler, steps, guidance, the FID feature and resize settings and
the CLIP model; options the user gives explicitly win and are listed as overrides in the manifest (a row
made with overrides is no longer the published protocol, and says so). A preset also requires its inputs:
the reference image folder and the Inception / CLIP weight files (or `--allow-download`); a missing one is one
InputError before any model is loaded.

Caption files: `coco2017-5k` ships its list (derived from `data/coco/captions_val2017.json.gz` by
`python -m bench.protocols --derive-coco2017`, one caption per val2017 image, CC BY 4.0, see
data/LICENSES.md). BK-SDM's and MLPerf's lists are not shipped: the preset names the exact file the user
must pass with `--prompts FILE`, and refuses without it.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stable_diffusion.defaults import DATA_DIR
from stable_diffusion.errors import InputError

from .data import COCO2017_5K

COCO2017_ANNOTATIONS = DATA_DIR / "coco" / "captions_val2017.json.gz"
COCO2017_CAPTIONS = COCO2017_5K
INCEPTION = "pt_inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class Protocol:
    name: str
    source: str  # who defines it, where
    prompts: str | None  # a shipped prompt set (`--prompts` name), or None: the user passes the file below
    user_caption_file: str | None  # the exact file a user must pass with --prompts when prompts is None
    num_images: int
    resolution: int
    sampler: str
    steps: int
    guidance: float
    fid_size: int | None  # generated and reference images resized to this square size before Inception
    clip_model: str
    clip_tag: str  # open_clip pretrained tag of the weights (what --allow-download fetches)
    clip_quick_gelu: bool
    reference: str  # what --reference DIR must hold
    fid_note: str
    accuracy_window: tuple[float, float] | None = None  # FID window of the published gate
    clip_window: tuple[float, float] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


_TORCHMETRICS_FID = (
    "torchmetrics FrechetInceptionDistance, Inception pool3 (2048-d) with pytorch-fid's FID weights ("
    + INCEPTION
    + "); resize to 299 by torch-fidelity's TF1-compatible bilinear (antialias=False), the legacy resize of "
    "pytorch-fid / clean-fid mode 'legacy_tensorflow' (not clean-fid's antialiased 'clean' mode)"
)

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol(
            name="coco2017-5k",
            source="MS-COCO val2017 (5,000 images), one caption each; the usual SD FID/CLIP protocol at 5K",
            prompts="coco2017-val-5k",  # bench.data.PROMPT_FILES
            user_caption_file=None,
            num_images=5000,
            resolution=512,
            sampler="ddim",
            steps=50,
            guidance=7.5,
            fid_size=None,
            clip_model="ViT-L-14",
            clip_tag="openai",
            clip_quick_gelu=True,
            reference="the 5,000 val2017 images (val2017/*.jpg from cocodataset.org)",
            fid_note=_TORCHMETRICS_FID + "; real images center-cropped and bicubic-resized to 512",
        ),
        Protocol(
            name="coco2014-30k-bk",
            source="BK-SDM (Kim et al., ICCV-W 2023): MS-COCO val2014 30K captions, 512 px, PNDM 25 steps, FID at "
            "256 px, CLIP ViT-g/14; published SD v1.4: FID 13.05, CLIP 0.2958 (cosine, not x100)",
            prompts=None,
            user_caption_file="mscoco_val2014_30k/metadata.csv of BK-SDM (30,000 rows, columns file_name,text; "
            "scripts/get_mscoco_files.sh of github.com/Nota-NetsPresso/BK-SDM downloads it)",
            num_images=30000,
            resolution=512,
            sampler="pndm",
            steps=25,
            guidance=7.5,
            fid_size=256,
            clip_model="ViT-g-14",
            clip_tag="laion2b_s12b_b42k",
            clip_quick_gelu=False,
            reference="MS-COCO val2014 images (BK-SDM uses all 40,504 at 256 px for the real statistics)",
            fid_note=_TORCHMETRICS_FID + "; generated and real images bicubic-resized to 256 first (BK-SDM)",
            notes=("BK-SDM reports CLIP score as a cosine (0.2958); this tool's clip_score is 100 x cosine",),
        ),
        Protocol(
            name="mlperf-sdxl-5k",
            source="MLPerf Inference text_to_image (SDXL): 5,000 COCO val2014 captions, one per image, with "
            "the closed-division accuracy window",
            prompts=None,
            user_caption_file="coco2014/captions/captions_source.tsv of github.com/mlcommons/inference "
            "text_to_image (5,000 rows, columns id,image_id,caption,...)",
            num_images=5000,
            resolution=1024,
            sampler="euler",
            steps=20,
            guidance=8.0,
            fid_size=None,
            clip_model="ViT-bigG-14",
            clip_tag="laion2b_s39b_b160k",
            clip_quick_gelu=False,
            reference="the 5,000 val2014 images named in captions_source.tsv (file_name column)",
            fid_note=_TORCHMETRICS_FID + "; MLPerf compares with precomputed val2014 statistics instead of images",
            accuracy_window=(23.01085758, 23.95007626),
            clip_window=(31.68631873, 31.81331801),
            notes=("The window is MLPerf's for SDXL 1.0 at 1024 px; an SD v1 model is not expected to land in it",),
        ),
    ]
}
# SweepOptions field -> Protocol field the preset fills
_FILLS = {
    "prompts": "prompts",
    "num_images": "num_images",
    "sampler": "sampler",
    "steps": "steps",
    "guidance": "guidance",
    "fid_size": "fid_size",
    "clip_model": "clip_model",
    "clip_tag": "clip_tag",
    "clip_quick_gelu": "clip_quick_gelu",
    "accuracy_window": "accuracy_window",
    "clip_window": "clip_window",
}


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise InputError(f"unknown --protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def label(name: str | None, overrides: list[str]) -> str | None:
    """The row's `protocol` cell: the preset name, marked when options were overridden."""
    if not name:
        return None
    return f"{name}+overrides({','.join(overrides)})" if overrides else name


def fill(name: str, run: dict[str, Any]) -> list[str]:
    """Fill `run` (SweepOptions keyword arguments) with the preset where the user set nothing; return overrides."""
    preset = get(name)
    if preset.prompts is None and "prompts" not in run:
        raise InputError(
            f"--protocol {name} needs its caption file, which is not shipped: pass --prompts {preset.user_caption_file}"
        )
    overrides = []
    for key, attr in _FILLS.items():
        value = getattr(preset, attr)
        if key in run and run[key] != value:
            if not (key == "prompts" and value is None) and key not in ("accuracy_window", "clip_window"):
                overrides.append(key)  # a gate or the required caption file does not change the numbers
        elif value is not None:
            run.setdefault(key, value)
    res = (preset.resolution, preset.resolution)
    if run.get("resolution") is not None and tuple(run["resolution"]) != res:
        overrides.append("resolution")
    run.setdefault("resolution", res)
    return overrides


def check_inputs(name: str, reference: Path | None, fid_weights: Path | None, clip_weights: Path | None,
                 allow_download: bool) -> None:  # fmt: skip
    """One clear InputError for the first missing input of a preset (before any model is loaded)."""
    preset = get(name)
    if reference is None:
        raise InputError(
            f"--protocol {name} computes FID against real images: pass --reference DIR ({preset.reference})"
        )
    if not Path(reference).is_dir():
        raise InputError(f"--reference {reference} is not a folder ({preset.reference})")
    for flag, path, what in [
        ("--fid-weights", fid_weights, f"pytorch-fid's Inception weights {INCEPTION}"),
        ("--clip-weights", clip_weights, f"open_clip {preset.clip_model} weights ({preset.clip_tag})"),
    ]:
        if path is None and not allow_download:
            raise InputError(f"--protocol {name} needs {flag} FILE ({what}) or --allow-download")
        if path is not None and not Path(path).is_file():
            raise InputError(f"{flag} {path} is not a file ({what})")


def in_window(values: dict[str, Any], fid: tuple[float, float] | None, clip: tuple[float, float] | None) -> bool | None:
    """Whether the row's FID and CLIP score lie inside the given windows; None when a windowed metric is missing."""
    checks = [(values.get("fid"), fid), (values.get("clip_score"), clip)]
    checks = [(v, w) for v, w in checks if w is not None]
    if not checks:
        return None
    if any(v is None for v, _ in checks):
        return None
    return all(w[0] <= float(v) <= w[1] for v, w in checks)


def parse_window(text: str | tuple[float, float] | list[float], flag: str) -> tuple[float, float]:
    """`LO,HI` -> (lo, hi), lo <= hi."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        lo, hi = (float(x) for x in parts)
    except (ValueError, TypeError):
        raise InputError(f"{flag} takes LO,HI (two numbers), got {text!r}") from None
    if lo > hi:
        raise InputError(f"{flag} {text!r}: LO must be <= HI")
    return lo, hi


def derive_coco2017(annotations: Path = COCO2017_ANNOTATIONS, out: Path = COCO2017_CAPTIONS) -> int:
    """One caption per val2017 image (the one with the lowest annotation id), images sorted by id, as TSV."""
    data = json.loads(gzip.decompress(annotations.read_bytes()))
    first: dict[int, dict[str, Any]] = {}
    for ann in data["annotations"]:
        if ann["image_id"] not in first or ann["id"] < first[ann["image_id"]]["id"]:
            first[ann["image_id"]] = ann
    names = {img["id"]: img["file_name"] for img in data["images"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["image_id", "file_name", "caption_id", "caption"])
        for image_id in sorted(first):
            ann = first[image_id]
            writer.writerow([image_id, names[image_id], ann["id"], " ".join(ann["caption"].split())])
    return len(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--derive-coco2017", action="store_true", help=f"write {COCO2017_CAPTIONS}")
    parser.add_argument("--list", action="store_true", help="print the presets as JSON")
    args = parser.parse_args()
    if args.derive_coco2017:
        print(f"{derive_coco2017()} captions -> {COCO2017_CAPTIONS}")
    if args.list or not args.derive_coco2017:
        print(json.dumps({k: p.describe() for k, p in PROTOCOLS.items()}, indent=2))


if __name__ == "__main__":
    main()
