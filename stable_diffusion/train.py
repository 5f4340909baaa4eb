"""Train the `tiny` preset from scratch on the procedural shapes dataset (`python -m stable_diffusion.train`).

Two stages, as Stable Diffusion v1 was made:
1. VAE: KL-regularised autoencoder (L1 + L2 reconstruction, small KL weight) on generator images. Afterwards the
   latent scale is folded into the VAE weights (quant_conv / post_quant_conv), so that `cfg.scale_factor`
   (0.18215, as SD v1) times a posterior sample has unit standard deviation -- the preset needs no change.
2. UNet + CLIP-architecture text encoder, jointly, in latent space: v1 noise schedule (scaled_linear
   0.00085-0.012, 1000 steps), epsilon prediction, ~10 % caption dropout (empty prompt "") so that
   classifier-free guidance works. An EMA of the UNet and text weights is what gets saved.

Resumable: a state file (`<work-dir>/state.pt`: weights, optimizer, EMA, stage, step) is written every
`--save-every` steps and at the end of each stage; `--resume` continues from it. Each stage stops at its step
count or its time budget, whichever comes first. The result is a v1 CompVis-layout safetensors file (fp16 by
default, a few MB; `load_model` upcasts to float32).
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_model, safe_load_object, save_checkpoint
from .config import SDConfig, get_config
from .defaults import DATA_DIR, WEIGHTS_DIR
from .errors import InputError, SDBenchError
from .model import LatentDiffusion
from .samplers import alphas_cumprod
from .shapes import ShapesDataset
from .tokenizer import CLIPTokenizer

log = logging.getLogger("stable_diffusion.train")

DEFAULT_OUT = WEIGHTS_DIR / "tiny-shapes.safetensors"


@dataclass
class TrainConfig:
    config: str = "tiny"
    # GroupNorm groups of the VAE and UNet (0 = the preset's: 8 for tiny). 32 groups over 32 channels would be
    # per-channel instance norms, which erase absolute colour levels (a flat crop decodes to the bias alone);
    # 8 groups (4 channels each, as SD's 128/32) keep them. No weight shape depends on it: see the module doc.
    groups: int = 0
    out: str = str(DEFAULT_OUT)
    work_dir: str = str(DATA_DIR / "cache" / "train-tiny-shapes")
    seed: int = 0
    threads: int = 0  # torch threads (0 = leave as is)
    # warm start: a v1 checkpoint of this preset (e.g. the shipped default) whose VAE is kept frozen and whose
    # UNet + text encoder continue training; the VAE stage is skipped (its latent scale is already folded in)
    init: str = ""
    pool: int = 4096  # generator images the stages draw from (train split, indices 0..pool-1)
    # VAE stage (fully convolutional: trained on random crops, which is cheaper and works at full size)
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    vae_minutes: float = 9.0
    kl_weight: float = 1e-6
    init_logvar: float = -8.0
    # UNet + text stage (latents of the pool are encoded once; each step samples the posterior)
    unet_steps: int = 20000
    unet_batch: int = 16
    unet_lr: float = 1e-3
    text_lr: float = 5e-4
    unet_minutes: float = 30.0
    cond_drop: float = 0.1
    ema_decay: float = 0.995
    warmup: int = 100
    # "cosine": the UNet/text learning rate decays to lr_min_frac of its base over unet_steps (a longer run ends
    # on a small step size, which is where a fixed-budget run gains most); "constant" as the first default
    lr_schedule: str = "constant"
    lr_min_frac: float = 0.1
    # bookkeeping
    save_every: int = 500
    fp16: bool = True

    def command(self) -> str:
        """The exact CLI invocation that reproduces this run."""
        default = TrainConfig()
        args = []
        for f in fields(self):
            v, d = getattr(self, f.name), getattr(default, f.name)
            if v != d:
                flag = "--" + f.name.replace("_", "-")
                if isinstance(v, bool):
                    args.append(flag if v else "--no-" + f.name.replace("_", "-"))
                else:
                    args.append(f"{flag} {shlex.quote(str(v))}")
        return " ".join([".venv/bin/python -m stable_diffusion.train", *args])


# ---------------------------------------------------------------------------------------------------------------
def _images(ds: ShapesDataset, idx: np.ndarray) -> torch.Tensor:
    """uint8 generator images -> float [-1, 1] [B, 3, H, W]."""
    arr = np.stack([ds[int(i)][0] for i in idx])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Pool:
    """A fixed pool of generator images (uint8), their captions and token ids, made once."""

    def __init__(self, cfg: SDConfig, n: int, seed: int, tokenizer: CLIPTokenizer) -> None:
        ds = ShapesDataset("train", seed, cfg.resolution)
        imgs, self.captions = [], []
        for i in tqdm(range(n), desc="generating images", leave=False):
            img, cap, _ = ds[i]
            imgs.append(img)
            self.captions.append(cap)
        self.images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()  # uint8
        uniq = sorted(set(self.captions))
        ids = tokenizer(uniq)
        where = {c: j for j, c in enumerate(uniq)}
        self.ids = ids[[where[c] for c in self.captions]]
        self.empty_ids = tokenizer([""])[0]

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx].float() / 127.5 - 1.0


def noised(
    alphas_cumprod: torch.Tensor, x0: torch.Tensor, gen: torch.Generator, num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward diffusion of x0 at uniformly drawn timesteps: (x_t, t, noise), drawn in that order from `gen`."""
    t = torch.randint(num_train_timesteps, (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise


LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(schedule: str) -> None:
    """One message for a bad --lr-schedule, for train and distill alike."""
    if schedule not in LR_SCHEDULES:
        raise InputError(f"--lr-schedule {schedule!r}: use {' or '.join(LR_SCHEDULES)}")


def lr_at(
    step: int, base: float, warmup: int, schedule: str = "constant", total: int = 0, min_frac: float = 0.1
) -> float:
    """Linear warmup, then constant or cosine decay to min_frac * base at `total` steps."""
    lr = base * min(1.0, (step + 1) / max(1, warmup))
    if schedule == "cosine" and total > warmup:
        frac = min(1.0, max(0.0, (step - warmup) / (total - warmup)))
        lr *= min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * frac))
    return lr


