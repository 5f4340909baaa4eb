"""Benchmark: exact unstructured L1 pruning of the full v1-5 UNet (860 M weights in 282 Linear/Conv2d layers).

    python -m bench.benchmarks.prune_speed                     # 30% L1, global and per layer, with our code
    python -m bench.benchmarks.prune_speed --torch-reference   # + torch.nn.utils.prune.l1_unstructured layer by layer
    python -m bench.benchmarks.prune_speed --sizes             # + dense vs sparse safetensors size (writes a temp file)

The UNet has default (random) init: the timings depend on sizes, not on trained values. Weights are restored
from a copy between runs, so every run prunes the same dense weights. Peak RSS is the process high-water
mark (VmHWM), reset before each run where the kernel allows it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from bench.techniques import layers
from bench.techniques.prune import measure, prunable_layers, prune
from stable_diffusion.config import V1_5
from stable_diffusion.unet import UNetModel

GB = 1024**3
PEAKS: list[float] = []  # peak RSS of each phase (the high-water mark is reset between phases)


def memory_gb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in GiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) * 1024 / GB, int(status["VmHWM"].split()[0]) * 1024 / GB


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not permitted: the peak then covers the whole process


def zeros(weights: list[torch.Tensor]) -> int:
    return sum(layers.zeros(w) for w in weights)


def timed(
    label: str, fn: Callable[[], object], layers: list[nn.Module], backup: list[torch.Tensor], expect: int
) -> None:
    """Restore the dense weights, run `fn` once and print its time, the zero count and memory."""
    with torch.no_grad():
        for w, b in zip([m.weight for m in layers], backup, strict=True):
            w.copy_(b)
    reset_peak()
    rss_before = memory_gb()[0]
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = memory_gb()[1]
    PEAKS.append(peak)
    got = zeros([m.weight for m in layers])  # torch's prune.remove swaps in new Parameters
    print(
        f"{label:40s} {seconds:6.2f} s  zeros {got:,} (expected {expect:,})  "
        f"peak RSS {peak:.2f} GiB = {rss_before:.2f} before + {peak - rss_before:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--torch-reference", action="store_true", help="also time torch l1_unstructured per layer")
    parser.add_argument("--sizes", action="store_true", help="also measure dense vs sparse file size (global)")
    args = parser.parse_args()

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = UNetModel(V1_5.unet).eval().requires_grad_(False)
    layers = [m for _, m in prunable_layers(unet)]
    weights = [m.weight for m in layers]
    backup = [w.clone() for w in weights]
    n = sum(w.numel() for w in weights)
    PEAKS.append(memory_gb()[1])
    print(
        f"v1-5 UNet: {sum(p.numel() for p in unet.parameters()):,} params, {len(layers)} Linear/Conv2d layers, "
        f"{n:,} weights; built in {time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes share them)"
    )
    r = args.ratio
    pct = f"{r * 100:g}% L1"
    timed(f"{pct} global (ours)", lambda: prune(unet, r, "l1", "global"), layers, backup, round(r * n))
    per_layer = sum(round(r * w.numel()) for w in weights)
    timed(f"{pct} per layer (ours)", lambda: prune(unet, r, "l1", "layer"), layers, backup, per_layer)
    if args.sizes:
        prune(unet, r, "l1", "global")
        start = time.perf_counter()
        reset_peak()
        f = measure(unet, [name for name, _ in prunable_layers(unet)])
        PEAKS.append(memory_gb()[1])
        print(
            f"{pct} global on disk: dense {f['size_dense_bytes'] / GB:.2f} GiB, sparse (bitmask + values) "
            f"{f['size_bytes'] / GB:.2f} GiB ({f['size_bytes'] / f['size_dense_bytes']:.1%}); "
            f"written and measured in {time.perf_counter() - start:.1f} s, peak RSS {PEAKS[-1]:.2f} GiB"
        )
    if args.torch_reference:

        def reference() -> None:
            for m in layers:
                torch_prune.l1_unstructured(m, "weight", amount=r)
                torch_prune.remove(m, "weight")

        timed(f"{pct} per layer (torch l1_unstructured)", reference, layers, backup, per_layer)
    print(f"peak RSS of the whole run: {max(PEAKS):.2f} GiB (model + a dense copy of its weights for restoring)")


if __name__ == "__main__":
    main()
