"""Benchmark: structured compression -- real speedups, KD recovery, BK-SDM block removal on v1-5.

    python -m bench.benchmarks.structured_speed                      # everything below
    python -m bench.benchmarks.structured_speed --parts embedded      # only the embedded trained model
    python -m bench.benchmarks.structured_speed --parts v1-5 --latents 32

Embedded trained model: 50 % channel pruning (conv+heads+ffn, Taylor) -> GFLOPs and UNet step latency
ratio vs dense (targets <= 0.5x, <= 0.65x; calls alternate dense / pruned after warmup; `--compile` adds both
under torch.compile and quotes every row against the fastest dense one), then KD recovery
(step budget, 15 min wall cap; CPU minutes are process CPU time), and PSNR vs the FP32 images and the
per-attribute prompt accuracies of dense / pruned / recovered on the same prompts and seeds, with the share
of the gap recovered ((recovered - pruned) / (fp32 - pruned); target >= 80 %).
v1-5 (random weights, sizes are what matter): parameter count of each BK-SDM preset (BK-SDM reports
0.58 / 0.49 / 0.33 B) and step latency at each latent size, dense and preset, alternating.
"""

from __future__ import annotations

import copy
import os
import time

import torch

from bench.accel.compile import compile_unet
from bench.benchmarks.shapes_eval import generate
from bench.benchmarks.speed import benchmark_parser
from bench.cost import flops_per_call, percentiles, time_alternating
from bench.metrics.fidelity import Fidelity
from bench.metrics.shapes import PromptAccuracy
from bench.recovery import DenoisingData, RecoveryConfig, recover
from bench.structured import blocks
from bench.structured.channels import prune_channels
from stable_diffusion.config import V1_5
from stable_diffusion.defaults import embedded_checkpoint
from stable_diffusion.pipeline import StableDiffusion
from stable_diffusion.shapes import captions
from stable_diffusion.unet import UNetModel


def step_latency(unets: dict[str, torch.nn.Module], latent: int, batch: int, warmup: int, repeats: int) -> dict:
    cfg = next(iter(unets.values())).cfg
    x = torch.randn(batch, cfg.in_channels, latent, latent)
    ctx = torch.randn(batch, 77, cfg.context_dim)
    t = torch.tensor(500)
    with torch.inference_mode():
        times = time_alternating({k: (lambda u=u: u(x, t, ctx)) for k, u in unets.items()}, warmup, repeats)
    return {k: percentiles(v) for k, v in times.items()}


def quality(sd: StableDiffusion, unet: torch.nn.Module, prompts: list[str], ref: torch.Tensor | None, steps: int):
    old = sd.model.swap_unet(unet)
    try:
        images = generate(sd, prompts, steps=steps, guidance=7.5, sampler="ddim", seed=0).float().cpu()
    finally:
        sd.model.swap_unet(old)
    out = PromptAccuracy().compute(images, prompts, None)
    if ref is not None:
        out["psnr"] = Fidelity().compute(images, prompts, ref)["psnr"]
    return images, out


