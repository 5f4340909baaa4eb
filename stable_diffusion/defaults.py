"""The embedded default model: a `tiny` checkpoint with seeded random weights, built on first use.

Nothing can be downloaded, so the default is generated deterministically (same seed -> same bytes) and
cached under `data/weights/`, then loaded through the same file -> loader -> modules path as a real v1-5
checkpoint. Its images are noise-like: it has never been trained (issue #6 brings a trained tiny model).
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


def embedded_checkpoint(seed: int = DEFAULT_SEED, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """Path of the embedded tiny checkpoint, generating it once if it is not cached yet."""
    path = weights_dir / f"tiny-random-seed{seed}.safetensors"
    if not path.exists():
        log.info("building the embedded tiny checkpoint (seeded random weights) at %s", path)
        save_checkpoint(init_weights(LatentDiffusion(TINY), seed), path, TINY)
    return path
