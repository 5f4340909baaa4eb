"""Benchmark: our UNet step vs the diffusers UNet on the same weights and inputs, in one process.

    python -m bench.benchmarks.speed                      # tiny and v1-5 at 32x32 latents
    python -m bench.benchmarks.speed --latent 64 --configs v1-5

Runs alternate (ours, diffusers, ours, ...) after warmup so drift hits both sides alike; prints the
median and p90 per call and the ratio ours / diffusers (target <= 1.05).
"""

from __future__ import annotations

import argparse
import gc

import torch

from bench import reference
from bench.cost import percentiles, time_alternating
from stable_diffusion.config import SDConfig, get_config
from stable_diffusion.model import COMPONENT_PREFIXES
from stable_diffusion.unet import UNetModel


def random_unet(config: str, latent: int, batch: int) -> tuple[SDConfig, UNetModel, tuple[torch.Tensor, ...]]:
    """A preset's UNet with seeded default-init weights, and one call's inputs (x, t = 500, context)."""
    cfg = get_config(config)
    torch.manual_seed(0)
    unet = UNetModel(cfg.unet).eval().requires_grad_(False)
    x = torch.randn(batch, cfg.unet.in_channels, latent, latent)
    ctx = torch.randn(batch, cfg.clip.max_length, cfg.unet.context_dim)
    return cfg, unet, (x, torch.tensor(500), ctx)


@torch.inference_mode()
def bench_unet(config: str, latent: int, batch: int, warmup: int, repeats: int) -> float:
    cfg, ours, (x, t, ctx) = random_unet(config, latent, batch)
    theirs = reference.diffusers_unet(cfg, {COMPONENT_PREFIXES["unet"] + k: v for k, v in ours.state_dict().items()})
    times = time_alternating(
        {"ours": lambda: ours(x, t, ctx), "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx)},
        warmup,
        repeats,
    )
    (ours_p50, ours_p90), (ref_p50, ref_p90) = percentiles(times["ours"]), percentiles(times["diffusers"])
    ratio = ours_p50 / ref_p50
    print(
        f"{config:5s} latent {latent}x{latent} batch {batch}: "
        f"ours {ours_p50 * 1e3:9.1f} ms (p90 {ours_p90 * 1e3:9.1f}) | "
        f"diffusers {ref_p50 * 1e3:9.1f} ms (p90 {ref_p90 * 1e3:9.1f}) | "
        f"ratio ours/diffusers {ratio:.3f}",
        flush=True,
    )
    return ratio


def benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every UNet-step benchmark shares (presets, latent size, batch, warmup, repeats)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,v1-5")
    p.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px for v1-5)")
    p.add_argument("--batch", type=int, default=2, help="2 = one prompt with classifier-free guidance")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    return p


def main(argv: list[str] | None = None) -> None:
    args = benchmark_parser(__doc__).parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    for config in args.configs.split(","):
        bench_unet(config, args.latent, args.batch, args.warmup, args.repeats)
        gc.collect()  # free one preset's two UNets before building the next


if __name__ == "__main__":
    main()