def embedded(args) -> None:
    sd = StableDiffusion.from_checkpoint(embedded_checkpoint())
    dense = sd.model.unet
    data = DenoisingData(sd.model)
    t0 = time.perf_counter()

    def taylor():
        for i in range(4):
            xt, t, ctx, noise = data.batch(10_000 + i, 16)
            yield torch.nn.functional.mse_loss(pruned(xt, t, ctx), noise)

    pruned = copy.deepcopy(dense)
    prune_channels(pruned, args.ratio, importance="taylor", loss_batches=taylor)
    print(f"pruned {args.ratio:.0%} (conv+heads+ffn, taylor) in {time.perf_counter() - t0:.1f} s", flush=True)
    latent = sd.cfg.resolution // sd.cfg.vae.downsample
    x, ctx = torch.randn(args.batch, 4, latent, latent), torch.randn(args.batch, 77, sd.cfg.unet.context_dim)
    flops = {
        k: flops_per_call(lambda u=u: u(x, torch.tensor(500), ctx)) for k, u in (("dense", dense), ("pruned", pruned))
    }
    params = {k: sum(p.numel() for p in u.parameters()) for k, u in (("dense", dense), ("pruned", pruned))}
    unets = {"dense": dense, "pruned": pruned}
    if args.compile:  # inductor removes the eager dispatch overhead that hides the FLOPs cut on a tiny UNet
        for name in ("dense", "pruned"):
            unets[f"{name} compiled"], secs = compile_unet(unets[name], (x, torch.tensor(500), ctx))
            print(f"compiled {name} in {secs:.0f} s", flush=True)
    lat = step_latency(unets, latent, args.batch, args.warmup, args.repeats)
    if args.compile:
        best = min(("dense", "dense compiled"), key=lambda k: lat[k][0])
        print(
            "step p50 "
            + ", ".join(f"{k} {v[0] * 1e3:.1f} ms ({v[0] / lat[best][0]:.3f}x)" for k, v in lat.items())
            + f" -- ratios vs the best dense ({best})",
            flush=True,
        )
    print(
        f"embedded {latent}x{latent} batch {args.batch}: params {params['dense']:,} -> {params['pruned']:,} "
        f"({params['pruned'] / params['dense']:.3f}x); "
        f"GFLOPs {flops['dense'] / 1e9:.3f} -> {flops['pruned'] / 1e9:.3f} "
        f"({flops['pruned'] / flops['dense']:.3f}x, target <= 0.5x); step p50 {lat['dense'][0] * 1e3:.1f} -> "
        f"{lat['pruned'][0] * 1e3:.1f} ms ({lat['pruned'][0] / lat['dense'][0]:.3f}x, target <= 0.65x)",
        flush=True,
    )
    if not args.images:  # latency only
        return
    prompts = captions("heldout", args.images)
    ref, q_fp = quality(sd, dense, prompts, None, args.steps)
    _, q_pr = quality(sd, pruned, prompts, ref, args.steps)
    rc = RecoveryConfig(kind="kd", steps=args.recovery_steps, minutes=15.0, data=data)
    recovered, stats = recover(copy.deepcopy(pruned), dense, rc)
    print(
        f"kd recovery: {stats['recovery_steps']} steps, {stats['recovery_wall_min']:.1f} wall min, "
        f"{stats['recovery_cpu_min']:.1f} CPU min (target <= 15); "
        f"teacher MSE {stats['teacher_mse_before_recovery']:.4f}"
        f" -> {stats['teacher_mse_after_recovery']:.4f}",
        flush=True,
    )
    _, q_rec = quality(sd, recovered, prompts, ref, args.steps)
    q_fp["psnr"] = float("inf")
    print(f"quality on {len(prompts)} held-out shapes prompts, {args.steps} DDIM steps (fp32 / pruned / recovered):")
    heads = sorted(k for k in q_fp if k.startswith("prompt_acc_") and k != "prompt_acc_n")
    for key in ["psnr", "prompt_accuracy", *heads]:
        fp, pr, rec = q_fp[key], q_pr[key], q_rec[key]
        if key == "psnr":
            print(f"  psnr: pruned {pr:.2f} dB -> recovered {rec:.2f} dB (fp32 = inf: no gap share)")
            continue
        gap = (rec - pr) / (fp - pr) if fp != pr else float("nan")
        print(f"  {key:26s} {fp:.3f} / {pr:.3f} / {rec:.3f}   gap recovered {gap:.0%}")


def v15(args) -> None:
    torch.manual_seed(0)
    dense = UNetModel(V1_5.unet).eval().requires_grad_(False)
    unets = {"dense": dense}
    for preset in blocks.PRESETS:
        unets[preset] = blocks.remove_blocks(copy.deepcopy(dense), preset)
    for name, u in unets.items():
        print(f"v1-5 {name:8s} {sum(p.numel() for p in u.parameters()) / 1e9:.3f} B params", flush=True)
    for latent in args.latents:
        lat = step_latency(unets, latent, args.batch, args.warmup, args.repeats)
        for name, (p50, q90) in lat.items():
            print(
                f"v1-5 {latent}x{latent} batch {args.batch} {name:8s} step p50 {p50 * 1e3:8.1f} ms "
                f"(p90 {q90 * 1e3:8.1f}) {p50 / lat['dense'][0]:.3f}x dense",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__)
    p.set_defaults(repeats=5, warmup=1)
    p.add_argument("--parts", default="embedded,v1-5")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--recovery-steps", type=int, default=300)
    p.add_argument("--images", type=int, default=32, help="held-out shapes prompts for quality (0: latency only)")
    p.add_argument("--steps", type=int, default=20, help="DDIM sampling steps for quality")
    p.add_argument("--compile", action="store_true", help="also time dense and pruned under torch.compile")
    p.add_argument("--latents", type=lambda s: [int(v) for v in s.split(",")], default=[32, 64])
    args = p.parse_args(argv)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared)",
        flush=True,
    )
    if "embedded" in args.parts:
        embedded(args)
    if "v1-5" in args.parts:
        v15(args)


if __name__ == "__main__":
    main()
