"""The one small interface between the sweep runner and a compression technique.

The runner knows no technique's internals: it asks a technique for its settings (the points of the sweep),
hands it a fresh copy of the FP32 UNet plus calibration data, and gets back a module with the UNet's call
signature `(x, t, context)` and the row fields the technique wants reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from stable_diffusion.errors import InputError

from ..calibration import Calibration
from ..registry import Axis, Column

BASELINE = "baseline"  # the setting (and `technique` cell) of the uncompressed model every row compares with


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
class Compressed:
    """What a technique returns: the module to sample with, its row fields and sampling overrides.

    `sampling` overrides sampling options for this row only (e.g. {"steps": 4}); the row's protocol
    columns then say what was used. A module may define `reset_sampling_state()`: the runner calls it
    before every image (for stateful caches).
    """

    module: nn.Module
    fields: dict[str, Any]  # e.g. sparsity, bits, kernels ("int8"/"fp32"/"simulated"), size_bytes
    sampling: dict[str, Any] = field(default_factory=dict)


class Technique:
    """Base class: a technique declares what it sweeps and reports; the harness derives the rest.

    `axes` become CLI flags and TOML keys, `columns` results.csv columns (README, plot labels); a declared
    column that is also a cost column (e.g. `unet_params`) lets `apply` overwrite the runner's value.
    `plot_x` is the axis drawn on the x of this technique's plots (None: one point per setting).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    order: ClassVar[int] = 100
    axes: ClassVar[tuple[Axis, ...]] = ()
    columns: ClassVar[tuple[Column, ...]] = ()
    plot_x: ClassVar[str | None] = None
    needs_calibration: ClassVar[bool] = False
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    @classmethod
    def axis(cls, name: str) -> Axis:
        for axis in cls.axes:
            if axis.name == name:
                return axis
        raise InputError(f"unknown {cls.name} axis {name!r}; choose from: {', '.join(a.name for a in cls.axes)}")

    def axis_values(self, given: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        """Every axis's values (given, else its defaults), each value checked once; unknown axes raise."""
        for name in given:
            self.axis(name)
        return {a.name: [a.check(v) for v in given.get(a.name, a.default)] for a in self.axes}

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        """The sweep points for these axis values (defaults for axes not given): the full grid."""
        out = [Setting(self.name, p) for p in grid(self.axis_values(axes))]
        return list({s.id: s for s in out}.values())

    def unsupported(self, setting: Setting, device: torch.device | str) -> str | None:
        """Why `setting` cannot run on `device` (the plan skips it), or None."""
        kind = torch.device(device).type
        if kind not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)} only, not {kind}"
        return None

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        """Compress `unet` (a private copy; modify it freely) according to `setting`."""
        raise NotImplementedError


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
