"""Our samplers against diffusers' schedulers under the SD v1-5 scheduler config.

Every step of a seeded sampling loop must equal diffusers' step output. The samplers mirror
diffusers' float32 arithmetic operation for operation, so the tolerance is TOL = 0: outputs are
bit-identical (the brief's bound was max|d| <= 1e-6 * max|ref|).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from stable_diffusion.config import V1_5
from stable_diffusion.errors import InputError
from stable_diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    EulerSampler,
    Sampler,
    make_sampler,
)

diffusers = pytest.importorskip("diffusers")

TOL = 0.0  # relative to max|ref|; bit-exact
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "prediction_type": "epsilon",
}
REF_CLASSES = {
    "ddim": diffusers.DDIMScheduler,
    "pndm": diffusers.PNDMScheduler,
    "ddpm": diffusers.DDPMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
}
# (case id, our sampler name, DDIM eta, Euler s_churn)
CASES = [
    ("ddim", "ddim", 0.0, 0.0),
    ("ddim-eta0.5", "ddim", 0.5, 0.0),
    ("pndm", "pndm", 0.0, 0.0),
    ("ddpm", "ddpm", 0.0, 0.0),
    ("euler", "euler", 0.0, 0.0),
    ("euler-churn", "euler", 0.0, 1.0),
]
STEPS = [1, 10, 25, 50]
SHAPE = (2, 4, 8, 8)


def reference(name: str):
    cls = REF_CLASSES["pndm" if name == "plms" else name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in SD15_SCHEDULER.items() if k in accepted})


def ours(name: str, eta: float = 0.0, s_churn: float = 0.0) -> Sampler:
    return EulerSampler(V1_5, s_churn=s_churn) if s_churn else make_sampler(name, V1_5, eta=eta)


_W = torch.randn(4, 4, generator=torch.Generator().manual_seed(1234)) / 2


def fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed deterministic stand-in for the UNet: eps depends on both x and t."""
    return torch.tanh((_W @ x.flatten(2)).view_as(x)) + 0.1 * math.sin(float(t) / 100)


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    err = (out - ref).abs().max().item()
    assert err <= TOL * ref.abs().max().item(), f"{what}: max|d|={err:.3g}"


def ref_step(ref, name: str, eps, t, x, gen, eta: float, s_churn: float) -> torch.Tensor:
    if name == "ddim":
        return ref.step(eps, t, x, eta=eta, generator=gen).prev_sample
    if name == "ddpm":
        return ref.step(eps, t, x, generator=gen).prev_sample
    if name == "euler":
        return ref.step(eps, t, x, s_churn=s_churn, generator=gen).prev_sample
    return ref.step(eps, t, x).prev_sample


def run_both(sampler, ref, name, eta, s_churn, ts, ref_ts, x) -> None:
    """Run both loops from x over their own timesteps, comparing every step's output."""
    assert torch.equal(ts, ref_ts) and ts.dtype == ref_ts.dtype
    g, g_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x_ref = x.clone()
    for i, (t, t_ref) in enumerate(zip(ts, ref_ts, strict=True)):
        xin, xin_ref = sampler.scale_model_input(x, t), ref.scale_model_input(x_ref, t_ref)
        assert_close(xin, xin_ref, f"scale_model_input at step {i}")
        x = sampler.step(fake_eps(xin, t), t, x, generator=g)
        x_ref = ref_step(ref, name, fake_eps(xin_ref, t_ref), t_ref, x_ref, g_ref, eta, s_churn)
        assert_close(x, x_ref, f"step {i} (t={int(t)})")
    assert torch.isfinite(x).all()
    assert torch.equal(g.get_state(), g_ref.get_state()), "generator consumed differently"


@pytest.mark.parametrize("name", ["ddim", "pndm", "plms", "ddpm", "euler"])
@pytest.mark.parametrize("steps", [*STEPS, 7, 500, 501, 999])
def test_timesteps_match(name: str, steps: int) -> None:
    s, ref = ours(name), reference(name)
    s.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert s.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(s.timesteps, ref.timesteps)
    assert s.order == ref.order
    assert s.init_noise_sigma == float(ref.init_noise_sigma)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sampling_loop_matches(case, steps: int) -> None:
    _, name, eta, s_churn = case
    s, ref = ours(name, eta, s_churn), reference(name)
    s.set_timesteps(steps)
    ref.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(42)) * ref.init_noise_sigma
    run_both(s, ref, name, eta, s_churn, s.timesteps, ref.timesteps, x)


