"""Benchmark: every PyTorch speed rung vs fp32 eager and vs the best dense rung, plus ONNX Runtime static INT8.

    python -m bench.benchmarks.speedups                    # v1-5 random weights, batch 2, 32x32 latents
    python -m bench.benchmarks.speedups --configs tiny --skip-quality   # seconds: a smoke run

Rungs: bf16 eager, fp16 eager, PT2E X86 static int8 (conv+linear) compiled, ONNX Runtime static INT8
QDQ of the same UNet, fp32 compiled, bf16 compiled, torchao int8-dynamic (Linear) compiled. Each rung is
timed in alternation with fp32 eager (warmup first) and freed before the next, so v1-5 fits in memory;
"vs best dense" divides by the fastest dense rung's ratio. Static int8 on both backends is calibrated on
the same random calls with timesteps spread over the schedule (speed does not depend on the ranges).
Compile and quantization times and the PT2E quantization peak RSS are printed.

Quality (unless --skip-quality): on the embedded trained model, PSNR of bf16 and of PT2E static int8
(calibrated on real calibration-prompt trajectories) vs the fp32 images, same prompts and seeds.
"""

from __future__ import annotations

import copy
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.accel.compile import CompiledUNet
from bench.accel.precision import cast_unet
from bench.accel.pt2e import quantize_pt2e_x86
from bench.accel.torchao_modes import quantize_linears
from bench.benchmarks.onnx_speed import calib_calls
from bench.benchmarks.quant_speed import sharing_copy
from bench.benchmarks.speed import benchmark_parser, random_unet
from bench.calibration import Calibration
from bench.cost import PeakRSS, percentiles, time_alternating
from bench.techniques.base import Setting
from bench.techniques.onnx.backend import OrtUNet, quantize
from bench.techniques.onnx.export import export_unet

DENSE = ("fp32 compiled", "bf16 eager", "bf16 compiled", "fp16 eager")


def build_rungs(fp32: nn.Module, calls, tmp: Path) -> dict[str, Callable[[], nn.Module]]:
    """name -> builder of that rung's module (built only when timed, then freed)."""

    def pt2e() -> nn.Module:
        with PeakRSS() as mem:
            module = quantize_pt2e_x86(copy.deepcopy(fp32), calls)
        print(f"    PT2E export+calibrate+convert peak RSS {mem.peak / 2**30:.2f} GB", flush=True)
        return CompiledUNet(module)

    def ort_int8() -> nn.Module:
        exported = export_unet(fp32, cache_dir=tmp, external_data=True)
        return OrtUNet(quantize(exported.path, "static-int8", Path(tempfile.mkdtemp(dir=tmp)), calls))

    def torchao_int8() -> nn.Module:
        module = sharing_copy(fp32)  # shares the convs with fp32; Linear weights become int8 subclasses
        quantize_linears(module, "int8-dynamic")
        return CompiledUNet(module)

    # cheapest and most telling first: the output is printed as each rung finishes
    return {
        "bf16 eager": lambda: cast_unet(copy.deepcopy(fp32), "bf16"),
        "fp16 eager": lambda: cast_unet(copy.deepcopy(fp32), "fp16"),
        "pt2e static int8 compiled": pt2e,
        "ort static int8": ort_int8,
        "fp32 compiled": lambda: CompiledUNet(fp32),
        "bf16 compiled": lambda: CompiledUNet(cast_unet(copy.deepcopy(fp32), "bf16")),
        "torchao int8-dynamic compiled": torchao_int8,
    }


