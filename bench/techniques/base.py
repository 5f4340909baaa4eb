"""The one small interface between the sweep runner and a compression technique.

The runner knows no technique's internals: it asks a technique for its settings (the points of the sweep),
hands it a fresh copy of the FP32 UNet plus calibration data, and gets back a module with the UNet's call
signature `(x, t, context)` and the row fields the technique wants reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from stable_diffusion.errors import InputError


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: a technique name and JSON-able parameters. `id` names its row and folders."""

    technique: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        if not self.params:
            return self.technique
        parts = [f"{k}={v}" for k, v in sorted(self.params.items())]
        return f"{self.technique}[{','.join(parts)}]"

    @property
    def slug(self) -> str:
        """A filesystem-safe version of `id`."""
        keep = "".join(c if c.isalnum() or c in ".-_=" else "_" for c in self.id.replace(",", "_"))
        return keep.strip("_")

    def to_json(self) -> str:
        return json.dumps({"technique": self.technique, "params": dict(self.params)}, sort_keys=True)


@dataclass
class UNetCall:
    """One recorded UNet call from a real sampling trajectory (for calibration)."""

    x: torch.Tensor  # [B, 4, h, w] latent input (already scaled by the sampler)
    t: torch.Tensor  # scalar timestep
    context: torch.Tensor  # [B, 77, d] text conditioning


@dataclass
class Calibration:
    """Real UNet inputs recorded while sampling calibration prompts with the FP32 model.

    `calls` are grouped by prompt set size on demand: `take(n_prompts)` keeps the calls of the first
    n prompts only, so "number of calibration prompts" can be a sweep axis without resampling.
    """

    calls: list[UNetCall]
    prompts_per_call: list[int]  # index of the calibration prompt each call belongs to

    def take(self, n_prompts: int) -> list[UNetCall]:
        return [c for c, p in zip(self.calls, self.prompts_per_call, strict=True) if p < n_prompts]


@dataclass
class Compressed:
    """What a technique returns: the module to sample with and its row fields."""

    module: nn.Module
    fields: dict[str, Any]  # e.g. sparsity, bits, kernels ("int8"/"fp32"/"simulated"), size_bytes


class Technique:
    """Base class. Subclasses set `name`, describe their sweep axes and implement `settings`/`apply`."""

    name: ClassVar[str]
    # sweep axis -> (default values, parser for one CLI value)
    axes: ClassVar[dict[str, tuple[list[Any], Callable[[str], Any]]]] = {}
    needs_calibration: ClassVar[bool] = False
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")  # device types its settings can run on
    dtypes: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")  # pipeline --dtype values it accepts

    def unsupported(self, setting: Setting, device: torch.device | str) -> str | None:
        """Why `setting` cannot run on `device` (checked when the sweep is planned, so a sweep never dies on
        a device mismatch mid-way), or None. Subclasses refine this per mode."""
        kind = torch.device(device).type
        if kind not in self.devices:
            return f"{self.name} runs on {' or '.join(self.devices)} only, not {kind}"
        return None

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        """The sweep points for these axis values (defaults for axes not given)."""
        raise NotImplementedError

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        """Compress `unet` (a private copy; modify it freely) according to `setting`."""
        raise NotImplementedError


def parse_axis(axis: str, raw: Any, parser: Callable[[str], Any]) -> list[Any]:
    """One value or a comma list (or a TOML list) for a sweep axis, each parsed; InputError on a bad one."""
    values = raw if isinstance(raw, list) else str(raw).split(",")
    out = []
    for v in values:
        try:
            out.append(parser(v) if isinstance(v, str) else v)
        except (TypeError, ValueError):
            raise InputError(f"bad value {v!r} for --{axis.replace('_', '-')}") from None
    return out


def parse_setting_id(text: str) -> tuple[str, dict[str, str]]:
    """`prune[method=l1,ratio=0.3]` -> ("prune", {"method": "l1", "ratio": "0.3"}) (values still strings)."""
    name, _, rest = text.partition("[")
    if not rest:
        return name, {}
    if not rest.endswith("]"):
        raise InputError(f"bad setting id {text!r}: expected technique[key=value,...]")
    pairs = [p.partition("=") for p in rest[:-1].split(",") if p]
    if any(not sep for _, sep, _ in pairs):
        raise InputError(f"bad setting id {text!r}: expected technique[key=value,...]")
    return name, {k: v for k, _, v in pairs}


def grid(axes: Mapping[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """Cartesian product of axis values, in a stable order."""
    keys = list(axes)
    if not keys:
        yield {}
        return
    head, rest = keys[0], {k: axes[k] for k in keys[1:]}
    for value in axes[head]:
        for tail in grid(rest):
            yield {head: value, **tail}


def check_choice(axis: str, value: Any, choices: list[Any]) -> Any:
    if value not in choices:
        raise InputError(f"unknown {axis} {value!r}; choose from: {', '.join(map(str, choices))}")
    return value
