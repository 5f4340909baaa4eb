"""The shipped trained tiny model (issue #6): better than chance and than random weights, hurt by pruning."""

from __future__ import annotations

import pytest
import torch

from bench.metrics.shapes import CHANCE_ALL, PromptAccuracy, shapes_fid
from stable_diffusion.defaults import TRAINED_NAME, embedded_checkpoint
from stable_diffusion.pipeline import StableDiffusion
from stable_diffusion.shapes import captions
from tests.test_sweep import FAST, rows_of, run_main

N = 16  # held-out captions (attribute combinations never seen in training)


@pytest.fixture(scope="module")
def scores() -> dict[str, dict[str, float]]:
    prompts = captions("heldout", N, seed=0)
    fid = shapes_fid(n_reference=256, bootstrap=0)
    out = {}
    for name, trained in (("trained", True), ("random", False)):
        sd = StableDiffusion.from_checkpoint(embedded_checkpoint(trained=trained))
        pixels = torch.cat(
            [
                sd(p, steps=20, sampler="ddim", guidance=7.5, seed=i, progress=False).pixels
                for i, p in enumerate(prompts)
            ]
        )
        out[name] = {**PromptAccuracy().compute(pixels, prompts, None), **fid.compute(pixels, prompts, None)}
    return out


def test_default_is_the_trained_checkpoint():
    assert embedded_checkpoint().name == TRAINED_NAME


def test_trained_beats_chance_and_random(scores):
    # README: trained 0.44 on 32 such captions (the stage-1 model 0.19) vs chance 1/1800 and random 0.0;
    # shapes-FID ~330 vs ~6700 (random)
    assert scores["trained"]["prompt_accuracy"] >= 2 / N > 100 * CHANCE_ALL
    assert scores["trained"]["prompt_accuracy"] > scores["random"]["prompt_accuracy"]
    assert scores["trained"]["shapes_fid"] < 0.5 * scores["random"]["shapes_fid"]


def test_pruning_the_trained_model_degrades_quality(tmp_path):
    args = ["--sweep", "prune", "--ratios", "0.2,0.9", "--out", str(tmp_path)]
    proc = run_main(*args, *FAST, "--num-images", str(N), "--steps", "20")  # later flags win
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, low, high = rows_of(tmp_path)
    assert float(low["psnr"]) > float(high["psnr"])
    assert float(high["prompt_accuracy"]) < float(base["prompt_accuracy"])
    assert float(high["shapes_fid"]) > float(base["shapes_fid"])
