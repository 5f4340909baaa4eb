"""Benchmark: fewer UNet calls -- feature caching speed, and the distilled student's quality (issue 15).

    python -m bench.benchmarks.steps_speed                 # both parts
    python -m bench.benchmarks.steps_speed --skip-v15      # embedded model only (--skip-embedded: v1-5 only)

1. Feature caching (`cache`, interval 3, depth 1) vs the plain sampler, image latency:
   - v1-5 architecture, random (default-init) weights, 32x32 latents, batch 2 (guidance), `--v15-steps` DDIM
     steps: the denoising loop (UNet + sampler) timed per image, and with one VAE decode added;
   - the embedded tiny-shapes model, whole images through the pipeline (text encoder, steps, VAE).
   Plain and cached images alternate, so load changes hit both; medians over `--repeats`.
2. Embedded model, the sweep's default prompts (shapes-val), vs the FP32 `--ref-steps` DDIM images (guidance
   7.5, the sweep's reference): plain 4-step DDIM vs the 4-step distilled student (and every other shipped
   student), and the cache rows: PSNR (mean over images, with a 95 % paired-bootstrap interval of the
   difference) and prompt accuracy with 95 % Wilson intervals and a paired sign-flip p vs plain 4-step.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from bench.data import load_prompts
from bench.feature_cache import CachedUNet
from bench.metrics.base import PER_IMAGE
from bench.metrics.fidelity import Fidelity
from bench.metrics.shapes import HEADS, PromptAccuracy
from bench.stats import bootstrap_ci, paired_permutation_p, wilson_interval
from bench.techniques.distilled import Distilled, student_file
from stable_diffusion.config import V1_5
from stable_diffusion.defaults import embedded_checkpoint
from stable_diffusion.pipeline import StableDiffusion
from stable_diffusion.samplers import make_sampler
from stable_diffusion.unet import UNetModel
from stable_diffusion.vae import AutoencoderKL


def wilson(k: int, n: int) -> tuple[float, float]:
    """95 % Wilson interval of k/n (NaN for n = 0)."""
    return wilson_interval(k, n) if n else (math.nan, math.nan)


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each fn, called in turn `repeats` times after one warmup round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def v15_cache_speed(steps: int, repeats: int) -> None:
    unet = UNetModel(V1_5.unet).eval()
    cached = CachedUNet(unet, interval=3, depth=1)
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 77, V1_5.unet.context_dim, generator=gen)
    x0 = torch.randn(1, 4, 32, 32, generator=gen)

    def loop(module: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            getattr(module, "reset_sampling_state", lambda: None)()
            sched, x = make_sampler("ddim", V1_5), x0.clone()
            sched.set_timesteps(steps)
            for t in sched.timesteps:
                uncond, cond = module(torch.cat([x, x]), t, ctx).chunk(2)
                x = sched.step(uncond + 7.5 * (cond - uncond), t, x)
            return x

        return run

    med = alternate({"plain": loop(unet), "cache": loop(cached)}, repeats)
    vae = AutoencoderKL(V1_5.vae).eval()
    decode = alternate({"vae": lambda: vae.decode(x0)}, max(1, repeats // 2))["vae"]
    loop_ratio = med["cache"] / med["plain"]
    img_ratio = (med["cache"] + decode) / (med["plain"] + decode)
    print(f"v1-5 random weights, 32x32 latents, {steps} DDIM steps, batch 2, {torch.get_num_threads()} threads:")
    print(f"  denoising loop per image: plain {med['plain']:.2f} s, cache[interval=3,depth=1] {med['cache']:.2f} s"
          f" -> ratio {loop_ratio:.3f}")  # fmt: skip
    print(f"  + VAE decode ({decode:.2f} s): ratio {img_ratio:.3f}")


def generate(sd: StableDiffusion, prompts: list[str], **kw: object) -> tuple[torch.Tensor, list[float]]:
    """Images [N, 3, H, W] in [0, 1] (seed i for prompt i, quantised to 8 bit as saved) and seconds per image."""
    out, secs = [], []
    for i, p in enumerate(tqdm(prompts, desc=str(kw), leave=False)):
        reset = getattr(sd.model.unet, "reset_sampling_state", None)
        if reset:
            reset()
        t0 = time.perf_counter()
        out.append(sd(p, seed=i, progress=False, **kw).pixels)
        secs.append(time.perf_counter() - t0)
    return (torch.cat(out) * 255).round() / 255, secs


def embedded(n: int, ref_steps: int, repeats: int) -> None:
    sd = StableDiffusion.from_checkpoint(embedded_checkpoint())
    base = sd.model.unet
    prompts = load_prompts("shapes").prompts[:n]  # the sweep's default set (shapes-val), same seeds
    fid, acc = Fidelity(), PromptAccuracy()
    ddim = {"sampler": "ddim"}
    ref, _ = generate(sd, prompts, steps=ref_steps, guidance=7.5, **ddim)
    psnr_ref, right_ref = None, None

    def report(name: str, images: torch.Tensor, secs: list[float]) -> None:
        nonlocal psnr_ref, right_ref
        x, y = images.float(), ref.float()
        scores = fid.compute(x, prompts, y)
        per = scores[PER_IMAGE]["psnr"].float()
        idx, hits = acc.per_image(images, prompts)
        right = [float(all(hits[h][j] for h in HEADS)) for j in range(len(idx))]
        k = int(sum(right))
        lo, hi = wilson(k, len(idx))
        ssim = scores["ssim"]
        line = f"  {name:34s} PSNR {per.mean():6.2f} dB  SSIM {ssim:.3f}  prompt acc {k}/{len(idx)} = "
        line += f"{k / len(idx):.2f} [{lo:.2f}, {hi:.2f}]  image {statistics.median(secs):.3f} s"
        if psnr_ref is None:
            psnr_ref, right_ref = per, right
        else:  # paired over the same prompts and seeds: bootstrap interval of the mean difference, sign-flip p
            d = (per - psnr_ref).numpy()
            lo_d, hi_d = bootstrap_ci(d) or (math.nan, math.nan)
            line += f"  dPSNR vs plain 4-step {d.mean():+.2f} dB [{lo_d:+.2f}, {hi_d:+.2f}]"
            line += f", accuracy p {paired_permutation_p(right, right_ref):.3f}"
        print(line, flush=True)

    print(f"embedded tiny-shapes, {n} shapes-val prompts, vs FP32 {ref_steps}-step DDIM at guidance 7.5:")
    report("reference itself", ref, [0.0])
    psnr_ref = right_ref = None
    report("plain DDIM 4 steps, guidance 7.5", *generate(sd, prompts, steps=4, guidance=7.5, **ddim))
    default = next(a for a in Distilled.axes if a.name == "steps").default
    for steps in sorted({*default, 16, 8, 2, 1}, reverse=True):  # the axis default, and any other shipped round
        path = student_file(steps)
        if not path.is_file():
            if steps in default:
                print(f"  distilled[steps={steps}]: no {path.name}, skipped")
            continue
        setting = next(s for s in Distilled().settings({"steps": [steps]}))
        student = Distilled().apply(copy.deepcopy(base), setting)
        sd.model.swap_unet(student.module)
        report(f"distilled[steps={steps}] (guidance 1)", *generate(sd, prompts, **student.sampling))
        sd.model.swap_unet(base)
    sd.model.swap_unet(CachedUNet(base, interval=3, depth=1))
    report(f"cache[interval=3] {ref_steps} steps", *generate(sd, prompts, steps=ref_steps, guidance=7.5, **ddim))
    sd.model.swap_unet(base)

    cached = CachedUNet(base, interval=3, depth=1)
    prompt = prompts[0]

    def image(module: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            getattr(module, "reset_sampling_state", lambda: None)()
            sd.model.swap_unet(module)
            try:
                return sd(prompt, steps=ref_steps, guidance=7.5, progress=False, **ddim)
            finally:
                sd.model.swap_unet(base)

        return run

    med = alternate({"plain": image(base), "cache": image(cached)}, repeats)
    print(f"  image latency ({ref_steps} steps, whole pipeline): plain {med['plain']:.3f} s, cache[interval=3] "
          f"{med['cache']:.3f} s -> ratio {med['cache'] / med['plain']:.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--ref-steps", type=int, default=20, help="the sweep's reference --steps")
    p.add_argument("--v15-steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--skip-v15", action="store_true")
    p.add_argument("--skip-embedded", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    if not a.skip_embedded:
        embedded(a.num_images, a.ref_steps, a.repeats)
    if not a.skip_v15:
        v15_cache_speed(a.v15_steps, a.repeats)


if __name__ == "__main__":
    main()
