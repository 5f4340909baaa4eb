"""What `manifest.json` records about the software: git sha and package versions.

The manifest itself is built by `SweepPlan.manifest` and written by `results.update_manifest` (under the
run lock, atomically; a folder of another protocol is refused there).
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata

from stable_diffusion.defaults import REPO_ROOT

PACKAGES = [
    "torch",
    "diffusers",
    "transformers",
    "torchmetrics",
    "open_clip_torch",
    "onnxruntime",
    "accelerate",
    "wandb",
]


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