@torch.no_grad()
def fold_scale(vae: nn.Module, k: float) -> None:
    """Rescale the VAE so its latents are k times larger, exactly (decode(k z) after == decode(z) before)."""
    zc = vae.post_quant_conv.in_channels
    qc = vae.quant_conv
    qc.weight[:zc] *= k
    qc.bias[:zc] *= k
    qc.bias[zc:] += 2 * math.log(k)  # logvar: std scales by k
    vae.post_quant_conv.weight /= k


@torch.no_grad()
def latent_std(vae: nn.Module, pool: Pool, n: int = 512, batch: int = 64) -> float:
    """Std of posterior samples over n pool images (what SD's scale_factor normalises)."""
    gen = torch.Generator().manual_seed(1234)
    zs = []
    for s in range(0, min(n, len(pool)), batch):
        idx = torch.arange(s, min(s + batch, n, len(pool)))
        mean, std = vae.encode(pool.pixels(idx))
        zs.append(mean + std * torch.randn(mean.shape, generator=gen))
    return float(torch.cat(zs).std())


def training_config(tc: TrainConfig) -> SDConfig:
    """The preset, with the VAE / UNet GroupNorm group count of the run (same weight shapes, same name)."""
    cfg = get_config(tc.config)
    if tc.groups and (cfg.vae.groups != tc.groups or cfg.unet.groups != tc.groups):
        cfg = replace(cfg, vae=replace(cfg.vae, groups=tc.groups), unet=replace(cfg.unet, groups=tc.groups))
    return cfg


