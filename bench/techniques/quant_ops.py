"""Quantization building blocks for `bench.techniques.quant`: the integer math, the quantized layers, observers.

Conventions (chosen so that each one can be checked against a closed-form bound in the tests):

* Weights, 8 bit: symmetric, narrow range [-127, 127], one fp scale per output channel (or per tensor).
  The scale is `max|w| / 127` rounded *up* to the storage dtype of the scale, so nothing is clipped and
  `|w - q * scale| <= scale / 2` elementwise.
* Weights, 4 bit group-wise: asymmetric min/max per group of `group_size` input channels, codes 0..15, and
  `w ~ (q - 8) * scale + zero` - the layout of PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`,
  the "tinygemm" convention with `zero = min + 8 * scale`), so one code path serves the real kernel and its
  simulation.
* Activations (simulated W8A8 only): per-tensor *affine* uint8 [0, 255], range widened to contain 0 so that
  zero (ReLU/SiLU floors, conv zero padding) is exact; affine rather than symmetric because post-SiLU/GELU
  inputs are one-sided and a symmetric grid would waste half its codes there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACT_QMAX = 255  # uint8 activations
NUM_TRAIN_TIMESTEPS = 1000  # SD v1 schedule; timestep groups split [0, 1000) into equal ranges


# ----------------------------------------------------------------------------------------------- integer math


def round_up_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` cast to `dtype`, never below `x`: a scale that rounded down would clip the largest weight."""
    y = x.to(dtype)
    low = y.float() < x
    if low.any():
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y


def quantize_symmetric(
    w: torch.Tensor, bits: int, per_channel: bool = True, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed codes in [-(2^(b-1)-1), 2^(b-1)-1] (int8 storage) and a scale per output channel ([N])."""
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().float().flatten(1)
    amax = flat.abs().amax(1) if per_channel else flat.abs().max().expand(flat.shape[0])
    scale = round_up_to_dtype((amax / qmax).clamp(min=1e-12), scale_dtype)
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = torch.round(w.float() / scale.float().view(shape)).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().view((-1,) + (1,) * (q.ndim - 1))


def quantize_int4_groupwise(
    w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes 0..15 ([N, K] int32, the dtype the CPU packer wants), scale and zero ([N, K / group_size])."""
    n, k = w.shape
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = round_up_to_dtype(((hi - lo) / 15).clamp(min=1e-12), scale_dtype)
    zero = (lo + 8 * scale.float()).to(scale_dtype)
    codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]) + 8
    return codes.clamp(0, 15).to(torch.int32).reshape(n, k), scale, zero


