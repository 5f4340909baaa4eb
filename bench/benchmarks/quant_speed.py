"""Benchmark: one UNet step in FP32 vs each quantization mode that runs real integer kernels, in one process.

    python -m bench.benchmarks.quant_speed                        # tiny and v1-5 at 32x32 latents, batch 2
    python -m bench.benchmarks.quant_speed --act-dtypes bf16,fp32 # also the weight-only kernels' fp32-activation path

Random-init UNets (speed does not depend on the weights). The quantized variants share every tensor they
do not replace with the FP32 model, so v1-5 needs ~3.4 GB plus the int8/int4 copies of its Linear weights.
Runs alternate (fp32, mode 1, mode 2, ...) after warmup so drift hits all alike; prints median and p90
per call and the ratio mode / FP32. The static W8A8 modes are simulated (fake quantization in fp32): they
are listed, never timed as a speed claim.
"""

from __future__ import annotations

import copy
import gc
import time

import torch
from torch import nn

from bench.benchmarks.speed import benchmark_parser
from bench.cost import percentiles, time_alternating
from bench.techniques.base import Setting
from bench.techniques.quant import STATIC_MODES, Quantization
from stable_diffusion.config import get_config
from stable_diffusion.unet import UNetModel

REAL_KERNEL_MODES = ["dynamic-int8", "weight-int8", "weight-int4"]


def sharing_copy(module: nn.Module) -> nn.Module:
    """A structural copy whose parameters and buffers are the original's (quantizing it replaces modules only)."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def variants(act_dtypes: list[str]) -> list[Setting]:
    out = [Setting("quant", {"mode": "dynamic-int8"})]
    for mode in ("weight-int8", "weight-int4"):
        out += [Setting("quant", {"mode": mode, "act_dtype": a}) for a in act_dtypes]
    return out


def bench_config(config: str, latent: int, batch: int, warmup: int, repeats: int, act_dtypes: list[str]) -> None:
    cfg = get_config(config)
    torch.manual_seed(0)
    fp32 = UNetModel(cfg.unet).eval().requires_grad_(False)
    x = torch.randn(batch, cfg.unet.in_channels, latent, latent)
    ctx = torch.randn(batch, cfg.clip.max_length, cfg.unet.context_dim)
    t = torch.tensor(500)
    fns, labels = {"fp32": lambda: fp32(x, t, ctx)}, {"fp32": "dense fp32"}
    quant = Quantization()
    for setting in variants(act_dtypes):
        start = time.perf_counter()
        out = quant.apply(sharing_copy(fp32), setting, None)
        act = setting.params.get("act_dtype")
        name = setting.params["mode"] + (f" ({act} act)" if act else "")
        f = out.fields
        labels[name] = (
            f"{f['kernels']}, {f['quantized_layers']} layers, {f['size_bytes'] / 1e6:.1f} MB, "
            f"w err {f['weight_error_max_rel']:.3g}, built in {time.perf_counter() - start:.1f} s"
        )
        fns[name] = lambda m=out.module: m(x, t, ctx)
    with torch.inference_mode():
        times = time_alternating(fns, warmup, repeats)
    base = percentiles(times["fp32"])[0]
    print(f"{config} latent {latent}x{latent} batch {batch} (median / p90 per UNet call, {repeats} alternating runs):")
    for name, ts in times.items():
        med, p90 = percentiles(ts)
        ratio = "" if name == "fp32" else f"  ratio/fp32 {med / base:.3f}"
        print(f"  {name:24s} {med * 1e3:9.1f} ms (p90 {p90 * 1e3:9.1f}){ratio:20s} [{labels[name]}]", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--act-dtypes", default="bf16", help="weight-only kernel activation dtypes: bf16, fp32 (slow)")
    args = p.parse_args(argv)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu}")
    for config in args.configs.split(","):
        bench_config(config, args.latent, args.batch, args.warmup, args.repeats, args.act_dtypes.split(","))
        gc.collect()
    print(f"simulated, not timed as a speed claim: {', '.join(STATIC_MODES)} (fake quantization in fp32)")


if __name__ == "__main__":
    main()
