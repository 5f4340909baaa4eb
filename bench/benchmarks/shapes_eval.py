"""Evaluate a tiny text-to-image model on shapes-dataset captions with the built-in metrics (no download).

    .venv/bin/python -m bench.benchmarks.shapes_eval --checkpoint data/weights/tiny-shapes.safetensors --guidance 3 7.5
    .venv/bin/python -m bench.benchmarks.shapes_eval --random   # the seeded random-weight default, to compare

Samples one image per caption of a built-in set (`--prompts shapes-heldout`, the default: (shape, colour)
pairs never seen in training; `shapes` = shapes-val: fresh in-distribution scenes), then reports prompt
accuracy (chance 1/1800, 95 % Wilson intervals) and shapes-FID against 256 real generator images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.data import SHAPES_ALIASES, SHAPES_SETS, shapes_set
from bench.metrics.base import PER_IMAGE, interval_fields
from bench.metrics.shapes import CHANCE_ALL, CHANCE_PER_HEAD, PromptAccuracy, shapes_fid
from bench.report import make_grid
from stable_diffusion.checkpoint import load_model
from stable_diffusion.config import TINY
from stable_diffusion.defaults import WEIGHTS_DIR
from stable_diffusion.pipeline import StableDiffusion
from stable_diffusion.shapes import captions


def generate(sd: StableDiffusion, prompts: list[str], *, steps: int, guidance: float, sampler: str, seed: int,
             chunk: int = 16) -> torch.Tensor:  # fmt: skip
    out = []
    for k in range(0, len(prompts), chunk):
        gen = sd(prompts[k : k + chunk], steps=steps, guidance=guidance, sampler=sampler, seed=seed + k, progress=False)
        out.append(gen.pixels)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid([Image.fromarray(a) for a in arr], cols).save(path)


def scored(acc: PromptAccuracy, images: torch.Tensor, prompts: list[str]) -> dict:
    """Prompt accuracies with the sweep's 95 % Wilson interval columns (per-image tensors dropped: this prints JSON)."""
    row = acc.compute(images, prompts, None)
    ci = {k: v for k, v in interval_fields(acc.intervals, row.pop(PER_IMAGE), None).items() if v is not None}
    return row | ci


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.benchmarks.shapes_eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(WEIGHTS_DIR / "tiny-shapes.safetensors"))
    p.add_argument("--random", action="store_true", help="evaluate the seeded random embedded default instead")
    p.add_argument("--prompts", default="shapes-heldout", choices=sorted([*SHAPES_SETS, *SHAPES_ALIASES]),
                   help="built-in caption set (shapes = shapes-val: fresh in-distribution scenes)")  # fmt: skip
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance", type=float, nargs="*", default=[3.0, 7.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-reference", type=int, default=256)
    p.add_argument("--grid", default=None, help="save a PNG grid per guidance here (prefix)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--real", action="store_true", help="also score real generator images of the same captions")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    if a.random:
        from stable_diffusion.defaults import embedded_checkpoint

        path = embedded_checkpoint(trained=False)
    else:
        path = Path(a.checkpoint)
    cfg = TINY
    sd = StableDiffusion(load_model(path, cfg))
    _, split, set_seed = shapes_set(a.prompts)
    prompts = captions(split, a.n, seed=set_seed)
    acc, fid = PromptAccuracy(), shapes_fid(n_reference=a.n_reference, bootstrap=200)
    print(f"model {path.name} (groups vae {cfg.vae.groups}, unet {cfg.unet.groups}); {a.n} {a.prompts} captions; "
          f"chance: all attributes {CHANCE_ALL:.5f}, per head "
          + ", ".join(f"{h} {c:.3f}" for h, c in CHANCE_PER_HEAD.items()))  # fmt: skip
    results = []
    if a.real:  # the ceiling: fresh real images with the same labels as the prompts (other jitter, same seed 0)
        from stable_diffusion.shapes import render, sample_labels, to_tensor

        rng = np.random.default_rng(12345)
        labels = [sample_labels(split, set_seed, i) for i in range(a.n)]
        real = to_tensor(np.stack([render(lab, rng, cfg.resolution) for lab in labels]))
        row = {"model": "real images"} | scored(acc, real, prompts)
        row |= {k: v for k, v in fid.compute(real, prompts, None).items() if k != "shapes_fid_bootstrap_bias"}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    for g in a.guidance:
        t0 = time.monotonic()
        images = generate(sd, prompts, steps=a.steps, guidance=g, sampler=a.sampler, seed=a.seed)
        row = {"guidance": g, "steps": a.steps, "sampler": a.sampler, "seconds": round(time.monotonic() - t0, 1)}
        row |= scored(acc, images, prompts)
        row |= {k: v for k, v in fid.compute(images, prompts, None).items() if k != "shapes_fid_bootstrap_bias"}
        results.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        if a.grid:
            save_grid(images, Path(f"{a.grid}-g{g:g}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
