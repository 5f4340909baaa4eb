"""Recovery training of a compressed UNet: knowledge distillation (BK-SDM recipe) or LoRA, resumable.

`kd`: every student weight is trained on  out_w * MSE(student eps, teacher eps)
                                        + feat_w * sum over resolution levels of relMSE(student, teacher features)
                                        + task_w * MSE(student eps, true noise)   (the denoising loss).
relMSE(s, t) = MSE(s, t) / mean(t^2): each level's feature MSE relative to the teacher feature's mean square.
Feature magnitudes differ from level to level and from the noise's (unit variance, so the output terms are
already relative); unnormalised, the feature term was ~50x the output term on the embedded model and drowned
it. Relative, every level weighs alike and a student that output zeros scores 1 per level.
Features are the outputs of the last output block of each resolution level and of the middle block, where
both nets have them; a student feature with fewer channels (channel pruning) passes a learned 1x1 conv
(a FitNets hint adapter, dropped after training) to the teacher's width.
`lora`: the same loss, but only low-rank adapters (peft) on the attention projections and ResBlock convs
train; they are merged into the weights afterwards, so timing sees plain layers.

Data: the built-in shapes dataset (latents through the model's own VAE, captions through its text encoder,
10 % empty captions as in training) or a user image folder with COCO-style captions.json. Each step's batch
comes from a generator seeded by (seed, step), so a resumed run trains exactly as an uninterrupted one; the
state (student, optimizer, step, losses) is written atomically every `save_every` steps.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from stable_diffusion.errors import InputError
from stable_diffusion.model import LatentDiffusion
from stable_diffusion.samplers import alphas_cumprod
from stable_diffusion.tokenizer import CLIPTokenizer
from stable_diffusion.train import Pool, noised

from .techniques.prune import block_levels

log = logging.getLogger(__name__)

KINDS = ["none", "kd", "lora"]
LORA_TARGETS = r".*\.(to_q|to_k|to_v|to_out\.0|in_layers\.2|out_layers\.3)$"
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # xt, t, context, noise


class DenoisingData:
    """Latents (posterior mean/std) and text contexts of a fixed image pool, encoded once by `model`."""

    def __init__(self, model: LatentDiffusion, source: str = "shapes", n: int = 1024, seed: int = 0) -> None:
        cfg = self.cfg = model.cfg
        self.alphas = alphas_cumprod(cfg)
        self.seed = seed
        tokenizer = CLIPTokenizer(max_length=cfg.clip.max_length)
        if source == "shapes":
            pool = Pool(cfg, n, seed, tokenizer)
            pixels, ids = pool.images, pool.ids
        else:
            pixels, ids = _folder(Path(source), cfg.resolution, tokenizer, n)
        dev = next(model.parameters()).device
        means, stds, ctx = [], [], []
        with torch.no_grad():
            for s in tqdm(range(0, len(pixels), 64), desc="encoding recovery data", leave=False):
                m, sd = model.vae.encode((pixels[s : s + 64].float() / 127.5 - 1.0).to(dev))
                means.append(m.float().cpu())
                stds.append(sd.float().cpu())
                ctx.append(model.text_encoder(ids[s : s + 64].to(dev)).float().cpu())
            self.empty = model.text_encoder(tokenizer([""]).to(dev)).float().cpu()
        self.mean, self.std, self.context = torch.cat(means), torch.cat(stds), torch.cat(ctx)

    def __len__(self) -> int:
        return len(self.mean)

    def batch(self, step: int, size: int, cond_drop: float = 0.1) -> Batch:
        """The batch of training step `step` (deterministic in (seed, step))."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(len(self), (size,), generator=gen)
        x0 = self.cfg.scale_factor * (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=gen))
        ctx = self.context[idx].clone()
        ctx[torch.rand(size, generator=gen) < cond_drop] = self.empty[0]
        xt, t, noise = noised(self.alphas, x0, gen, self.cfg.num_train_timesteps)
        return xt, t, ctx, noise


