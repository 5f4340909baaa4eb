"""Cost measurements: latency percentiles, peak memory, parameters, size on disk, FLOPs.

Latency is measured after warmup over repeats and reported as p50/p90; it is only a speed claim when the
row's `kernels` are real (a simulated quantization runs fp32 maths plus quantize-dequantize overhead).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping

import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def percentiles(xs: list[float]) -> tuple[float, float]:
    """(p50, p90) with linear interpolation."""
    t = torch.tensor(xs, dtype=torch.float64)
    return torch.quantile(t, 0.5).item(), torch.quantile(t, 0.9).item()


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds per call, after `warmup` untimed calls."""
    return time_alternating({"": fn}, warmup, repeats)[""]


def time_alternating(fns: Mapping[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (a, b, a, b...) so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


class PeakRSS:
    """Peak resident memory (bytes) of this process inside a `with` block, sampled by a thread.

    `ru_maxrss` only ever grows over a process's life, so it cannot give one peak per sweep row.
    On CUDA the allocator's own peak is reported as well (`cuda_peak`); `device_peak` is the peak of the
    memory `device` computes in: the CUDA allocator's there, this process's RSS on the CPU.
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0
        self.cuda_peak = 0
        self.device = torch.device(device) if device is not None else None
        self._stop = threading.Event()
        self._proc = psutil.Process(os.getpid())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(self._cuda)
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        if torch.cuda.is_available():
            self.cuda_peak = torch.cuda.max_memory_allocated(self._cuda)

    @property
    def _cuda(self) -> torch.device | None:
        return self.device if self.device is not None and self.device.type == "cuda" else None

    @property
    def device_peak(self) -> int:
        return self.cuda_peak if self._cuda is not None else self.peak


def count_params(module: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a module (float tensors in its state dict, each counted once).

    A tensor shared under two names (a compiled wrapper also holding the original module) counts once; a
    torchao quantized weight counts its logical elements, and its non-zeros are those of its integer data."""
    total = nonzero = 0
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for v in module.state_dict().values():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            continue
        if hasattr(v, "__tensor_flatten__"):  # tensor subclass: count through its packed data
            names, _ = v.__tensor_flatten__()
            inner = [getattr(v, n) for n in names]
            data = next((t for t in inner if t.numel() == v.numel()), None)
            anchor = data if data is not None else inner[0]  # two names of one weight share its packed data
            key = (anchor.untyped_storage().data_ptr(), tuple(v.shape))
            count = int(torch.count_nonzero(data)) if data is not None else v.numel()
        else:
            key = (v.untyped_storage().data_ptr() + v.storage_offset() * v.element_size(), tuple(v.shape))
            count = int(torch.count_nonzero(v))
        if key in seen:
            continue
        seen.add(key)
        total += v.numel()
        nonzero += count
    return total, nonzero


def dense_size_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Size of `safetensors.torch.save_file(state_dict)` without writing it: 8 + JSON header + data.

    Non-tensor entries (e.g. packed quantized params) are not part of such a file and are skipped.
    """
    state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    header, offset = {}, 0
    for name in sorted(state_dict, key=lambda k: (-state_dict[k].element_size(), k)):
        t = state_dict[name]
        size = t.numel() * t.element_size()
        # only the header's length matters: "F32" stands for "I32" too
        dtype = {torch.bfloat16: "BF16", torch.bool: "BOOL"}.get(t.dtype, f"F{8 * t.element_size()}")
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    length = len(json.dumps(header, separators=(",", ":")))
    return 8 + length + (-length % 8) + offset


def flops_per_call(fn: Callable[[], object]) -> int:
    """FLOPs counted by torch's FlopCounterMode for one call (dense count: zeros are not skipped)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()
