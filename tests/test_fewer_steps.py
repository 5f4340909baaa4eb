"""Fewer steps as a compression axis: the `steps`, `cache` and `distilled` techniques, and a sweep of them
on the embedded default (rows, the steps really taken, reference images untouched, the image-latency Pareto plot)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data import load_prompts
from bench.registry import TECHNIQUES
from stable_diffusion.checkpoint import save_checkpoint
from stable_diffusion.config import TINY
from stable_diffusion.defaults import embedded_checkpoint
from stable_diffusion.distill import unet_fingerprint
from stable_diffusion.errors import InputError
from stable_diffusion.pipeline import StableDiffusion

from .test_sweep import rows_of, run_main

FAST = ["--num-images", "2", "--steps", "4", "--latency-repeats", "1", "--wandb-mode", "disabled"]


def test_steps_settings_and_sampling():
    steps = TECHNIQUES.get("steps")()
    assert [s.id for s in steps.settings({})] == [f"steps[sample_steps={n}]" for n in (10, 5, 2)]
    [s] = steps.settings({"sample_steps": ["3"]})
    out = steps.apply(torch.nn.Identity(), s)
    assert out.sampling == {"steps": 3} and out.fields["kernels"] == "dense fp32"
    with pytest.raises(InputError):
        steps.settings({"sample_steps": [0]})


def test_cache_settings():
    cache = TECHNIQUES.get("cache")()
    ids = [s.id for s in cache.settings({"depth": [1, 2], "interval": ["3"]})]
    assert ids == ["cache[depth=1,interval=3]", "cache[depth=2,interval=3]"]


def test_distilled_loads_the_student_and_samples_unguided(tiny_model, tmp_path):
    t = TECHNIQUES.get("distilled")()
    t.weights_dir = tmp_path
    with pytest.raises(InputError, match=r"python -m stable_diffusion\.distill"):
        t.settings({"steps": [4]})
    student = copy.deepcopy(tiny_model.unet)
    with torch.no_grad():
        student.out[2].bias.add_(1.0)
    meta = {"distill_guidance": "7.5", "distill_base_unet": unet_fingerprint(tiny_model.unet)}
    save_checkpoint(student.half(), tmp_path / "tiny-shapes-distilled-4steps.safetensors", TINY, "unet", meta)
    [s] = t.settings({"steps": [4]})
    assert s.id == "distilled[steps=4]"
    out = t.apply(copy.deepcopy(tiny_model.unet), s)
    assert out.sampling == {"steps": 4, "sampler": "ddim", "guidance": 1.0}
    assert out.fields["distill_guidance"] == 7.5
    torch.testing.assert_close(out.module.out[2].bias, student.out[2].bias.float())


def test_distilled_refuses_a_student_of_another_model(tiny_model, tmp_path):
    """Same shapes, other weights: the fingerprint of the distilled-from UNet names the wrong pairing."""
    t = TECHNIQUES.get("distilled")()
    t.weights_dir = tmp_path
    other = copy.deepcopy(tiny_model.unet)
    with torch.no_grad():
        other.out[2].bias.add_(1.0)
    meta = {"distill_teacher": "other.safetensors", "distill_base_unet": unet_fingerprint(other)}
    save_checkpoint(other.half(), tmp_path / "tiny-shapes-distilled-4steps.safetensors", TINY, "unet", meta)
    [s] = t.settings({"steps": [4]})
    with pytest.raises(InputError, match=r"distilled from other\.safetensors, not this sweep's UNet"):
        t.apply(copy.deepcopy(tiny_model.unet), s)


def test_shipped_student_is_of_the_shipped_model():
    """The student in data/weights was distilled from the embedded default (re-distil when retraining it)."""
    from safetensors import safe_open

    from bench.techniques.distilled import student_file

    with safe_open(str(student_file(4)), "pt") as f:
        meta = f.metadata()
    unet = StableDiffusion.from_checkpoint(embedded_checkpoint()).model.unet
    assert meta["distill_base_unet"] == unet_fingerprint(unet)


@pytest.fixture(scope="module")
def steps_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("steps")
    proc = run_main("--sweep", "steps,cache,distilled", "--sample-steps", "4,1", "--interval", "1,3",
                    "--distilled-steps", "4", "--out", str(out), *FAST)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_fewer_steps_rows(steps_run):
    rows = {r["setting_id"]: r for r in rows_of(steps_run)}
    assert list(rows) == [
        "baseline", "steps[sample_steps=4]", "steps[sample_steps=1]", "cache[depth=1,interval=1]",
        "cache[depth=1,interval=3]", "distilled[steps=4]",
    ]  # fmt: skip
    assert [rows[k]["steps"] for k in rows] == ["4", "4", "1", "4", "4", "4"]
    student = rows["distilled[steps=4]"]  # the shipped student: guidance baked in, so sampled at guidance 1
    assert (student["guidance"], student["sampler"]) == ("1.0", "ddim") and float(student["psnr"]) < 60
    assert float(student["distill_guidance"]) == 7.5  # a declared column of distilled
    assert rows["steps[sample_steps=4]"]["psnr"] == "inf"  # same steps as the reference: the same images
    assert rows["cache[depth=1,interval=1]"]["psnr"] == "inf"  # caching every call is the plain sampler
    one = rows["steps[sample_steps=1]"]
    assert float(one["psnr"]) < 60 and json.loads(one["extra"])["reference_steps"] == 4
    assert float(rows["cache[depth=1,interval=3]"]["psnr"]) < 60
    for r in rows.values():
        assert float(r["latency_image_p50_s"]) > 0 and r["kernels"] == "dense fp32"
    [run_dir] = [p for p in steps_run.iterdir() if p.is_dir()]
    assert (run_dir / "plots" / "pareto_psnr_latency_image_p50_s.png").exists()


def test_steps_axis_leaves_the_reference_images_unchanged(steps_run):
    """The baseline images of a steps sweep are the plain sampler's at the sweep's --steps, pixel for pixel."""
    [run_dir] = [p for p in steps_run.iterdir() if p.is_dir()]
    sd = StableDiffusion.from_checkpoint(embedded_checkpoint())
    prompts = load_prompts("shapes").prompts[:2]
    for i, prompt in enumerate(prompts):
        for folder, steps in (("baseline", 4), ("steps_sample_steps=1", 1)):
            png = np.asarray(Image.open(run_dir / "images" / folder / f"{i:04d}.png").convert("RGB"))
            gen = sd(prompt, steps=steps, sampler="ddim", guidance=7.5, seed=i, progress=False)
            arr = (gen.pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            assert np.array_equal(png, arr), (folder, i)


def test_steps_speed_benchmark_embedded_part_runs(capsys):
    """The benchmark's embedded part end to end on one prompt (its figures are in README)."""
    from bench.benchmarks.steps_speed import embedded

    embedded(1, 2, 1)
    out = capsys.readouterr().out
    assert "distilled[steps=4] (guidance 1)" in out and "dPSNR vs plain 4-step" in out and "-> ratio" in out