def _folder(folder: Path, size: int, tokenizer: CLIPTokenizer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, size, size] images and caption token ids of a folder with COCO-style captions.json."""
    from .data import load_reference

    if not folder.is_dir():
        raise InputError(f"recovery data {folder} is neither 'shapes' nor a folder of images with captions.json")
    ref = load_reference(folder)
    if not ref.images:
        raise InputError(f"recovery data folder {folder} holds no captioned images")
    images = ref.load(n)
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size))) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), tokenizer(
        [c[0] for c in ref.captions[: len(images)]]
    )


@dataclass
class RecoveryConfig:
    kind: str = "kd"
    steps: int = 300
    minutes: float = 15.0  # wall-clock budget; training stops at whichever comes first
    batch: int = 8  # tuned on the embedded model (50 % channels, ~14 CPU min): batch 8 at 3e-3 beat
    lr: float = 3e-3  # 16 at 1.5e-3, 8 at 1.5e-3 / 5e-3 and 4 at 3e-3 in prompt accuracy and PSNR
    lora_rank: int = 8
    out_weight: float = 1.0
    feat_weight: float = 1.0
    task_weight: float = 1.0
    save_every: int = 50
    eval_batches: int = 4  # held-out batches (of `batch`) for the teacher-MSE before/after
    work_dir: Path | None = None  # resumable state lives here (None: not resumable)
    data: DenoisingData | None = field(default=None, repr=False)


class FeatureTaps:
    """Forward hooks keeping the output of the middle block and of the last output block of each level."""

    def __init__(self, unet: nn.Module) -> None:
        self.features: dict[str, torch.Tensor] = {}
        _, up = block_levels(unet.cfg)
        last = {lvl: i for i, lvl in enumerate(up)}  # level -> index of its last output block
        points = {f"up{lvl}": unet.output_blocks[i] for lvl, i in last.items()}
        if len(unet.middle_block):
            points["mid"] = unet.middle_block
        self.handles = [m.register_forward_hook(self._keep(name)) for name, m in points.items()]

    def _keep(self, name: str):
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            self.features[name] = out

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def make_adapters(student: nn.Module, teacher: nn.Module, batch: Batch) -> nn.ModuleDict:
    """1x1 convs from student to teacher feature widths, where they differ (identity-like init)."""
    s_taps, t_taps = FeatureTaps(student), FeatureTaps(teacher)
    xt, t, ctx, _ = batch
    with torch.no_grad():
        student(xt, t, ctx)
        teacher(xt, t, ctx)
    adapters = nn.ModuleDict()
    for name, fs in s_taps.features.items():
        ft = t_taps.features.get(name)
        if ft is not None and fs.shape[1] != ft.shape[1]:
            conv = nn.Conv2d(fs.shape[1], ft.shape[1], 1, bias=False)
            a, b = (f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in (fs, ft))
            with torch.no_grad():  # least-squares start: the best linear map on this batch
                conv.weight.copy_(torch.linalg.lstsq(a, b).solution.T[:, :, None, None])
            adapters[name] = conv
    s_taps.remove()
    t_taps.remove()
    return adapters


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """MSE(student, teacher) / mean(teacher^2): scale-free, 0 when equal, 1 for an all-zero student."""
    return F.mse_loss(student, teacher) / (teacher.detach().pow(2).mean() + eps)


def kd_loss(
    student: nn.Module, teacher: nn.Module, batch: Batch, adapters: nn.ModuleDict, cfg: RecoveryConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """BK-SDM loss on one batch: output KD + feature KD (relative MSE per level) + denoising; returns it and
    its parts."""
    xt, t, ctx, noise = batch
    s_taps, t_taps = FeatureTaps(student), FeatureTaps(teacher)
    try:
        with torch.no_grad():
            eps_t = teacher(xt, t, ctx)
        eps_s = student(xt, t, ctx)
        feats = []
        for name, fs in s_taps.features.items():
            ft = t_taps.features.get(name)
            if ft is not None and fs.shape[2:] == ft.shape[2:]:
                feats.append(relative_mse(adapters[name](fs) if name in adapters else fs, ft))
    finally:
        s_taps.remove()
        t_taps.remove()
    out = F.mse_loss(eps_s, eps_t)
    feat = torch.stack(feats).sum() if feats else eps_s.new_zeros(())
    task = F.mse_loss(eps_s, noise)
    loss = cfg.out_weight * out + cfg.feat_weight * feat + cfg.task_weight * task
    return loss, {"out": float(out.detach()), "feat": float(feat.detach()), "task": float(task.detach())}


def add_lora(unet: nn.Module, rank: int) -> nn.Module:
    """peft LoRA adapters on the attention projections and ResBlock 3x3 convs; base weights frozen.

    Targets are exact module names of plain Linear/Conv2d layers (a separable conv is a Sequential).
    """
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    plain = (n for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d))
    targets = [n for n in plain if re.fullmatch(LORA_TARGETS, n)]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=True)
    return inject_adapter_in_model(config, unet)


def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (what gets timed and saved)."""
    from peft.tuners.lora import LoraLayer

    for name, m in list(unet.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, m.get_base_layer())
    return unet


