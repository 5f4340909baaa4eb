"""Prompt sets and the real reference image set (for FID), all from files in `data/` or given by the user.

Default: the 159-image MS-COCO val2017 subset shipped in `data/coco/` (licenses in data/LICENSES.md); its
first captions are the prompts, its images the FID reference, and its second captions the calibration
prompts (so calibration never sees the evaluation prompts).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from stable_diffusion.defaults import DATA_DIR
from stable_diffusion.errors import InputError

COCO_DIR = DATA_DIR / "coco"
PARTI = DATA_DIR / "prompts" / "PartiPrompts.tsv"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class PromptSet:
    name: str
    prompts: list[str]
    sha256: str  # of the source file, for the manifest

    def describe(self) -> str:
        return f"{self.name}:{self.sha256[:12]}"


@dataclass
class ReferenceSet:
    """Real images (paths) with their captions."""

    images: list[Path]
    captions: list[list[str]]
    sha256: str

    def load(self, n: int | None = None) -> list[Image.Image]:
        return [Image.open(p).convert("RGB") for p in self.images[:n]]


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_reference(folder: str | Path = COCO_DIR / "images", captions: str | Path | None = None) -> ReferenceSet:
    """Images of `folder` (sorted by name) and captions from a COCO-style `captions.json`.

    The captions file is a list of {"image": file name, "captions": [...]} (as data/coco/captions.json); the
    default is `captions.json` beside the folder. Images without captions are skipped.
    """
    folder = Path(folder)
    captions = Path(captions) if captions else folder.parent / "captions.json"
    if not folder.is_dir():
        raise InputError(f"reference image folder {folder} does not exist; pass --reference DIR with images")
    if not captions.is_file():
        raise InputError(f"captions file {captions} does not exist; pass --reference-captions FILE")
    try:
        entries = json.loads(captions.read_text())
        by_name = {e["image"]: list(e["captions"]) for e in entries}
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{captions}: expected a JSON list of {{'image', 'captions'}} objects ({e})") from None
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name in by_name)
    if not paths:
        raise InputError(f"no captioned images in {folder} (captions from {captions})")
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + file_sha256(p).encode())
    return ReferenceSet(paths, [by_name[p.name] for p in paths], h.hexdigest())


def _text_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def _read_prompt_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".tsv":
        rows = csv.DictReader(text.splitlines(), delimiter="\t")
        return [r["Prompt"] for r in rows if r.get("Prompt")]
    if path.suffix == ".json":
        data = json.loads(text)
        return [d if isinstance(d, str) else d["captions"][0] for d in data]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def load_prompts(spec: str, reference: ReferenceSet | None = None, caption_index: int = 0) -> PromptSet:
    """`shapes` (built-in dataset), `coco` (captions of the reference set), `parti`, or a .txt/.tsv/.json file.

    caption_index 1 selects the calibration prompts: COCO's second captions, or shapes' train-split captions.
    """
    if spec == "coco":
        ref = reference or load_reference()
        prompts = [c[min(caption_index, len(c) - 1)] for c in ref.captions]
        return PromptSet(f"coco[caption {caption_index}]", prompts, ref.sha256)
    if spec == "shapes":  # held-out captions of the built-in dataset: what the embedded model was trained for
        from stable_diffusion.shapes import captions

        prompts = captions("heldout" if caption_index == 0 else "train", 1000, seed=caption_index)
        return PromptSet(f"shapes-{'heldout' if caption_index == 0 else 'train'}", prompts, _text_sha256(prompts))
    path = PARTI if spec == "parti" else Path(spec)
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist; use coco, parti or a .txt/.tsv/.json file")
    try:
        prompts = _read_prompt_file(path)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts from {path}: {e}") from None
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts")
    return PromptSet(path.stem if spec != "parti" else "parti", prompts, file_sha256(path))
