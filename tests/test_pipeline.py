"""End to end on `tiny`: our pipeline vs diffusers' pipelines assembled from the same weights.

Tolerance: max |ours - diffusers| <= 1e-3 on [0, 1] pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bench import reference
from stable_diffusion.config import TINY
from stable_diffusion.errors import InputError
from stable_diffusion.pipeline import StableDiffusion

V15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)


def diffusers_scheduler(name: str):
    import diffusers

    cls = {
        "ddim": diffusers.DDIMScheduler,
        "pndm": diffusers.PNDMScheduler,
        "ddpm": diffusers.DDPMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
    }[name]
    return cls.from_config(V15_SCHEDULER)


def hf_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab="data/clip_tokenizer/vocab.json", merges="data/clip_tokenizer/merges.txt", model_max_length=77
    )


@pytest.fixture(scope="module")
def ours(tiny_model):
    return StableDiffusion(tiny_model)


def diff_pipeline(state_dict, sampler: str, cls_name: str = "StableDiffusionPipeline"):
    pipe = reference.diffusers_pipeline(TINY, state_dict, diffusers_scheduler(sampler), hf_tokenizer())
    if cls_name != "StableDiffusionPipeline":
        import diffusers

        pipe = getattr(diffusers, cls_name)(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "ddpm", "euler"])
def test_text_to_image_equals_diffusers(ours, tiny_state_dict, sampler):
    prompts = ["a red cube on a table", "two blue circles"]
    kwargs = dict(steps=8, guidance=7.5, height=64, width=48)
    got = ours(prompts, negative_prompt="blurry", sampler=sampler, seed=3, batch=2, progress=False, **kwargs)
    ref = diff_pipeline(tiny_state_dict, sampler)(
        prompts,
        negative_prompt=["blurry"] * 2,
        num_inference_steps=8,
        guidance_scale=7.5,
        height=64,
        width=48,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images
    ours_np = got.pixels.permute(0, 2, 3, 1).numpy()
    assert ours_np.shape == ref.shape == (4, 64, 48, 3)
    assert np.abs(ours_np - ref).max() <= 1e-3
    assert len(got.images) == 4 and got.images[0].size == (48, 64)


def test_no_guidance_and_eta_equal_diffusers(ours, tiny_state_dict):
    got = ours("a cat", sampler="ddim", eta=0.7, guidance=1.0, steps=6, seed=1, progress=False)
    ref = diff_pipeline(tiny_state_dict, "ddim")(
        "a cat",
        num_inference_steps=6,
        guidance_scale=1.0,
        eta=0.7,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    ).images
    assert np.abs(got.pixels.permute(0, 2, 3, 1).numpy() - ref).max() <= 1e-3


def test_image_to_image_equals_diffusers(ours, tiny_state_dict):
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    got = ours("a green star", init_image=init, strength=0.6, sampler="ddim", steps=10, seed=2, progress=False)
    ref = diff_pipeline(tiny_state_dict, "ddim", "StableDiffusionImg2ImgPipeline")(
        "a green star",
        image=init,
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(2),
        output_type="np",
    ).images
    assert np.abs(got.pixels.permute(0, 2, 3, 1).numpy() - ref).max() <= 1e-3


def test_seeded_and_deterministic(ours):
    a = ours("a cube", steps=3, seed=5, progress=False).pixels
    b = ours("a cube", steps=3, seed=5, progress=False).pixels
    c = ours("a cube", steps=3, seed=6, progress=False).pixels
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(steps=0), "steps"),
        (dict(steps=-3), "steps"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(height=60, width=64), "multiple"),
        (dict(sampler="heun"), "ddim"),
        (dict(batch=0), "batch"),
        (dict(init_image=Image.new("RGB", (32, 48)), height=64, width=64), "init image"),
        (dict(init_image=Image.new("RGB", (30, 30))), "multiple"),
        (dict(init_image=Image.new("RGB", (64, 64)), strength=0.0), "strength"),
    ],
)
def test_bad_input(ours, kwargs, words):
    with pytest.raises(InputError, match=words):
        ours("x", progress=False, **kwargs)


def test_long_prompt_is_truncated_with_warning(ours, caplog):
    ours("a very long prompt " * 40, steps=1, progress=False)
    assert "truncated" in caplog.text


def test_bf16_runs_close_to_fp32(tiny_model, ours):
    import copy

    low = StableDiffusion(copy.deepcopy(tiny_model).to(torch.bfloat16))
    got = low("a cube", steps=4, seed=0, progress=False).pixels
    ref = ours("a cube", steps=4, seed=0, progress=False).pixels
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - ref).abs().mean() < 0.05  # bf16 keeps ~3 significant digits; measured mean |diff| 0.006


BATCH_PROMPTS = ["a red cube", "a blue ball", "two green stars", "a small yellow cone"]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])  # ddpm draws sampler noise each step: per-image generators
def test_batched_images_do_not_depend_on_batch_size(ours, sampler):
    seeds = [11, 3, 7, 5]
    batched = ours(BATCH_PROMPTS, seeds=seeds, steps=3, sampler=sampler, progress=False).pixels
    for i, (prompt, seed) in enumerate(zip(BATCH_PROMPTS, seeds, strict=True)):
        alone = ours(prompt, seed=seed, steps=3, sampler=sampler, progress=False).pixels
        assert torch.equal(ours(prompt, seeds=[seed], steps=3, sampler=sampler, progress=False).pixels, alone)
        # batched GEMMs may sum in another order: fp32 rounding only
        assert (batched[i] - alone[0]).abs().max() <= 1e-4, i


def test_per_image_seeds_equal_diffusers_generator_list(ours, tiny_state_dict):
    seeds = [4, 9]
    got = ours(BATCH_PROMPTS[:2], seeds=seeds, sampler="ddpm", steps=4, progress=False)
    ref = diff_pipeline(tiny_state_dict, "ddpm")(
        BATCH_PROMPTS[:2],
        num_inference_steps=4,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    assert np.abs(got.pixels.permute(0, 2, 3, 1).numpy() - ref).max() <= 1e-3


def test_wrong_number_of_seeds(ours):
    with pytest.raises(InputError, match="one seed per image"):
        ours(BATCH_PROMPTS[:2], seeds=[1], progress=False)