@torch.no_grad()
def teacher_mse(student: nn.Module, teacher: nn.Module, data: DenoisingData, n: int, size: int) -> float:
    """Mean output MSE to the teacher on held-out batches (steps -1..-n, never trained on)."""
    total = 0.0
    for i in range(n):
        xt, t, ctx, _ = data.batch(-1 - i, size, cond_drop=0.0)
        total += float(F.mse_loss(student(xt, t, ctx), teacher(xt, t, ctx)))
    return total / n


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash leaves the previous state


def recover(unet: nn.Module, teacher: nn.Module, cfg: RecoveryConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Train `unet` towards `teacher` (kd or lora); returns the (merged) student and row statistics."""
    if cfg.kind not in ("kd", "lora"):
        raise InputError(f"unknown recovery {cfg.kind!r}; choose from: {', '.join(KINDS)}")
    if cfg.data is None:
        raise ValueError("recover() needs cfg.data (a DenoisingData)")
    data = cfg.data
    teacher = teacher.eval().requires_grad_(False)
    before = teacher_mse(unet, teacher, data, cfg.eval_batches, cfg.batch)
    adapters = make_adapters(unet, teacher, data.batch(0, 4))
    if cfg.kind == "lora":
        unet = add_lora(unet, cfg.lora_rank)
    else:
        unet.requires_grad_(True)
    trainable = [p for p in unet.parameters() if p.requires_grad] + list(adapters.parameters())
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    holder = nn.ModuleDict({"student": unet, "adapters": adapters})
    step, spent_wall, spent_cpu, history = 0, 0.0, 0.0, []
    state_path = cfg.work_dir / "state.pt" if cfg.work_dir else None
    if state_path and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        holder.load_state_dict(state["holder"])
        opt.load_state_dict(state["opt"])
        step, spent_wall, spent_cpu, history = state["step"], state["wall"], state["cpu"], state["history"]
        log.info("recovery resumed from %s at step %d", state_path, step)

    def save() -> None:
        if state_path:
            state = {"holder": holder.state_dict(), "opt": opt.state_dict(), "step": step}
            _save_state(state_path, {**state, "wall": spent_wall, "cpu": spent_cpu, "history": history})

    unet.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"recovery ({cfg.kind})", leave=False)
    while step < cfg.steps and spent_wall < cfg.minutes * 60:
        w0, c0 = time.perf_counter(), time.process_time()
        for g in opt.param_groups:  # warmup then cosine decay over the step budget
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        loss, parts = kd_loss(unet, teacher, data.batch(step, cfg.batch), adapters, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        spent_wall += time.perf_counter() - w0
        spent_cpu += time.process_time() - c0
        history.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.4f}", **{k: f"{v:.4f}" for k, v in parts.items()})
        if step % cfg.save_every == 0:
            save()
    bar.close()
    save()
    unet.eval().requires_grad_(False)
    if cfg.kind == "lora":
        unet = merge_lora(unet)
    stats = {
        "recovery_steps": step,
        "recovery_wall_min": spent_wall / 60,
        "recovery_cpu_min": spent_cpu / 60,
        "recovery_loss_first": history[0] if history else None,
        "recovery_loss_last": float(np.mean(history[-10:])) if history else None,
        "teacher_mse_before_recovery": before,
        "teacher_mse_after_recovery": teacher_mse(unet, teacher, data, cfg.eval_batches, cfg.batch),
    }
    return unet, stats


def before_recovery_fields(rows: list[dict[str, str]], setting_id: str) -> dict[str, str]:
    """Quality of the un-recovered row `setting_id` (if the run has it) as `<metric>_before_recovery`."""
    row = next((r for r in rows if r["setting_id"] == setting_id), None)
    if row is None:
        return {}
    keys = ["psnr", "ssim", "lpips", "prompt_accuracy", "shapes_fid"] + [
        k for k in row if k.startswith("prompt_acc_") and k != "prompt_acc_n"
    ]
    return {f"{k}_before_recovery": row[k] for k in keys if row.get(k) not in (None, "")}
