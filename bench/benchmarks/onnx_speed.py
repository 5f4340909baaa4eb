"""Benchmark: one UNet step in ONNX Runtime (FP32 and each quantized mode) vs PyTorch FP32, in one process,
with the peak memory of the export and of each quantization.

    python -m bench.benchmarks.onnx_speed                       # tiny and v1-5 at 32x32 latents, batch 2
    python -m bench.benchmarks.onnx_speed --configs v1-5 --latent 64 --modes dynamic-int8

Random-init UNets: speed does not depend on the weights. static-int8 is calibrated on a few random calls
with timesteps spread over the schedule (real trajectories would change its ranges, not its speed).
Each ratio is timed in alternation with its reference after warmup (PyTorch vs ORT FP32, then each mode vs
ORT FP32), so drift hits both sides alike, and at most two sessions live at a time so that v1-5 fits in
memory; quantization runs with no session open. Peak memory is this process's RSS peak while exporting or
quantizing (`bench.cost.PeakRSS`), shown with the RSS just before (which holds the PyTorch UNet during
export). Exports go to a temporary cache, deleted at exit, so their cost is measured on every run.
"""

from __future__ import annotations

import functools
import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import psutil
import torch

from bench.benchmarks.speed import benchmark_parser, random_unet
from bench.calibration import UNetCall
from bench.cost import PeakRSS, percentiles, time_alternating
from bench.techniques.onnx.backend import MODES, OrtUNet, int4_unavailable, quantize, quantized_nodes
from bench.techniques.onnx.export import export_unet, model_size_bytes


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GB"


def memory(peak: int, before: int) -> str:
    return f"peak RSS {gb(peak)} (+{gb(peak - before)} over {gb(before)} before)"


def calib_calls(cfg, x: torch.Tensor, n: int) -> list[UNetCall]:
    """n random calls with timesteps spread over [0, num_train_timesteps)."""
    gen = torch.Generator().manual_seed(1)
    ts = torch.linspace(cfg.num_train_timesteps - 1, 0, n).round()
    ctx_shape = (x.shape[0], cfg.clip.max_length, cfg.unet.context_dim)
    return [UNetCall(torch.randn(x.shape, generator=gen), t, torch.randn(ctx_shape, generator=gen)) for t in ts]


def timed(modules: dict[str, Callable], inputs: tuple, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, p90) seconds per call of each module on `inputs`, timed in alternation."""
    with torch.inference_mode():
        times = time_alternating({name: functools.partial(m, *inputs) for name, m in modules.items()}, warmup, repeats)
    return {name: percentiles(ts) for name, ts in times.items()}


def row(name: str, t: tuple[float, float], ratio: str = "", note: str = "") -> None:
    print(f"  {name:20s} {t[0] * 1e3:9.1f} ms (p90 {t[1] * 1e3:9.1f}) {ratio:30s} {note}", flush=True)


def bench_config(config: str, latent: int, batch: int, warmup: int, repeats: int, modes: list[str], n_calib: int):
    cfg, unet, inputs = random_unet(config, latent, batch)
    x = inputs[0]
    proc = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="sdbench-onnx-speed-") as tmp:
        before = proc.memory_info().rss
        exported = export_unet(unet, cache_dir=Path(tmp), external_data=True)
        print(
            f"{config} latent {latent}x{latent} batch {batch}: export {exported.seconds:.1f} s, "
            f"{memory(exported.peak_rss_bytes, before)}, {exported.size_bytes / 1e6:.1f} MB (opset {exported.opset})"
        )
        times = timed({"pytorch": unet, "ort": OrtUNet(exported.path)}, inputs, warmup, repeats)
        row("pytorch fp32", times["pytorch"])
        row("ort fp32", times["ort"], f"ort-fp32/pytorch {times['ort'][0] / times['pytorch'][0]:.3f}")
        del unet
        gc.collect()  # free the PyTorch UNet and the session before quantizing
        calls = calib_calls(cfg, x, n_calib)
        for mode in modes:
            before = proc.memory_info().rss
            start = time.perf_counter()
            with PeakRSS() as mem:
                path = quantize(exported.path, mode, Path(tempfile.mkdtemp(dir=tmp)), calls)
            seconds = time.perf_counter() - start
            times = timed({"fp32": OrtUNet(exported.path), mode: OrtUNet(path)}, inputs, warmup, repeats)
            gc.collect()  # close both sessions before the next quantization
            ops = ", ".join(f"{n} {op}" for op, n in quantized_nodes(path).items())
            size = model_size_bytes(path) / 1e6
            note = f"[made in {seconds:.0f} s, {memory(mem.peak, before)}, {size:.1f} MB: {ops}]"
            ratio = f"{mode}/ort-fp32 {times[mode][0] / times['fp32'][0]:.3f}"
            row(mode, times[mode], ratio, f"(fp32 in this pair {times['fp32'][0] * 1e3:.1f} ms) {note}")


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__)
    p.set_defaults(warmup=1, repeats=6)
    p.add_argument("--modes", default=",".join(m for m in MODES if m != "fp32"))
    p.add_argument("--calib-calls", type=int, default=4, help="random calibration calls for static-int8")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if "int4" in modes and (reason := int4_unavailable()):
        print(f"int4 left out: {reason}")
        modes.remove("int4")
    cpu = torch.backends.cpu.get_cpu_capability()
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(ORT intra-op threads = torch threads, no spinning), CPU {cpu}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    for config in args.configs.split(","):
        bench_config(config, args.latent, args.batch, args.warmup, args.repeats, modes, args.calib_calls)
        gc.collect()


if __name__ == "__main__":
    main()