class EMA:
    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v, 1 - d)

    def copy_to(self, module: nn.Module) -> None:
        sd = module.state_dict()
        sd.update(self.shadow)
        module.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, tc: TrainConfig, progress: bool = True) -> None:
        self.tc = tc
        self.cfg = training_config(tc)
        self.progress = progress
        self.work = Path(tc.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(tc.seed)
        self.model = LatentDiffusion(self.cfg)
        with torch.no_grad():  # start the posterior narrow (std ~0.02): with std 1 the noise drowns the code early on
            zc = self.cfg.vae.z_channels
            self.model.vae.quant_conv.bias[zc:] = tc.init_logvar
        self.stage = "vae"
        self.step = 0
        self.history: dict[str, list[float]] = {"vae": [], "unet": []}
        self.elapsed = {"vae": 0.0, "unet": 0.0}
        self.scale_std: float | None = None
        self._make_opts()
        check_lr_schedule(tc.lr_schedule)
        if tc.init:
            self._warm_start(Path(tc.init))
        self.ema = EMA(self._diffusion_modules(), tc.ema_decay)
        self.tokenizer = CLIPTokenizer(max_length=self.cfg.clip.max_length)
        self._pool: Pool | None = None
        self.alphas_cumprod = alphas_cumprod(self.cfg)

    def _warm_start(self, path: Path) -> None:
        """Load every weight from a v1 checkpoint of the same preset and start at the UNet stage."""
        if not path.is_file():
            raise InputError(f"--init {path}: no such file")
        src = load_model(path)
        if src.cfg.unet != self.cfg.unet or src.cfg.vae != self.cfg.vae:
            raise InputError(f"--init {path}: not a {self.tc.config!r} checkpoint of this run's shapes/groups")
        self.model.load_state_dict(src.state_dict(), strict=True)
        self.stage = "unet"
        log.info("warm start from %s: VAE kept, UNet + text encoder continue training", path)

    def _diffusion_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"unet": self.model.unet, "text": self.model.text_encoder})

    def _make_opts(self) -> None:
        tc = self.tc
        self.vae_opt = torch.optim.AdamW(self.model.vae.parameters(), lr=tc.vae_lr, weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW(
            [
                {"params": list(self.model.unet.parameters()), "lr": tc.unet_lr, "base": tc.unet_lr},
                {"params": list(self.model.text_encoder.parameters()), "lr": tc.text_lr, "base": tc.text_lr},
            ],
            weight_decay=0.01,
        )

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = Pool(self.cfg, self.tc.pool, self.tc.seed, self.tokenizer)
        return self._pool

    @torch.no_grad()
    def latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) of every pool image under the (frozen) VAE, computed once."""
        if getattr(self, "_latents", None) is None:
            self.model.vae.eval()
            means, stds = [], []
            for s in tqdm(range(0, len(self.pool), 64), desc="encoding latents", disable=not self.progress):
                m, sd = self.model.vae.encode(self.pool.pixels(torch.arange(s, min(s + 64, len(self.pool)))))
                means.append(m)
                stds.append(sd)
            self._latents = (torch.cat(means), torch.cat(stds))
        return self._latents

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.work / "state.pt"

    def save_state(self) -> None:
        state = {
            "train_config": asdict(self.tc),
            "stage": self.stage,
            "step": self.step,
            "model": self.model.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "unet_opt": self.unet_opt.state_dict(),
            "ema": self.ema.shadow,
            "history": self.history,
            "elapsed": self.elapsed,
            "scale_std": self.scale_std,
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def load_state(self) -> None:
        state = safe_load_object(self.state_path, "training state")  # weights_only: a planted pickle cannot run
        if not isinstance(state, dict):
            raise InputError(
                f"training state {self.state_path}: not a state dict; delete it or pass another --work-dir"
            )
        self.model.load_state_dict(state["model"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.ema.shadow = state["ema"]
        self.stage, self.step = state["stage"], state["step"]
        self.history, self.elapsed, self.scale_std = state["history"], state["elapsed"], state["scale_std"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s: stage %s, step %d", self.state_path, self.stage, self.step)

    # -- stages ------------------------------------------------------------------------------------------------
    def vae_step(self, gen: torch.Generator) -> float:
        tc, vae = self.tc, self.model.vae
        loss = self.vae_loss(gen)
        for g in self.vae_opt.param_groups:
            g["lr"] = lr_at(self.step, tc.vae_lr, 50)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        self.vae_opt.step()
        return float(loss.detach())

    def vae_loss(self, gen: torch.Generator) -> torch.Tensor:
        """Reconstruction (L1 + L2) + kl_weight * KL on a batch drawn with `gen`."""
        tc, vae = self.tc, self.model.vae
        idx = torch.randint(len(self.pool), (tc.vae_batch,), generator=gen)
        x = self.pool.pixels(idx)
        c = tc.vae_crop
        if c and c < x.shape[-1]:
            i, j = (int(v) for v in torch.randint(x.shape[-1] - c + 1, (2,), generator=gen))
            x = x[..., i : i + c, j : j + c]
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x, x.flip(-1))  # h-flip augmentation
        mean, std = vae.encode(x)
        z = mean + std * torch.randn(mean.shape, generator=gen)
        rec = vae.decode(z)
        kl = 0.5 * (mean.square() + std.square() - 1 - 2 * torch.log(std)).sum(dim=(1, 2, 3)).mean()
        return (rec - x).abs().mean() + (rec - x).square().mean() + tc.kl_weight * kl

    def unet_step(self, gen: torch.Generator) -> float:
        tc = self.tc
        loss = self.unet_loss(gen)
        for g in self.unet_opt.param_groups:
            g["lr"] = lr_at(self.step, g["base"], tc.warmup, tc.lr_schedule, tc.unet_steps, tc.lr_min_frac)
        self.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(list(self.model.unet.parameters()) + list(self.model.text_encoder.parameters()), 1.0)
        self.unet_opt.step()
        self.ema.update(self._diffusion_modules(), self.step)
        return float(loss.detach())

    def unet_loss(self, gen: torch.Generator) -> torch.Tensor:
        """Epsilon-prediction MSE on a batch (latents, captions with dropout, timesteps, noise) drawn with `gen`."""
        tc, cfg = self.tc, self.cfg
        pool = self.pool
        idx = torch.randint(len(pool), (tc.unet_batch,), generator=gen)
        mean, std = self.latents()
        mean, std = mean[idx], std[idx]
        x0 = cfg.scale_factor * (mean + std * torch.randn(mean.shape, generator=gen))
        ids = pool.ids[idx].clone()
        drop = torch.rand(len(ids), generator=gen) < tc.cond_drop
        ids[drop] = pool.empty_ids
        context = self.model.text_encoder(ids)
        xt, t, noise = noised(self.alphas_cumprod, x0, gen, cfg.num_train_timesteps)
        eps = self.model.unet(xt, t, context)
        return F.mse_loss(eps, noise)

    def _run_stage(self, name: str, max_steps: int, minutes: float, fn) -> None:
        # a per-(stage, step) generator: a resumed run draws the batches the uninterrupted one would
        self.model.train()
        bar = tqdm(total=max_steps, initial=self.step, desc=f"train {name}", disable=not self.progress)
        t_start = time.monotonic() - self.elapsed[name]
        while self.step < max_steps and (time.monotonic() - t_start) < minutes * 60:
            gen = torch.Generator().manual_seed(self.tc.seed * 1_000_003 + self.step * 7 + (name == "unet"))
            loss = fn(gen)
            self.history[name].append(loss)
            self.step += 1
            self.elapsed[name] = time.monotonic() - t_start
            bar.update(1)
            if self.step % 25 == 0:
                recent = self.history[name][-25:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            if self.step % 200 == 0:
                recent = self.history[name][-200:]
                log.info(
                    "%s step %d loss %.5f (%.1f min)",
                    name,
                    self.step,
                    sum(recent) / len(recent),
                    self.elapsed[name] / 60,
                )
            if self.tc.save_every and self.step % self.tc.save_every == 0:
                self.save_state()
        bar.close()
        self.elapsed[name] = time.monotonic() - t_start
        log.info("%s stage done: %d steps in %.1f min", name, self.step, self.elapsed[name] / 60)

    def run(self, resume: bool = False) -> Path:
        if resume and self.state_path.exists():
            self.load_state()
            if self.stage == "done" and (
                self.step < self.tc.unet_steps and self.elapsed["unet"] < self.tc.unet_minutes * 60
            ):
                self.stage = "unet"  # resumed with a larger step count or time budget: keep training
        if self.stage == "vae":
            self.model.text_encoder.requires_grad_(False)
            self.model.unet.requires_grad_(False)
            self.model.vae.requires_grad_(True)
            self._run_stage("vae", self.tc.vae_steps, self.tc.vae_minutes, self.vae_step)
            self.model.eval()
            std = latent_std(self.model.vae, self.pool)
            # fold the latent scale into the VAE: scale_factor * z then has unit std, as in SD v1
            k = 1.0 / (self.cfg.scale_factor * std)
            fold_scale(self.model.vae, k)
            self.scale_std = std
            log.info(
                "VAE latent std %.4f (SD-style scale factor would be %.5f); folded x%.4f into the VAE so that "
                "scale_factor %.5f gives unit-std latents (now %.4f)",
                std,
                1 / std,
                k,
                self.cfg.scale_factor,
                self.cfg.scale_factor * latent_std(self.model.vae, self.pool, n=128),
            )
            self.stage, self.step = "unet", 0
            self.save_state()
        if self.stage == "unet":
            self.model.vae.requires_grad_(False).eval()
            self.model.unet.requires_grad_(True)
            self.model.text_encoder.requires_grad_(True)
            self._run_stage("unet", self.tc.unet_steps, self.tc.unet_minutes, self.unet_step)
            self.stage = "done"
            self.save_state()
        return self.export()

    def export(self, path: str | Path | None = None) -> Path:
        """Write the (EMA) model as a v1 CompVis safetensors checkpoint."""
        model = LatentDiffusion(self.cfg)
        model.load_state_dict(self.model.state_dict())
        self.ema.copy_to(nn.ModuleDict({"unet": model.unet, "text": model.text_encoder}))
        if self.tc.fp16:
            model = model.half()
        out = save_checkpoint(model, path or self.tc.out, self.cfg)
        log.info("saved %s (%.1f MB)", out, out.stat().st_size / 1e6)
        return out


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool, bool]:
    p = argparse.ArgumentParser(prog="python -m stable_diffusion.train", description=__doc__.split("\n")[0])
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}[str(f.type)]
            p.add_argument(flag, type=typ, default=f.default)
    p.add_argument("--resume", action="store_true", help="continue from <work-dir>/state.pt")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    tc = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})
    return tc, a.resume, not a.no_progress


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tc, resume, progress = parse_args(argv)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    t0 = time.monotonic()
    try:
        out = Trainer(tc, progress=progress).run(resume=resume)
    except SDBenchError as e:  # a bad flag or file (InputError, CheckpointError): a message, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("total %.1f min; reproduce with:\n  %s", (time.monotonic() - t0) / 60, tc.command())
    print(f"wrote {out}\nreproduce: {tc.command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
