"""`manifest.json`: how a run was made (git sha, versions, model hash, protocol, settings), written atomically.

A resumed run keeps its first `started` time and appends to `resumed`; a run folder made with another
protocol (model, prompts, sampler, steps, seed, metrics...) is refused, so rows of different protocols
can never share one results.csv.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from stable_diffusion.defaults import REPO_ROOT
from stable_diffusion.errors import InputError

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


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so a kill leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(run_dir: Path, data: dict[str, Any]) -> None:
    """Write `run_dir/manifest.json`, or update it on resume (same protocol digest required)."""
    path = run_dir / "manifest.json"
    data = dict(data)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("protocol_digest") != data["protocol_digest"]:
            raise InputError(
                f"{run_dir} holds a sweep with another protocol (model, prompts, sampler, steps, seed, "
                "metrics...); use another --run-id or --out"
            )
        data["started"] = old.get("started")
        data["resumed"] = [*old.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S")]
    else:
        data["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_atomic(path, json.dumps(data, indent=2, default=str))
