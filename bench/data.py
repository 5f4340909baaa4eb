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
COCO2017_5K = DATA_DIR / "prompts" / "coco2017-val-5k.tsv"  # one caption per val2017 image (bench.protocols)
PROMPT_FILES = {"parti": PARTI, "coco2017-val-5k": COCO2017_5K}  # shipped prompt files by name
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


def load_reference(
    folder: str | Path = COCO_DIR / "images", captions: str | Path | None = None, require_captions: bool = True
) -> ReferenceSet:
    """Images of `folder` (sorted by name) and captions from a COCO-style `captions.json`.

    The captions file is a list of {"image": file name, "captions": [...]} (as data/coco/captions.json); the
    default is `captions.json` beside the folder. Images without captions are skipped. With
    `require_captions=False` (protocol presets, whose prompts come from their own caption list) every image
    of the folder is used and captions stay empty.
    """
    folder = Path(folder)
    captions = Path(captions) if captions else folder.parent / "captions.json"
    if not folder.is_dir():
        raise InputError(f"reference image folder {folder} does not exist; pass --reference DIR with images")
    by_name: dict[str, list[str]] | None = None
    if require_captions:
        if not captions.is_file():
            raise InputError(f"captions file {captions} does not exist; pass --reference-captions FILE")
        try:
            entries = json.loads(captions.read_text())
            by_name = {e["image"]: list(e["captions"]) for e in entries}
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{captions}: expected a JSON list of {{'image', 'captions'}} objects ({e})") from None
    paths = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and (by_name is None or p.name in by_name)
    )
    if not paths:
        raise InputError(f"no {'captioned ' if by_name is not None else ''}images in {folder}")
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + file_sha256(p).encode())
    return ReferenceSet(paths, [by_name[p.name] if by_name else [] for p in paths], h.hexdigest())


def _text_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


PROMPT_COLUMNS = ("Prompt", "prompt", "caption", "text")  # PartiPrompts, COCO/MLPerf TSVs, BK-SDM metadata.csv


def _read_prompt_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".tsv", ".csv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ","))
        column = next((c for c in PROMPT_COLUMNS if rows and c in rows[0]), None)
        if column is None:
            raise ValueError(f"no prompt column (one of {', '.join(PROMPT_COLUMNS)})")
        return [r[column] for r in rows if r.get(column)]
    if path.suffix == ".json":
        data = json.loads(text)
        return [d if isinstance(d, str) else d["captions"][0] for d in data]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


# Built-in shapes prompt sets: name -> (dataset split, seed). Training draws train-split seed 0 and
# calibration train-split seed 1, so "shapes-val" (seed 2) holds fresh scenes of the training vocabulary:
# in-distribution validation. "shapes-heldout" uses only the (shape, colour) pairs training never saw
# (compositional generalisation, much harder for a tiny model). "shapes" is shapes-val.
SHAPES_SETS: dict[str, tuple[str, int]] = {
    "shapes-val": ("train", 2),
    "shapes-heldout": ("heldout", 0),
    "shapes-calib": ("train", 1),
}
SHAPES_ALIASES = {"shapes": "shapes-val"}
SHAPES_SET_SIZE = 1000  # captions per built-in set (generating one costs ~1-3 ms on this CPU)


def shapes_set(spec: str) -> tuple[str, str, int] | None:
    """(canonical name, split, seed) of a built-in shapes prompt set, or None if `spec` names none."""
    name = SHAPES_ALIASES.get(spec, spec)
    return (name, *SHAPES_SETS[name]) if name in SHAPES_SETS else None


def prompts_key(spec: str) -> str:
    """`spec` as the run digest names it: the canonical set, under its first-version name where it had one.

    The first version's `shapes` meant the held-out captions (now `shapes-heldout`), so that set keeps the
    name `shapes` in the digest (its run folders resume) and today's `shapes` (= shapes-val) is `shapes-val`.
    """
    name = SHAPES_ALIASES.get(spec, spec)
    return "shapes" if name == "shapes-heldout" else name


def load_prompts(spec: str, reference: ReferenceSet | None = None, caption_index: int = 0) -> PromptSet:
    """`shapes` (= shapes-val), `shapes-heldout`, `coco` (reference captions), `parti`, or a .txt/.tsv/.json file.

    caption_index 1 selects the calibration prompts: COCO's second captions, or shapes-calib for shapes sets.
    """
    if spec == "coco":
        ref = reference or load_reference()
        prompts = [c[min(caption_index, len(c) - 1)] for c in ref.captions]
        return PromptSet(f"coco[caption {caption_index}]", prompts, ref.sha256)
    if (found := shapes_set(spec)) is not None:
        from stable_diffusion.shapes import captions

        name, split, seed = found if caption_index == 0 else ("shapes-calib", *SHAPES_SETS["shapes-calib"])
        prompts = captions(split, SHAPES_SET_SIZE, seed=seed)
        return PromptSet(name, prompts, _text_sha256(prompts))
    path = PROMPT_FILES.get(spec, Path(spec))
    if not path.is_file():
        raise InputError(
            f"prompt file {path} does not exist; use shapes, shapes-heldout, coco, "
            f"{', '.join(PROMPT_FILES)} or a .txt/.tsv/.csv/.json file"
        )
    try:
        prompts = _read_prompt_file(path)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts from {path}: {e}") from None
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts")
    return PromptSet(spec if spec in PROMPT_FILES else path.stem, prompts, file_sha256(path))
