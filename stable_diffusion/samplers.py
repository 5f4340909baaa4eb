"""Samplers for Stable Diffusion v1: DDIM, PNDM (PLMS), DDPM and Euler.

Each sampler reproduces the matching diffusers scheduler under the SD v1-5 scheduler config
(scaled_linear betas, "leading" timestep spacing with steps_offset=1, set_alpha_to_one=False,
clip_sample=False, epsilon prediction, PNDM with skip_prk_steps=True). The arithmetic keeps
diffusers' float32 dtypes and evaluation order on purpose: a seeded loop then gives the same
floats as diffusers, bit for bit, which is what makes it a usable reference.

Usage (text-to-image): `set_timesteps(n)`, start from `randn * init_noise_sigma`, then for each
`t` in `timesteps`: `eps = unet(scale_model_input(x, t), t)`; `x = step(eps, t, x, generator)`.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import SDConfig
from .errors import InputError

STEPS_OFFSET = 1  # SD v1-5 shifts the "leading" timesteps by one, so the last one is t=1


Generators = torch.Generator | list[torch.Generator] | None  # a list: one generator per batch row


def randn(
    shape: tuple[int, ...],
    generator: Generators,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise drawn as diffusers' randn_tensor does, on the generator's device.

    With a list, row i comes from generator i alone, so an image's noise does not depend on its batch.
    """
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, dtype, device).to(device) for g in generator])
    device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _randn(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Noise shaped like `like` (see `randn`), moved to its device."""
    return randn(tuple(like.shape), generator, like.dtype, like.device).to(like.device)


def alphas_cumprod(cfg: SDConfig) -> torch.Tensor:
    """The v1 schedule: scaled_linear betas (linspace of square roots, squared), cumulative alpha products."""
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class Sampler:
    """The v1 noise schedule and the interface the pipeline uses; subclasses implement `_step`."""

    order: int = 1

    def __init__(self, cfg: SDConfig) -> None:
        self.num_train_timesteps = cfg.num_train_timesteps
        self.alphas_cumprod = alphas_cumprod(cfg)
        self.final_alpha_cumprod = self.alphas_cumprod[0]  # set_alpha_to_one=False
        self.num_steps = 0
        self.timesteps = torch.empty(0, dtype=torch.int64)
        self._begin_index: int | None = None  # first schedule index of an img2img run

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the starting latent noise."""
        return 1.0

    def _leading(self, num_steps: int) -> np.ndarray:
        """Ascending "leading" timesteps: 0, r, 2r, ... (r = N // steps), plus the offset."""
        return np.arange(0, num_steps, dtype=np.int64) * (self.num_train_timesteps // num_steps) + STEPS_OFFSET

    def set_timesteps(self, num_steps: int) -> None:
        """Choose the timesteps to visit and forget the state of any previous run.

        At most N - 1 steps: with N steps the offset schedule would reach t = N, past the table
        (diffusers' DDIM then fails with an IndexError and Euler silently clamps sigma).
        """
        n = self.num_train_timesteps - STEPS_OFFSET
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= n:
            raise InputError(f"steps must be an integer between 1 and {n}, got {num_steps!r}")
        self.num_steps = num_steps
        self._begin_index = None
        self.timesteps = self._make_timesteps(num_steps)
        self._reset()

    def _make_timesteps(self, num_steps: int) -> torch.Tensor:
        return torch.from_numpy(self._leading(num_steps)[::-1].copy())

    def _reset(self) -> None:
        """Drop per-run state (multistep history, step index)."""

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The UNet input for x at t; only Euler rescales."""
        return x

    def step(
        self, eps: torch.Tensor, t: torch.Tensor | int, x: torch.Tensor, generator: Generators = None
    ) -> torch.Tensor:
        """Move x from timestep t to the next, less noisy one, given the predicted noise eps."""
        if self.num_steps == 0:
            raise RuntimeError("call set_timesteps() before step()")
        return self._step(eps, int(t), x, generator)

    def _step(self, eps: torch.Tensor, t: int, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward-diffuse x0 to timestep(s) t (one per batch item): sqrt(a) x0 + sqrt(1 - a) noise."""
        a = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return (a**0.5).flatten().view(shape) * x0 + ((1 - a) ** 0.5).flatten().view(shape) * noise

    def img2img_timesteps(self, num_steps: int, strength: float) -> torch.Tensor:
        """Set up `num_steps` and return the tail of the schedule that img2img runs.

        As diffusers' StableDiffusionImg2ImgPipeline.get_timesteps: strength 1 runs every step,
        strength s skips the first (1 - s) of them. Noise the image to the first returned timestep.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise InputError(f"strength must be in (0, 1], got {strength!r}")
        self.set_timesteps(num_steps)
        init_timestep = min(int(num_steps * strength), num_steps)
        if init_timestep == 0:
            raise InputError(f"strength {strength} with {num_steps} steps leaves no denoising step; raise either")
        t_start = max(num_steps - init_timestep, 0) * self.order
        self._begin_index = t_start
        return self.timesteps[t_start:]

    def _alpha_prev(self, prev_t: int) -> torch.Tensor:
        return self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021): deterministic at eta=0; eta=1 adds DDPM-sized noise."""

    def __init__(self, cfg: SDConfig, eta: float = 0.0) -> None:
        super().__init__(cfg)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise InputError(f"eta must be in [0, 1], got {eta!r}")
        self.eta = float(eta)

    def _step(self, eps: torch.Tensor, t: int, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        prev_t = t - self.num_train_timesteps // self.num_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self._alpha_prev(prev_t)
        b_t = 1 - a_t
        x0 = (x - b_t**0.5 * eps) / a_t**0.5
        variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
        std = self.eta * variance**0.5
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * _randn(eps, generator)
        return x_prev


class PNDMSampler(Sampler):
    """PLMS: the DDIM-style transfer driven by a 4th-order Adams-Bashforth blend of past eps.

    As diffusers' PNDMScheduler with skip_prk_steps=True, the first step is a Heun-like
    warm-up: the schedule repeats the second timestep, and the repeated visit averages the two
    eps and redoes the first transfer from the saved sample. So n steps take n+1 model calls
    (n when n=1).
    """

    def _make_timesteps(self, num_steps: int) -> torch.Tensor:
        asc = self._leading(num_steps)
        return torch.from_numpy(np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].copy())

    def _reset(self) -> None:
        self._ets: list[torch.Tensor] = []  # past eps, newest last
        self._counter = 0  # steps taken in this run
        self._cur_sample: torch.Tensor | None = None  # x before the warm-up step

    def _step(self, eps: torch.Tensor, t: int, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        ratio = self.num_train_timesteps // self.num_steps
        prev_t = t - ratio
        if self._counter != 1:
            self._ets = [*self._ets[-3:], eps]
        else:  # the warm-up's repeated timestep: redo the first transfer
            prev_t, t = t, t + ratio
        e = self._ets
        if len(e) == 1 and self._counter == 0:
            self._cur_sample = x
        elif len(e) == 1 and self._counter == 1:
            eps = (eps + e[-1]) / 2
            x, self._cur_sample = self._cur_sample, None
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = 1 / 24 * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self._counter += 1
        return self._transfer(x, t, prev_t, eps)

    def _transfer(self, x: torch.Tensor, t: int, prev_t: int, eps: torch.Tensor) -> torch.Tensor:
        """PNDM's eq. (9): x_{t-d} from x_t and eps, written as diffusers does."""
        a_t = self.alphas_cumprod[t]
        a_prev = self._alpha_prev(prev_t)
        b_t = 1 - a_t
        b_prev = 1 - a_prev
        x_coeff = (a_prev / a_t) ** 0.5
        eps_denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return x_coeff * x - (a_prev - a_t) * eps / eps_denom


class DDPMSampler(Sampler):
    """Ancestral DDPM (Ho et al. 2020) with the "fixed_small" posterior variance, on a sub-schedule."""

    def __init__(self, cfg: SDConfig) -> None:
        super().__init__(cfg)
        self._one = torch.tensor(1.0)  # alpha_cumprod "before" the first step (diffusers' self.one)

    def _prev_timestep(self, t: int) -> int:
        """The next timestep of the schedule, or -1 after the last one."""
        idx = int((self.timesteps == t).nonzero()[0][0])
        return -1 if idx == len(self.timesteps) - 1 else int(self.timesteps[idx + 1])

    def _step(self, eps: torch.Tensor, t: int, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        prev_t = self._prev_timestep(t)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self._one
        b_t = 1 - a_t
        b_prev = 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        x0 = (x - b_t**0.5 * eps) / a_t**0.5
        x0_coeff = a_prev**0.5 * cur_beta / b_t
        x_coeff = cur_alpha**0.5 * b_prev / b_t
        x_prev = x0_coeff * x0 + x_coeff * x
        if t > 0:  # diffusers draws noise down to t=1 (variance clamped to 1e-20 there)
            noise = _randn(eps, generator)
            variance = torch.clamp((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), min=1e-20)
            x_prev = x_prev + variance**0.5 * noise
        return x_prev


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE in sigma = sqrt((1 - a) / a) (Karras et al. 2022).

    As diffusers' EulerDiscreteScheduler: the latent lives at scale sqrt(1 + sigma^2), so the UNet
    input is rescaled, and the step position is tracked by index (set from the first timestep
    seen, or from the img2img start). `s_churn > 0` adds fresh noise each step ("Euler churn").
    """

    def __init__(self, cfg: SDConfig, s_churn: float = 0.0) -> None:
        super().__init__(cfg)
        if isinstance(s_churn, bool) or not isinstance(s_churn, (int, float)) or not s_churn >= 0:
            raise InputError(f"s_churn must be >= 0, got {s_churn!r}")
        self.s_churn = float(s_churn)
        self._sigma_table = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # sigma for t = 0..N-1
        self.sigmas = torch.cat([self._sigma_table.flip(0), torch.zeros(1)])
        self._step_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        """Latent scale at the first step: sqrt(sigma_max^2 + 1) for "leading" spacing."""
        return float((self.sigmas.max() ** 2 + 1) ** 0.5)

    def _make_timesteps(self, num_steps: int) -> torch.Tensor:
        ts = self._leading(num_steps)[::-1].copy()
        self.sigmas = torch.cat([self._sigma_table[torch.from_numpy(ts)], torch.zeros(1)])
        return torch.from_numpy(ts.astype(np.float32))

    def _reset(self) -> None:
        self._step_index = None

    def _index_for(self, t: torch.Tensor | float) -> int:
        """Schedule position of timestep t (the second match if t repeats, as diffusers)."""
        idx = (self.timesteps == t).nonzero()
        if len(idx) == 0:
            raise ValueError(f"timestep {float(t)} is not in this sampler's schedule")
        return int(idx[1 if len(idx) > 1 else 0])

    def _ensure_index(self, t: torch.Tensor | float) -> int:
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._index_for(t)
        return self._step_index

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        sigma = self.sigmas[self._ensure_index(t)]
        return x / (sigma**2 + 1) ** 0.5

    def _step(self, eps: torch.Tensor, t: int, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        i = self._ensure_index(t)
        sample = x.to(torch.float32)
        sigma = self.sigmas[i]
        gamma = min(self.s_churn / (len(self.sigmas) - 1), 2**0.5 - 1)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:  # diffusers only draws noise when churning
            sample = sample + _randn(eps, generator) * (sigma_hat**2 - sigma**2) ** 0.5
        x0 = sample - sigma_hat * eps
        derivative = (sample - x0) / sigma_hat
        x_prev = sample + derivative * (self.sigmas[i + 1] - sigma_hat)
        self._step_index = i + 1
        return x_prev.to(eps.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 + sigma * noise, sigma taken at the img2img start (or looked up per t)."""
        if self._begin_index is None:
            idx = [self._index_for(ti) for ti in t.cpu().flatten()]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * t.shape[0]
        sigma = self.sigmas.to(device=x0.device, dtype=x0.dtype)[idx].flatten()
        return x0 + noise * sigma.view((-1,) + (1,) * (x0.dim() - 1))


SAMPLERS: dict[str, type[Sampler]] = {
    "ddim": DDIMSampler,
    "pndm": PNDMSampler,
    "plms": PNDMSampler,
    "ddpm": DDPMSampler,
    "euler": EulerSampler,
}


def make_sampler(name: str, cfg: SDConfig, eta: float = 0.0) -> Sampler:
    """Build a sampler by name for cfg's noise schedule; `eta` applies to DDIM only."""
    cls = SAMPLERS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise InputError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    if cls is DDIMSampler:
        return DDIMSampler(cfg, eta=eta)
    if eta != 0:
        raise InputError(f"eta only applies to the ddim sampler, not {name!r}")
    return cls(cfg)
