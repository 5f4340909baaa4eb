"""The embedded default model: a `tiny` checkpoint with seeded random weights, built on first use.

Nothing can be downloaded, so the default is generated deterministically (same seed -> same bytes) and
cached under `data/weights/`, then loaded through the same file -> loader -> modules path as a real v1-5
checkpoint. Since issue #6 the default is `tiny-shapes.safetensors`, the tiny preset trained on the built-in
shapes dataset (`stable_diffusion/shapes.py`); the random one remains for tests and as a fallback.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .checkpoint import save_checkpoint
from .config import TINY
from .model import LatentDiffusion, init_weights

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
WEIGHTS_DIR = DATA_DIR / "weights"
DEFAULT_SEED = 0
TRAINED_NAME = "tiny-shapes.safetensors"  # python -m stable_diffusion.train (issue #6), shipped in git


def embedded_checkpoint(seed: int = DEFAULT_SEED, weights_dir: Path = WEIGHTS_DIR, trained: bool = True) -> Path:
    """The shipped trained tiny checkpoint; else (or with trained=False) the seeded random one, built once."""
    if trained and (weights_dir / TRAINED_NAME).is_file():
        return weights_dir / TRAINED_NAME
    path = weights_dir / f"tiny-random-seed{seed}.safetensors"
    if not path.exists():
        log.info("building the embedded tiny checkpoint (seeded random weights) at %s", path)
        save_checkpoint(init_weights(LatentDiffusion(TINY), seed), path, TINY)
    return path
