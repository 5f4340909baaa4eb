"""`manifest.json`: how a run was made (git sha, versions, model hash, protocol, settings), written atomically.

A resumed run keeps its first `started` time and appends to `resumed`; a run folder made with another
protocol (model, prompts, sampler, steps, seed, metrics...) is refused, so rows of different protocols
can never share one results.csv.
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
