"""Progressive distillation (`stable_diffusion.distill`): DDIM arithmetic against the sampler, the two-step
target where the math makes it exact, a step lowering the loss, and bit-identical resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from stable_diffusion.checkpoint import save_checkpoint
from stable_diffusion.config import TINY
from stable_diffusion.distill import DistillConfig, Distiller, ddim_jump, student_path, x_target
from stable_diffusion.errors import InputError
from stable_diffusion.samplers import DDIMSampler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_file(tiny_model, tmp_path_factory):
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("teacher") / "teacher.safetensors", TINY)


def _config(tmp_path, teacher_file, **kw) -> DistillConfig:
    base = dict(checkpoint=str(teacher_file), config="tiny", out_dir=str(tmp_path / "out"),
                work_dir=str(tmp_path / "work"), start_steps=4, end_steps=2, pool=8, batch=4, round_steps=4,
                round_minutes=5, save_every=2)  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


@pytest.mark.parametrize("steps", [4, 7])
def test_ddim_jump_is_the_samplers_step(steps):
    s = DDIMSampler(TINY)
    s.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for t in s.timesteps.tolist():
        a_t, a_s = s.alphas_cumprod[t], s._alpha_prev(t - 1000 // steps)
        jumped = ddim_jump(z, eps, a_t, a_s)
        assert torch.equal(jumped, s.step(eps, t, z))
        # the target x0 makes one jump land where it should
        x = x_target(z, jumped, a_t, a_s)
        eps_x = (z - a_t**0.5 * x) / (1 - a_t) ** 0.5
        torch.testing.assert_close(ddim_jump(z, eps_x, a_t, a_s), jumped, rtol=1e-5, atol=1e-5)


def _point_mass(x_star: torch.Tensor, alphas: torch.Tensor):
    """The exact eps of a one-point data distribution: DDIM then follows the ODE exactly in any number of steps."""

    def eps(z, t, ctx):
        a = alphas[t].view(-1, 1, 1, 1)
        return (z - a**0.5 * x_star) / (1 - a) ** 0.5

    return eps


def test_two_teacher_steps_equal_one_where_the_math_says(tmp_path, teacher_file):
    """For a point-mass teacher two DDIM steps equal one, so the target is the point itself, at every student time
    (incl. the last step and pure-noise inputs), and a student with the same eps has zero loss."""
    d = Distiller(_config(tmp_path, teacher_file, batch=64), progress=False)
    x_star = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    eps = _point_mass(x_star, d.sampler.alphas_cumprod)
    d.teacher_eps = eps
    z, i, ctx, target = d.batch(torch.Generator().manual_seed(2))
    assert set(i.tolist()) == {0, 1}  # both student times drawn
    torch.testing.assert_close(target, x_star.expand_as(target), rtol=1e-4, atol=1e-4)
    d.student = eps
    assert float(d.loss(z, i, ctx, target)) < 1e-6


def test_student_copy_of_the_teacher_matches_its_last_step_exactly(tmp_path, teacher_file):
    """Unguided, the last student step (t=1 -> end) has one teacher step as target: a copy of the teacher hits it."""
    d = Distiller(_config(tmp_path, teacher_file, guidance=1.0, batch=16), progress=False)
    z, i, ctx, target = d.batch(torch.Generator().manual_seed(3))
    last = i == len(d.sampler.timesteps) - 1
    assert last.any() and (~last).any()
    with torch.no_grad():
        assert float(d.loss(z[last], i[last], ctx[last], target[last])) < 1e-8
        assert float(d.loss(z[~last], i[~last], ctx[~last], target[~last])) > 1e-6  # two steps != one elsewhere


def test_a_step_lowers_the_loss_on_a_fixed_batch(tmp_path, teacher_file):
    d = Distiller(_config(tmp_path, teacher_file), progress=False)
    fixed = d.batch(torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = float(d.loss(*fixed))
    for _ in range(3):
        d.opt.zero_grad()
        d.loss(*fixed).backward()
        d.opt.step()
    with torch.no_grad():
        assert float(d.loss(*fixed)) < before


def test_resume_continues_bit_identically(tmp_path, teacher_file):
    """Killed after a saved step, `--resume` ends with the same students as an uninterrupted run."""
    straight = Distiller(_config(tmp_path / "a", teacher_file, batch=2, round_steps=3), progress=False).run()
    cfg = _config(tmp_path / "b", teacher_file, batch=2, round_steps=3)
    first = Distiller(cfg, progress=False)
    first.advance()
    first.advance()
    first.save_state()  # what a kill after step 2 of the 4 -> 2 round leaves behind
    resumed = Distiller(cfg, progress=False)
    resumed.load_state()
    assert (resumed.round_of, resumed.step) == (2, 2)
    again = Distiller(cfg, progress=False).run(resume=True)
    assert [p.name for p in again] == [p.name for p in straight] == ["teacher-distilled-2steps.safetensors"]
    for a, b in zip(straight, again, strict=True):
        wa, wb = load_file(a), load_file(b)
        assert wa.keys() == wb.keys() and all(k.startswith("model.diffusion_model.") for k in wa)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert wa["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert student_path(cfg.out_dir, teacher_file, 2) == again[0]


def test_bad_chain(tmp_path, teacher_file):
    with pytest.raises(InputError):
        Distiller(_config(tmp_path, teacher_file, start_steps=4, end_steps=4), progress=False)
