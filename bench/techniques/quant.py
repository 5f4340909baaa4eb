"""Post-training quantization of the UNet: real int8/int4 CPU kernels where PyTorch has them, simulation elsewhere.

Modes (axis `mode`), and what actually runs:

* `dynamic-int8` - `torch.ao.quantization.quantize_dynamic`: Linear weights int8, activations quantized per
  call to uint8 (x86/fbgemm engine, which uses a reduced 7-bit activation range); real int8 GEMMs.
  `torch.ao.quantization` is deprecated in favour of torchao but still ships and runs the same kernels; its
  deprecation warnings are silenced around the one call that emits them.
* `weight-int8` / `weight-int4` - weight-only (W8A16 / W4A16): int8 per-channel or int4 group-wise weights
  run by `aten._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu`. Those kernels take activations
  in bf16 (`act_dtype=bf16`, the default: they are roughly as fast as an fp32 GEMM) or fp32 (exact, but a
  slow path on CPU - tens of times slower than fp32). If a build lacks them, the same math is simulated
  and the row says `kernels="simulated"`.
* `static-w8a8` - W8A8 with calibrated activation ranges (observer `minmax` or `percentile`, 99.99th) on
  Linear and Conv2d inputs. Simulated (fake quantization in fp32), so `kernels="simulated"`: latency of
  these rows is never a speed claim.
* `static-w8a8-timestep` - as above with one activation range per timestep group (equal ranges of t over
  [0, 1000)), as in timestep-aware diffusion PTQ (Q-Diffusion and successors); a wrapper sets the group of
  the current t before each call. Ranges are observed on the FP32 model (no reconstruction / AdaRound).

Axes: `mode`; `bits` (a filter on weight bits - 8 or 4 - since each mode implies its bit width);
`granularity` (`channel`/`tensor`, 8-bit weights); `group_size` (int4); `act_dtype` (weight-only);
`layers` (`all`, `linear`, `conv`, `attn` = attention projections only; real-kernel modes quantize Linear
only, so `all`/`conv` apply to the static modes); `observer`, `calib_prompts`, `timestep_groups` (static).
Axes that do not apply to a mode are left out of its settings, and duplicates dropped.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from stable_diffusion.errors import InputError
from stable_diffusion.pipeline import DTYPES

from ..calibration import Calibration, UNetCall
from ..registry import TECHNIQUES, Axis, Column, positive_int, text
from . import quant_ops as ops
from .base import Compressed, Setting, Technique
from .layers import KINDS, select

MODES = ["dynamic-int8", "weight-int8", "weight-int4", "static-w8a8", "static-w8a8-timestep"]
STATIC_MODES = ("static-w8a8", "static-w8a8-timestep")
WEIGHT_BITS = {"dynamic-int8": 8, "weight-int8": 8, "weight-int4": 4, "static-w8a8": 8, "static-w8a8-timestep": 8}
LINEAR_ONLY = ["linear", "attn"]  # the real-kernel modes quantize nn.Linear only
GROUP_SIZES = [32, 64, 128, 256]  # what the CPU int4 kernel accepts
ACT_DTYPES = {k: DTYPES[k] for k in ("bf16", "fp32")}
OBSERVERS = ["minmax", "percentile"]
PERCENTILE = 99.99
PERCENTILE_BUDGET = 2**16  # samples kept per layer and timestep group for the percentile observer

# Which axes each mode's settings carry (the rest do not apply to it).
MODE_AXES = {
    "dynamic-int8": ("granularity", "layers"),
    "weight-int8": ("granularity", "layers", "act_dtype"),
    "weight-int4": ("group_size", "layers", "act_dtype"),
    "static-w8a8": ("granularity", "layers", "observer", "calib_prompts"),
    "static-w8a8-timestep": ("granularity", "layers", "observer", "calib_prompts", "timestep_groups"),
}
DEFAULTS: dict[str, Any] = {
    "granularity": "channel",
    "group_size": 32,  # divides every Linear in_features of both presets (128 would skip v1-5's 320-wide ones)
    "act_dtype": "bf16",
    "observer": "minmax",
    "calib_prompts": 4,
    "timestep_groups": 4,
}
# Per-mode defaults where one value does not fit all modes.
MODE_DEFAULTS: dict[str, dict[str, list[Any]]] = {
    "dynamic-int8": {"layers": ["linear"]},
    "weight-int8": {"layers": ["linear"]},
    "weight-int4": {"layers": ["linear"]},
    "static-w8a8": {"layers": ["all"], "observer": ["minmax", "percentile"]},
    "static-w8a8-timestep": {"layers": ["all"]},
}


def _timestep_groups(value: Any) -> int:
    n = positive_int(value)
    if n > ops.NUM_TRAIN_TIMESTEPS:
        raise InputError(f"timestep_groups must be at most {ops.NUM_TRAIN_TIMESTEPS}, got {n}")
    return n


@TECHNIQUES.register
class Quantization(Technique):
    """Post-training quantization; see the module docstring for the modes and what is real vs simulated."""

    name = "quant"
    summary = "post-training quantization: dynamic INT8, weight-only INT8/INT4 (real CPU kernels), static W8A8"
    order = 30
    needs_calibration = True
    axes = (
        Axis("mode", MODES, text, "quantization mode", MODES),
        Axis("bits", [8, 4], positive_int, "keep the modes of these weight bit widths", [8, 4]),
        Axis("granularity", ["channel"], text, "8-bit weight scales per output channel or per tensor",
             ["channel", "tensor"]),
        Axis("group_size", [32], positive_int, "int4 weight group size", GROUP_SIZES),
        Axis("act_dtype", ["bf16"], text, "activation dtype of the weight-only modes", list(ACT_DTYPES)),
        # default per mode: all (static), linear (real-kernel modes)
        Axis("layers", ["all"], text, "layers to quantize (attn = attention projections)", KINDS),
        # default for static-w8a8 when not given: minmax and percentile
        Axis("observer", ["minmax"], text, "activation range observer (static modes)", OBSERVERS),
        Axis("calib_prompts", [4], positive_int, "calibration prompts (static modes)"),
        Axis("timestep_groups", [4], _timestep_groups, "activation ranges per timestep group (static-w8a8-timestep)"),
    )  # fmt: skip
    columns = (
        Column("mode", "quantization mode", plot=False),
        Column("bits_weights", "weight bit width (empty = fp32)", plot=False),
        Column("bits_activations", "activation bit width (empty = fp32)", plot=False),
        Column("calib_prompts", "calibration prompts used", plot=False),
        Column("weight_error_max_rel", "max over layers of max|w - deq(q(w))| / max|w|",
               label="max relative weight error", better="lower"),
    )  # fmt: skip

    def unsupported(self, setting: Setting, device: torch.device | str) -> str | None:
        if setting.params.get("mode") not in STATIC_MODES and torch.device(device).type != "cpu":
            return f"quant mode {setting.params.get('mode')} runs PyTorch's CPU kernels (use --device cpu)"
        return super().unsupported(setting, device)

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        """One row per applicable combination; the defaults give one row per mode (two observers for static)."""
        axes = {name: [self.axis(name).check(v) for v in values] for name, values in axes.items()}
        bits = axes.get("bits", [8, 4])
        out: list[Setting] = []
        for mode in axes.get("mode", MODES):
            if WEIGHT_BITS[mode] not in bits:
                continue
            combos: list[dict[str, Any]] = [{"mode": mode}]
            for axis in MODE_AXES[mode]:
                values = axes.get(axis) or MODE_DEFAULTS[mode].get(axis) or [DEFAULTS[axis]]
                if axis == "layers" and mode not in STATIC_MODES:
                    values = [v for v in values if v in LINEAR_ONLY]
                combos = [{**c, axis: v} for c in combos for v in values]
            out.extend(Setting(self.name, c) for c in combos)
        unique = list({s.id: s for s in out}.values())
        if not unique:
            raise InputError("no quant setting matches these axis values (e.g. layers=conv needs a static mode)")
        return unique

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        p = self._params(setting)
        mode = p["mode"]
        device = next(unet.parameters()).device
        if mode not in STATIC_MODES and device.type != "cpu":
            raise InputError(f"quant mode {mode} runs PyTorch's CPU kernels; use --device cpu (or a static mode)")
        calls: list[UNetCall] = []
        extra: dict[str, Any] = {"skipped_layers": 0, "timestep_groups_empty": None}
        if mode == "dynamic-int8":
            module, layer_errors, kernels = self._dynamic(unet, p)
        elif mode in ("weight-int8", "weight-int4"):
            module, layer_errors, kernels, extra["skipped_layers"] = self._weight_only(unet, p)
        else:
            if calibration is None:
                raise InputError(f"quant mode {mode} needs calibration data")
            calls = calibration.take(p["calib_prompts"])
            if not calls:
                raise InputError(f"calibration has no UNet calls for the first {p['calib_prompts']} prompt(s)")
            module, layer_errors, extra["timestep_groups_empty"] = self._static(unet, p, calls)
            kernels = "simulated"
        act_bits = 8 if mode == "dynamic-int8" or mode in STATIC_MODES else None
        if p.get("act_dtype") == "bf16":
            act_bits = 16
        fields = {
            "mode": mode,
            "bits_weights": WEIGHT_BITS[mode],
            "bits_activations": act_bits,
            "kernels": kernels,
            "quantized_layers": len(layer_errors),
            **extra,
            "calib_prompts": p.get("calib_prompts"),
            "calib_calls": len(calls) if mode in STATIC_MODES else None,
            "size_bytes": measured_size_bytes(module),
            "weight_error_max_rel": max(layer_errors, default=0.0),
        }
        return Compressed(module, fields)

    @staticmethod
    def _params(setting: Setting) -> dict[str, Any]:
        """The setting's params, validated, with defaults filled in for the mode's axes."""
        if setting.technique != Quantization.name:
            raise InputError(f"setting {setting.id} is not a quant setting")
        params = dict(setting.params)
        mode = Quantization.axis("mode").check(params.get("mode"))
        for axis, value in params.items():
            Quantization.axis(axis).check(value)
            if axis != "mode" and axis not in MODE_AXES[mode]:
                raise InputError(f"{axis} does not apply to quant mode {mode}")
        for axis in MODE_AXES[mode]:
            params.setdefault(axis, MODE_DEFAULTS[mode].get(axis, [DEFAULTS.get(axis)])[0])
        if mode not in STATIC_MODES and params["layers"] not in LINEAR_ONLY:
            raise InputError(f"quant mode {mode} quantizes Linear layers only; layers must be one of: linear, attn")
        return params

    # ------------------------------------------------------------------------------------------------ modes

    @staticmethod
    def _dynamic(unet: nn.Module, p: dict[str, Any]) -> tuple[nn.Module, list[float], str]:
        """Real int8 GEMMs via the deprecated-but-present eager dynamic quantization (x86 engine)."""
        aq = torch.ao.quantization
        qconfig = aq.per_channel_dynamic_qconfig if p["granularity"] == "channel" else aq.default_dynamic_qconfig
        targets = dict(select_layers(unet, p["layers"]))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_")
            with torch.no_grad():
                aq.quantize_dynamic(unet, dict.fromkeys(targets, qconfig), dtype=torch.qint8, inplace=True)
        errors = []
        for name, old in targets.items():
            new = unet.get_submodule(name)
            if not isinstance(new, torch.ao.nn.quantized.dynamic.Linear):
                raise RuntimeError(f"dynamic quantization left {name} unquantized")
            errors.append(ops.relative_error(old.weight, new.weight().dequantize()))
        return unet, errors, "int8"

    @staticmethod
    def _weight_only(unet: nn.Module, p: dict[str, Any]) -> tuple[nn.Module, list[float], str, int]:
        """Replace each selected Linear by a `WeightOnlyLinear` (real kernel if this torch runs it)."""
        bits = WEIGHT_BITS[p["mode"]]
        act_dtype = ACT_DTYPES[p["act_dtype"]]
        real = ops.kernel_usable(bits, act_dtype)
        per_channel = p.get("granularity") != "tensor"
        errors, skipped = [], 0
        for name, layer in select_layers(unet, p["layers"]):
            n, k = layer.weight.shape
            if bits == 4 and (k % p["group_size"] or (real and n % 16)):
                skipped += 1  # stays FP32: the group must divide in_features, the kernel needs N % 16 == 0
                continue
            with torch.no_grad():
                new = ops.WeightOnlyLinear(layer, bits, per_channel, p.get("group_size", 0), act_dtype, real)
            replace(unet, name, new)
            errors.append(new.weight_error)
        return unet, errors, f"int{bits}-weight-only" if real else "simulated", skipped

    @staticmethod
    def _static(unet: nn.Module, p: dict[str, Any], calls: list[UNetCall]) -> tuple[nn.Module, list[float], int]:
        """Calibrate activation ranges on the FP32 model, then swap in fake-quant layers."""
        n_groups = p.get("timestep_groups", 1)
        targets = select_layers(unet, p["layers"])
        ranges, empty = calibrate(unet, targets, calls, p["observer"], n_groups)
        state = ops.TimestepState() if n_groups > 1 else None
        errors = []
        with torch.no_grad():
            for name, layer in targets:
                new = ops.FakeQuantLayer(layer, p["granularity"] == "channel", ranges[name], state)
                replace(unet, name, new)
                errors.append(new.weight_error)
        module = ops.TimestepAwareUNet(unet, state, n_groups) if state is not None else unet
        return module, errors, empty


# ---------------------------------------------------------------------------------------------------- helpers


def select_layers(unet: nn.Module, layers: str) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to quantize: Linear, Conv2d, both, or the attention projections only."""
    out = select(unet, layers)
    if not out:
        raise InputError(f"no {layers} layers to quantize in this model")
    return out


def replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def calibrate(
    unet: nn.Module, targets: list[tuple[str, nn.Module]], calls: list[UNetCall], observer: str, n_groups: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Run the calibration calls through the FP32 UNet and observe every target layer's input.

    Returns per layer a [n_groups, 2] tensor of (lo, hi) and the number of timestep groups that no call
    fell into; those groups get the range observed over all calls.
    """
    call_groups = [ops.timestep_group(c.t, n_groups, c.x.shape[0]) for c in calls]
    per_group = torch.bincount(torch.cat(call_groups), minlength=n_groups).tolist()
    gen = torch.Generator().manual_seed(0)

    def make(g: int) -> ops.MinMaxObserver | ops.PercentileObserver:
        if observer == "minmax":
            return ops.MinMaxObserver()
        return ops.PercentileObserver(PERCENTILE, max(256, PERCENTILE_BUDGET // max(1, per_group[g])), gen)

    observers = {name: [make(g) for g in range(n_groups)] for name, _ in targets}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def observe(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x, groups = args[0], current["groups"].to(args[0].device)
            present = groups.unique().tolist()
            for g in present:
                observers[name][g].update(x if len(present) == 1 else x[groups == g])

        return observe

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in targets]
    try:
        with torch.inference_mode():
            for call, groups in zip(calls, call_groups, strict=True):
                current["groups"] = groups
                unet(call.x, call.t, call.context)
    finally:
        for h in handles:
            h.remove()

    ranges = {}
    for name, obs in observers.items():
        seen = [o for o in obs if o.count]
        fallback = type(seen[0]).merged(seen) if len(seen) < len(obs) else None
        ranges[name] = torch.tensor([o.range() if o.count else fallback for o in obs])
    return ranges, sum(1 for n in per_group if n == 0)


def measured_size_bytes(module: nn.Module) -> int:
    """Bytes on disk of the quantized weights (codes, scales, remaining fp32 tensors) saved as safetensors."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "quantized.safetensors")
        save_file(ops.export_state(module), path)
        return os.path.getsize(path)