def bench_config(config: str, latent: int, batch: int, warmup: int, repeats: int, only: list[str] | None) -> None:
    cfg, fp32, inputs = random_unet(config, latent, batch)
    x = inputs[0]
    calls = calib_calls(cfg, x, 4)
    print(f"{config} latent {latent}x{latent} batch {batch}; each rung alternated with fp32 eager, {repeats} runs")
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sdbench-speedups-") as tmp:
        for name, build in build_rungs(fp32, calls, Path(tmp)).items():
            if only and name not in only:
                continue
            start = time.perf_counter()
            module = build()
            with torch.inference_mode():
                module(*inputs)  # compiles where compiled
            made = time.perf_counter() - start
            with torch.inference_mode():
                times = time_alternating(
                    {"fp32": lambda: fp32(*inputs), name: lambda m=module: m(*inputs)}, warmup, repeats
                )
            base, (med, p90) = percentiles(times["fp32"])[0], percentiles(times[name])
            ratios[name] = med / base
            ops = getattr(module, "kernel_ops", {})
            int8 = {k: v for k, v in ops.items() if k.startswith("onednn.q")}
            print(
                f"  {name:30s} {med * 1e3:9.1f} ms (p90 {p90 * 1e3:8.1f}) vs fp32 eager "
                f"{base * 1e3:8.1f} ms: ratio {ratios[name]:.3f}  [built+first call {made:.0f} s{', ' if int8 else ''}"
                f"{', '.join(f'{v} {k}' for k, v in int8.items())}]",
                flush=True,
            )
            del module, times
            gc.collect()
    best = min([(1.0, "fp32 eager")] + [(ratios[n], n) for n in DENSE if n in ratios])
    print(f"  best dense: {best[1]} ({best[0]:.3f} x fp32 eager)")
    for name, r in ratios.items():
        print(f"  {name:30s} vs fp32 eager {r:.3f}   vs best dense {r / best[0]:.3f}")
    if "ort static int8" in ratios:
        for name in ("pt2e static int8 compiled", "torchao int8-dynamic compiled"):
            if name in ratios:
                print(f"  {name} / ort static int8: {ratios[name] / ratios['ort static int8']:.3f}")


def quality(n_images: int, steps: int) -> None:
    """PSNR vs fp32 on the embedded trained model: bf16 and PT2E static int8 (real calibration trajectories)."""
    from bench.calibration import Recorder
    from bench.data import load_prompts
    from bench.metrics.base import PER_IMAGE, interval_fields
    from bench.metrics.fidelity import Fidelity
    from bench.techniques.quant import Quantization
    from stable_diffusion.defaults import embedded_checkpoint
    from stable_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion.from_checkpoint(embedded_checkpoint())
    prompts = load_prompts("shapes").prompts[:n_images]
    calib_prompts = load_prompts("shapes", caption_index=1).prompts[:4]
    opts = {"steps": steps, "sampler": "ddim", "guidance": 7.5, "progress": False}

    def images() -> torch.Tensor:
        return torch.cat([sd(p, seed=i, **opts).pixels for i, p in enumerate(prompts)])

    fp32 = images()
    recorder = Recorder(sd.model.unet)
    base = sd.model.swap_unet(recorder)
    for i, p in enumerate(calib_prompts):
        recorder.prompt = i
        sd(p, seed=100_000 + i, **opts)
    sd.model.swap_unet(base)
    calibration = Calibration(recorder.calls, recorder.prompt_of_call)
    pt2e = Setting("quant", {"mode": "pt2e-static-int8", "calib_prompts": 4, "compile": "compile"})
    variants = {
        "bf16": lambda: cast_unet(copy.deepcopy(base), "bf16"),
        "pt2e static int8": lambda: Quantization().apply(copy.deepcopy(base), pt2e, calibration).module,
    }
    fidelity = Fidelity()
    print(f"quality: embedded {sd.cfg.name} model, {n_images} shapes prompts, {steps} DDIM steps, PSNR vs fp32")
    for name, build in variants.items():
        sd.model.swap_unet(build())
        scores = fidelity.compute(images(), prompts, fp32)
        sd.model.swap_unet(base)
        ci = interval_fields(fidelity.intervals, scores[PER_IMAGE], None)  # the sweep's psnr_ci_low/high
        low, high = ci.get("psnr_ci_low"), ci.get("psnr_ci_high")
        interval = f" [{low:.2f}, {high:.2f}] (95 % bootstrap over images)" if low is not None else ""
        print(f"  {name:20s} PSNR {scores['psnr']:6.2f} dB{interval}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__)
    p.set_defaults(configs="v1-5", warmup=1, repeats=5)
    p.add_argument("--rungs", help="comma list of rung names to time (default: all)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--quality-images", type=int, default=8)
    p.add_argument("--quality-steps", type=int, default=20)
    args = p.parse_args(argv)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu}")
    for config in filter(None, args.configs.split(",")):  # --configs "": the quality part only
        bench_config(config, args.latent, args.batch, args.warmup, args.repeats, args.rungs and args.rungs.split(","))
        gc.collect()
    if not args.skip_quality:
        quality(args.quality_images, args.quality_steps)


if __name__ == "__main__":
    main()
