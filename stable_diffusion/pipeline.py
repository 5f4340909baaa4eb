"""Text -> image (and image -> image) sampling with classifier-free guidance, as the v1 pipeline does it.

The same prompt, seed, sampler and weights give the same image as diffusers' `StableDiffusionPipeline`
(tested); the UNet can be swapped for a compressed one with the same `(x, t, context)` signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import load_model, load_unet_into
from .config import SDConfig, get_config
from .errors import InputError, first_line
from .model import LatentDiffusion
from .samplers import Generators, make_sampler, randn
from .tokenizer import CLIPTokenizer


@dataclass
class Generation:
    images: list[Image.Image]
    pixels: torch.Tensor  # [B, 3, H, W] float in [0, 1]
    latents: torch.Tensor  # final (scaled) latents [B, 4, H/8, W/8]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = (pixels.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def load_image(image: str | Path | Image.Image) -> torch.Tensor:
    """An RGB image as a [1, 3, H, W] tensor in [-1, 1]."""
    try:  # PIL decodes lazily: a truncated file or one over its pixel limit fails in convert()
        rgb = (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read init image {image}: {first_line(e)}") from None
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


class StableDiffusion:
    def __init__(self, model: LatentDiffusion, tokenizer: CLIPTokenizer | None = None) -> None:
        self.model = model
        self.cfg: SDConfig = model.cfg
        self.tokenizer = tokenizer or CLIPTokenizer(max_length=self.cfg.clip.max_length)

    @classmethod
    def from_checkpoint(cls, path: str | Path, cfg: SDConfig | None = None, **kwargs: object) -> StableDiffusion:
        return cls(load_model(path, cfg, **kwargs))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The pipeline dtype: the VAE's (a swapped-in UNet may run in another dtype behind a cast wrapper)."""
        return next(self.model.vae.parameters()).dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return self.model.text_encoder(self.tokenizer(prompts).to(self.device))

    def check(self, *, steps: int, guidance: float, height: int, width: int, sampler: str) -> None:
        """Validate sampling options without sampling: a sweep checks them before it creates its run folder."""
        self._check(steps, guidance, height, width, 1)
        make_sampler(sampler, self.cfg)

    def _check(self, steps: int, guidance: float, height: int, width: int, batch: int) -> None:
        f = self.cfg.vae.downsample * 2 ** (len(self.cfg.unet.channel_mult) - 1)  # the UNet halves latents too
        if steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps}")
        if not math.isfinite(guidance):
            raise InputError(f"guidance must be a finite number, got {guidance}")
        if batch < 1:
            raise InputError(f"batch must be >= 1, got {batch}")
        if height < f or width < f or height % f or width % f:
            raise InputError(f"resolution {width}x{height} must be positive multiples of {f}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        steps: int = 50,
        sampler: str = "pndm",
        guidance: float = 7.5,
        seed: int = 0,
        seeds: list[int] | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        batch: int = 1,
        eta: float = 0.0,
        init_image: str | Path | Image.Image | torch.Tensor | None = None,
        strength: float = 0.8,
        progress: bool = True,
    ) -> Generation:
        """Sample `batch` images per prompt. `init_image` (img2img) starts from a noised encoding of it.

        `seeds` (one per image) gives each image its own generator for all its noise, so image i equals a
        one-image call with `seed=seeds[i]` whatever the batch; otherwise one generator (`seed`) serves all.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        if not prompts or len(negatives) != len(prompts):
            raise InputError("give one or more prompts, and as many negative prompts (or one)")
        init = None
        if init_image is not None:
            init = init_image if isinstance(init_image, torch.Tensor) else load_image(init_image)
            ih, iw = init.shape[-2:]
            if (height or ih, width or iw) != (ih, iw):
                raise InputError(
                    f"init image is {iw}x{ih} but the resolution asked for is {width or iw}x{height or ih}"
                )
            height, width = ih, iw
        height = self.cfg.resolution if height is None else height  # 0 is an error, not "the default"
        width = self.cfg.resolution if width is None else width
        self._check(steps, guidance, height, width, batch)
        n = len(prompts) * batch
        if seeds is not None and len(seeds) != n:
            raise InputError(f"{len(seeds)} seeds for {n} images: give one seed per image")
        gen: Generators = (
            [torch.Generator().manual_seed(s) for s in seeds] if seeds is not None
            else generator or torch.Generator().manual_seed(seed)
        )  # fmt: skip
        sched = make_sampler(sampler, self.cfg, eta=eta)

        cfg_on = guidance > 1.0  # as diffusers: no unconditional pass at guidance <= 1
        context = self.encode_prompt(prompts).repeat_interleave(batch, dim=0)
        if cfg_on:
            context = torch.cat([self.encode_prompt(negatives).repeat_interleave(batch, dim=0), context])
        shape = (n, self.cfg.unet.in_channels, height // self.cfg.vae.downsample, width // self.cfg.vae.downsample)

        if init is None:
            sched.set_timesteps(steps)
            timesteps = sched.timesteps
            latents = randn(shape, gen) * sched.init_noise_sigma
        else:
            timesteps = sched.img2img_timesteps(steps, strength)
            mean, std = self.model.vae.encode(init.to(self.device, self.dtype).expand(n, -1, -1, -1))
            eps = randn(tuple(mean.shape), gen).to(self.device, self.dtype)
            x0 = self.cfg.scale_factor * (mean + std * eps)
            noise = randn(shape, gen).cpu()
            latents = sched.add_noise(x0.float().cpu(), noise, timesteps[:1].repeat(n))
        latents = latents.to(self.device, self.dtype)

        for t in tqdm(timesteps, desc="sampling", disable=not progress, leave=False):
            x_in = sched.scale_model_input(torch.cat([latents] * 2) if cfg_on else latents, t)
            eps = self.model.unet(x_in, t.to(self.device), context)
            if cfg_on:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            latents = sched.step(eps, t, latents, generator=gen)

        pixels = self.decode(latents)
        return Generation(images=to_pil(pixels), pixels=pixels, latents=latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [0, 1]."""
        image = self.model.vae.decode(latents / self.cfg.scale_factor)
        return (image.float() / 2 + 0.5).clamp(0, 1)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_device(name: torch.device | str) -> str:
    """A device this machine has: cpu, or cuda[:N] when CUDA is available (not meta, not a typo)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda asked for, but no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise InputError(f"--device {name!r} cannot run the benchmark; use cpu or cuda")
    return str(name)


def load_pipeline(
    checkpoint: str | Path | None = None,
    config: str | None = None,
    unet: str | Path | None = None,
    dtype: str = "fp32",
    device: torch.device | str = "cpu",
    unsafe: bool = False,
) -> StableDiffusion:
    """The pipeline every command samples with: a v1 checkpoint (default: the embedded tiny model), its
    preset (recognised from the file unless `config` names one), optionally another UNet swapped in."""
    from .defaults import embedded_checkpoint  # defaults builds a model: imported on use

    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    check_device(device)
    cfg = get_config(config) if config else None
    sd = StableDiffusion.from_checkpoint(checkpoint or embedded_checkpoint(), cfg, dtype=DTYPES[dtype], device=device,
                                         unsafe=unsafe)  # fmt: skip
    if unet:
        load_unet_into(sd.model, unet, unsafe=unsafe)
    return sd
