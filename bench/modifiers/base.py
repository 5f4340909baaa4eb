"""The interface of a modifier: an axis every technique gets, applied to what the technique returned.

A modifier at its default value adds nothing to a setting's params (so setting ids, and with them old
run folders, do not change when a modifier is added); `apply` is still called and should then change
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..calibration import Calibration
from ..registry import MODIFIERS, Axis
from ..techniques.base import Compressed, Setting, Technique


@dataclass
class ApplyContext:
    """What a modifier may need besides the compressed module: the FP32 UNet, calibration, the options."""

    device: torch.device
    base_unet: nn.Module
    calibration: Callable[[], Calibration]  # records calibration trajectories on first use
    options: Any  # SweepOptions


class Modifier:
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    order: ClassVar[int] = 100
    axis: ClassVar[Axis]
    default: ClassVar[Any]

    def applies_to(self, technique: Technique) -> bool:
        return True

    def value(self, setting: Setting) -> Any:
        return setting.params.get(self.axis.name, self.default)

    def apply(self, compressed: Compressed, setting: Setting, ctx: ApplyContext) -> Compressed:
        raise NotImplementedError


def modifiers_for(technique: Technique) -> list[Modifier]:
    """The registered modifiers that apply to `technique`, in order."""
    return [m for m in (cls() for cls in MODIFIERS.classes()) if m.applies_to(technique)]


def modifier_axes() -> dict[str, Axis]:
    return {cls.axis.name: cls.axis for cls in MODIFIERS.classes()}


def expand(settings: Iterable[Setting], technique: Technique, given: dict[str, list[Any]]) -> list[Setting]:
    """Cross `settings` with the given values of each applicable modifier (its default adds no param)."""
    out = list(settings)
    for m in modifiers_for(technique):
        values = [m.axis.check(v) for v in given.get(m.axis.name, [m.default])]
        out = [
            Setting(s.technique, {**s.params, **({m.axis.name: v} if v != m.default else {})})
            for s in out
            for v in values
        ]
    return list({s.id: s for s in out}.values())


def technique_setting(setting: Setting) -> Setting:
    """`setting` without modifier params: what the technique itself sees."""
    names = modifier_axes()
    return Setting(setting.technique, {k: v for k, v in setting.params.items() if k not in names})