def dequantize_int4_groupwise(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = k // scale.shape[1]
    groups = (q.reshape(n, -1, g).float() - 8) * scale.float()[..., None] + zero.float()[..., None]
    return groups.reshape(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: the at-rest format of simulated int4 layers (for honest size accounting)."""
    q = q.to(torch.uint8).reshape(q.shape[0], -1)
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return q[:, 0::2] | (q[:, 1::2] << 4)


@functools.cache
def kernel_usable(bits: int, act_dtype: torch.dtype) -> bool:
    """Whether this torch build runs the CPU weight-only kernel and it agrees with the simulation.

    Probed once on a small matrix; a build without the op (or with a broken one) falls back to simulation.
    """
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 64, generator=gen), torch.randn(3, 64, generator=gen).to(act_dtype)
    try:
        if bits == 8:
            q, s = quantize_symmetric(w, 8, scale_dtype=act_dtype)
            y = torch.ops.aten._weight_int8pack_mm(x, q, s)
            ref = F.linear(x.float(), dequantize_symmetric(q, s))
        else:
            q, s, z = quantize_int4_groupwise(w, 32, act_dtype)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            scales_zeros = torch.stack([s, z], -1).transpose(0, 1).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros)
            ref = F.linear(x.float(), dequantize_int4_groupwise(q, s, z))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    tol = 1e-4 if act_dtype == torch.float32 else 1e-2  # bf16: an output ulp is 2^-8 relative
    return bool((y.float() - ref.to(act_dtype).float()).abs().max() <= tol * ref.abs().max())


def relative_error(w: torch.Tensor, deq: torch.Tensor) -> float:
    """max |w - deq(q(w))| / max |w| of one layer (the report's `weight_error_max_rel` is the max over layers)."""
    return ((w.float() - deq.float()).abs().max() / w.float().abs().max().clamp(min=1e-12)).item()


# --------------------------------------------------------------------------------- weight-only (real kernels)


class WeightOnlyLinear(nn.Module):
    """A Linear with int8 per-channel or int4 group-wise weights, run by PyTorch's CPU weight-only kernels.

    The kernels take activations in `act_dtype` and return that dtype; bias is added afterwards in fp32.
    They are fast with bf16 activations (W8A16/W4A16 proper) and a slow reference path with fp32
    activations on this CPU, hence `act_dtype` is an axis. With `real=False` the same codes and scales
    are dequantized once and run through `F.linear`, reproducing the kernel's input/output rounding.
    """

    def __init__(
        self, linear: nn.Linear, bits: int, per_channel: bool, group_size: int, act_dtype: torch.dtype, real: bool
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size, self.act_dtype, self.real = bits, group_size, act_dtype, real
        w = linear.weight.detach().float()
        if bits == 8:
            q, scale = quantize_symmetric(w, 8, per_channel, act_dtype)
            deq, stored = dequantize_symmetric(q, scale), q
            self.register_buffer("scales", scale)
        else:
            q, scale, zero = quantize_int4_groupwise(w, group_size, act_dtype)
            deq = dequantize_int4_groupwise(q, scale, zero)
            stored = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1) if real else pack_nibbles(q)
            self.register_buffer("scales", torch.stack([scale, zero], -1).transpose(0, 1).contiguous())
        self.register_buffer("qweight", stored)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.register_buffer("weight_deq", None if real else deq, persistent=False)
        self.weight_error = relative_error(w, deq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype).contiguous()
        if not self.real:
            y = F.linear(x2.float(), self.weight_deq).to(self.act_dtype)
        elif self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        return out if self.bias is None else {**out, "bias": self.bias}

    def extra_repr(self) -> str:
        kind = "kernel" if self.real else "simulated"
        return f"{self.in_features}, {self.out_features}, int{self.bits}, act={self.act_dtype}, {kind}"


# ------------------------------------------------------------------------------------- simulated static W8A8


@dataclass
class TimestepState:
    """Shared by a `TimestepAwareUNet` and its fake-quant layers: the timestep group of each batch item."""

    groups: torch.Tensor | None = None  # [B] int64


def timestep_group(t: torch.Tensor | float, n_groups: int, batch: int) -> torch.Tensor:
    """Group index of each batch item: equal ranges of t over [0, 1000), clamped into [0, n_groups)."""
    t = torch.as_tensor(t).reshape(-1).float().expand(batch)
    return (t * n_groups / NUM_TRAIN_TIMESTEPS).floor().long().clamp(0, n_groups - 1)


def affine_qparams(lo: float, hi: float) -> tuple[float, float]:
    """uint8 scale and zero point for the range [lo, hi], widened to contain 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / ACT_QMAX, 1e-12)
    return scale, float(min(max(round(-lo / scale), 0), ACT_QMAX))


def fake_quant_affine(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Quantize to uint8 and back, in fp32 (scale/zero broadcast against x)."""
    return (torch.clamp(torch.round(x / scale) + zero, 0, ACT_QMAX) - zero) * scale


class FakeQuantLayer(nn.Module):
    """Simulated W8A8 Linear or Conv2d: int8 weights (dequantized once) and fake-quantized input activations.

    `act_ranges` is [G, 2] (lo, hi) per timestep group; with G > 1 each batch item uses the range of its
    group, read from the shared `TimestepState` that the wrapping `TimestepAwareUNet` sets per call.
    """

    def __init__(
        self, layer: nn.Linear | nn.Conv2d, per_channel: bool, act_ranges: torch.Tensor, state: TimestepState | None
    ) -> None:
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            self.conv_args = {k: getattr(layer, k) for k in ("stride", "padding", "dilation", "groups")}
        w = layer.weight.detach()
        q, scale = quantize_symmetric(w, 8, per_channel)
        deq = dequantize_symmetric(q, scale)
        self.weight_error = relative_error(w, deq)
        self.register_buffer("qweight", q)
        self.register_buffer("wscale", scale)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.register_buffer("weight_deq", deq.to(w.dtype), persistent=False)  # computed in the model's dtype
        params = [affine_qparams(lo, hi) for lo, hi in act_ranges.tolist()]
        self.register_buffer("act_scale", torch.tensor([s for s, _ in params], device=w.device))
        self.register_buffer("act_zero", torch.tensor([z for _, z in params], device=w.device))
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scale.numel() == 1:
            scale, zero = self.act_scale[0], self.act_zero[0]
        else:
            if self.state is None or self.state.groups is None:
                raise RuntimeError("timestep-aware layer called outside TimestepAwareUNet")
            shape = (-1,) + (1,) * (x.ndim - 1)
            scale, zero = self.act_scale[self.state.groups].view(shape), self.act_zero[self.state.groups].view(shape)
        x = fake_quant_affine(x, scale, zero).to(x.dtype)
        if self.is_conv:
            return F.conv2d(x, self.weight_deq, self.bias, **self.conv_args)
        return F.linear(x, self.weight_deq, self.bias)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "wscale": self.wscale, "act_scale": self.act_scale, "act_zero": self.act_zero}
        return out if self.bias is None else {**out, "bias": self.bias}


class TimestepAwareUNet(nn.Module):
    """Wraps the UNet so each call first tells the fake-quant layers which timestep group they are in."""

    def __init__(self, unet: nn.Module, state: TimestepState, n_groups: int) -> None:
        super().__init__()
        self.unet, self.state, self.n_groups = unet, state, n_groups

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        self.state.groups = timestep_group(t, self.n_groups, x.shape[0]).to(x.device)
        try:
            return self.unet(x, t, context)
        finally:
            self.state.groups = None


class MinMaxObserver:
    """Running min and max of everything seen."""

    def __init__(self) -> None:
        self.lo, self.hi, self.count = float("inf"), float("-inf"), 0

    def update(self, x: torch.Tensor) -> None:
        self.lo, self.hi = min(self.lo, x.min().item()), max(self.hi, x.max().item())
        self.count += 1

    @staticmethod
    def merged(observers: list[MinMaxObserver]) -> tuple[float, float]:
        return min(o.lo for o in observers), max(o.hi for o in observers)

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi


class PercentileObserver:
    """The (100-p)th and pth percentiles of x, over a random subsample pooled across calls.

    Full activations of v1-5 at 64x64 latents are far too big to keep for every layer and call, so each
    call contributes `per_update` random elements; the pooled percentiles can only lie inside the true
    min/max (a subsample never exceeds the whole), so this observer's range is never wider than minmax's.
    """

    def __init__(self, percentile: float, per_update: int, gen: torch.Generator) -> None:
        self.p, self.per_update, self.gen = percentile, per_update, gen
        self.pool: list[torch.Tensor] = []
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() > self.per_update:
            flat = flat[torch.randint(flat.numel(), (self.per_update,), generator=self.gen)]
        self.pool.append(flat.clone())
        self.count += 1

    @staticmethod
    def merged(observers: list[PercentileObserver]) -> tuple[float, float]:
        pooled = PercentileObserver(observers[0].p, 0, observers[0].gen)
        pooled.pool = [t for o in observers for t in o.pool]
        return pooled.range()

    def range(self) -> tuple[float, float]:
        q = torch.tensor([1 - self.p / 100, self.p / 100])
        lo, hi = torch.quantile(torch.cat(self.pool), q).tolist()
        return lo, hi


def export_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a quantized checkpoint of `module` would hold: codes, scales and all remaining fp32 tensors."""
    dyn_linear = torch.ao.nn.quantized.dynamic.Linear
    out: dict[str, torch.Tensor] = {}

    def walk(mod: nn.Module, prefix: str) -> None:
        if hasattr(mod, "export_tensors"):
            out.update({prefix + k: v for k, v in mod.export_tensors().items()})
            return
        if isinstance(mod, dyn_linear):
            w = mod.weight()
            per_channel = w.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine)
            scales = w.q_per_channel_scales() if per_channel else torch.tensor([w.q_scale()])
            out[prefix + "qweight"], out[prefix + "scales"] = w.int_repr(), scales.float()
            if mod.bias() is not None:
                out[prefix + "bias"] = mod.bias()
            return
        for name, p in mod.named_parameters(recurse=False):
            out[prefix + name] = p
        for name, b in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                out[prefix + name] = b
        for name, child in mod.named_children():
            walk(child, f"{prefix}{name}.")

    walk(module, "")
    return {k: v.detach().contiguous() for k, v in out.items()}