@pytest.mark.parametrize("name", ["pndm", "euler", "ddim"])
def test_set_timesteps_resets_state(name: str) -> None:
    s = ours(name)
    outs = []
    for _ in range(2):
        s.set_timesteps(10)
        x = torch.ones(SHAPE)
        for t in s.timesteps:
            x = s.step(fake_eps(s.scale_model_input(x, t), t), t, x)
        outs.append(x)
    assert torch.equal(*outs)


@pytest.mark.parametrize("name", ["ddim", "pndm", "ddpm", "euler"])
def test_add_noise_matches(name: str) -> None:
    s, ref = ours(name), reference(name)
    s.set_timesteps(50)
    ref.set_timesteps(50)
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = s.timesteps[[3, 40]]
    assert_close(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t.clone()), "add_noise")


def diffusers_img2img_timesteps(ref, steps: int, strength: float) -> torch.Tensor:
    """diffusers' StableDiffusionImg2ImgPipeline.set_timesteps + get_timesteps, on the scheduler alone."""
    ref.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    return ref.timesteps[t_start * ref.order :]


@pytest.mark.parametrize("steps,strength", [(10, 0.3), (25, 0.75), (50, 0.6), (10, 1.0)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_img2img_matches(case, steps: int, strength: float) -> None:
    _, name, eta, s_churn = case
    s, ref = ours(name, eta, s_churn), reference(name)
    ts = s.img2img_timesteps(steps, strength)
    ref_ts = diffusers_img2img_timesteps(ref, steps, strength)
    gen = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    x = s.add_noise(x0, noise, ts[:1].repeat(SHAPE[0]))
    x_ref = ref.add_noise(x0, noise, ref_ts[:1].repeat(SHAPE[0]))
    assert_close(x, x_ref, "img2img add_noise")
    run_both(s, ref, name, eta, s_churn, ts, ref_ts, x)


@pytest.mark.parametrize("steps", [0, -1, 1000, 1001, 2.5, True])
@pytest.mark.parametrize("name", ["ddim", "pndm", "ddpm", "euler"])
def test_bad_steps(name: str, steps) -> None:
    with pytest.raises(InputError, match="steps"):
        ours(name).set_timesteps(steps)


@pytest.mark.parametrize("strength", [0, 0.0, -0.5, 1.5, float("nan")])
def test_bad_strength(strength: float) -> None:
    with pytest.raises(InputError, match="strength"):
        make_sampler("ddim", V1_5).img2img_timesteps(10, strength)


def test_strength_too_small_for_steps() -> None:
    with pytest.raises(InputError, match="no denoising step"):
        make_sampler("euler", V1_5).img2img_timesteps(10, 0.05)


def test_unknown_sampler_lists_valid_names() -> None:
    with pytest.raises(InputError) as err:
        make_sampler("dpm++", V1_5)
    for valid in SAMPLERS:
        assert valid in str(err.value)


def test_make_sampler_and_eta() -> None:
    assert type(make_sampler("plms", V1_5)) is type(make_sampler("PNDM", V1_5))
    assert make_sampler("ddim", V1_5, eta=0.3).eta == 0.3
    with pytest.raises(InputError, match="eta"):
        make_sampler("ddpm", V1_5, eta=0.5)
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="eta"):
            DDIMSampler(V1_5, eta=eta)


def test_euler_init_noise_sigma_and_scaling() -> None:
    s, ref = ours("euler"), reference("euler")
    assert s.init_noise_sigma == float(ref.init_noise_sigma)  # before set_timesteps: full table
    s.set_timesteps(50)
    ref.set_timesteps(50)
    assert s.init_noise_sigma == float(ref.init_noise_sigma) != 1.0
    assert torch.equal(s.sigmas, ref.sigmas)
