"""Built-in shapes metrics: the shipped classifier reads generator images, prompt accuracy and shapes-FID
separate real images from noise."""

from __future__ import annotations

import pytest
import torch

from bench.metrics.base import PER_IMAGE
from bench.metrics.shapes import CHANCE_ALL, PromptAccuracy, ShapesFID, shapes_fid
from bench.metrics.shapes_classifier import WEIGHTS, evaluate, load_classifier
from stable_diffusion.shapes import ShapesDataset, to_tensor

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="shipped shapes classifier weights missing")


def _real(split: str, seed: int, n: int) -> tuple[torch.Tensor, list[str]]:
    imgs, caps, _ = ShapesDataset(split, seed).batch(0, n)
    return to_tensor(imgs), caps


def test_classifier_accuracy_on_fresh_heldout_images():
    acc = evaluate(load_classifier(), "heldout", n=300, seed=31337)
    assert min(acc[h] for h in acc if h != "all") >= 0.95, acc


def test_prompt_accuracy_real_vs_noise():
    metric = PromptAccuracy()
    assert metric.unavailable() is None
    images, prompts = _real("heldout", 4242, 128)
    real = metric.compute(images, prompts, None)
    assert real["prompt_accuracy"] >= 0.9 and real["prompt_acc_n"] == 128
    per_image = real.pop(PER_IMAGE)
    assert set(real) <= set(metric.column_names())
    for column, values in per_image.items():  # per-image 0/1 values average to the row's number
        assert len(values) == 128 and float(values.mean()) == pytest.approx(real[column])
    mixed = metric.compute(images[:3], [prompts[0], "a cat", prompts[2]], None)[PER_IMAGE]["prompt_accuracy"]
    assert mixed[1].isnan() and not mixed[[0, 2]].isnan().any()  # a non-shapes prompt is not applicable
    noise = metric.compute(torch.rand(128, 3, 64, 64, generator=torch.Generator().manual_seed(0)), prompts, None)
    assert noise["prompt_accuracy"] <= 0.05  # chance: 1/1800
    assert CHANCE_ALL == pytest.approx(1 / 1800)
    assert metric.compute(images[:2], ["a cat", "a dog"], None) == {"prompt_acc_n": 0}


def test_shapes_fid_real_vs_noise():
    metric = shapes_fid(n_reference=128, bootstrap=20)
    assert isinstance(metric, ShapesFID) and metric.unavailable() is None
    images, prompts = _real("heldout", 777, 64)
    real = metric.compute(images, prompts, None)
    assert set(real) >= {"shapes_fid", "shapes_fid_ci_low", "shapes_fid_ci_high", "shapes_fid_n"}
    noise = metric.compute(torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0)), prompts, None)
    assert noise["shapes_fid"] > 10 * real["shapes_fid"]
    assert metric.protocol()["feature_extractor"] == "shapes-classifier"


def test_shapes_eval_prints_accuracies_with_intervals(capsys):
    """The evaluation benchmark runs on the in-distribution set and prints JSON with Wilson intervals."""
    import json

    from bench.benchmarks.shapes_eval import main

    assert main(["--prompts", "shapes", "--n", "2", "--steps", "1", "--guidance", "3", "--n-reference", "8"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lo, hi = row["prompt_accuracy_ci_low"], row["prompt_accuracy_ci_high"]
    assert row["prompt_acc_n"] == 2 and 0 <= lo <= row["prompt_accuracy"] <= hi <= 1
