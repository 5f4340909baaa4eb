"""The technique contract, on the embedded tiny model, in process.

Every registered technique runs one setting through the real runner; its declared columns must be in
the CSV and filled (or explicitly None for this setting), documented in README and plotted. A toy
technique, metric and modifier defined here only show that registering is all it takes: they get CLI
flags, CSV columns, README rows and plots with no other file edited.
"""

from __future__ import annotations

import argparse
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from accelerate import PartialState
from PIL import Image
from torch import nn

from bench import docs, report, schema
from bench.cli import add_sweep_args, options_from_args
from bench.metrics.base import Metric
from bench.modifiers.base import Modifier
from bench.registry import METRICS, MODIFIERS, TECHNIQUES, Axis, Column
from bench.results import ResultsFile
from bench.runner import Runner
from bench.sweep import SweepOptions, SweepPlan, technique_settings
from bench.techniques.base import BASELINE, Compressed, Setting, Technique

FAST = {"num_images": 2, "steps": 2, "latency_repeats": 1, "wandb_mode": "disabled", "device": "cpu"}
README = docs.README.read_text()


def _setting(technique: Technique) -> Setting:
    """The last default setting that runs on CPU (for the built-in ones: pruned 0.9, static W8A8, pruned INT8)."""
    return [s for s in technique_settings(technique, {}) if technique.unsupported(s, "cpu") is None][-1]


class _Capture(Runner):
    """The real runner, keeping what the technique returned for the last setting."""

    def compress(self, setting: Setting) -> Compressed:
        self.last = super().compress(setting)
        return self.last


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> _Capture:
    out = tmp_path_factory.mktemp("contract")
    plan = SweepPlan(SweepOptions(techniques=TECHNIQUES.names(), out=out, **FAST), device="cpu")
    runner = _Capture(plan, PartialState(cpu=True))
    runner.results = ResultsFile(plan.run_dir / "results.csv", plan.run_id)
    runner.run_setting(Setting(BASELINE), runner.results)
    return runner


@pytest.mark.parametrize("name", TECHNIQUES.names())
def test_registered_technique_honours_its_declarations(runner, name, tmp_path):
    cls = TECHNIQUES.get(name)
    technique = runner.plan.techniques[name]
    assert cls.summary and cls.axes and cls.columns and set(cls.devices) <= {"cpu", "cuda"}
    assert cls.plot_x is None or cls.plot_x in {a.name for a in cls.axes}
    setting = _setting(technique)
    runner.run_setting(setting, runner.results)
    rows = report.read_rows(runner.results.path)
    base, row = rows[0], rows[-1]
    assert row["setting_id"] == setting.id and row["status"] == "ok"
    header = runner.results.path.read_text().split("\n", 1)[0].split(",")
    fields = runner.last.fields
    for column in cls.columns:
        assert column.name in header, column.name
        assert row[column.name] != "" or fields.get(column.name, "missing") is None, column.name
        assert column.better in (None, "higher", "lower")
        assert f"| `{column.name}` |" in (docs.section(README, "columns") or ""), column.name
    assert f"| `{name}` |" in (docs.section(README, "techniques") or "")
    plots = {p.name for p in report.plot_metrics([base, row], tmp_path)}
    for column in cls.columns:
        value = schema.parse_float(row[column.name])
        if column.plot and value is not None and math.isfinite(value):
            assert f"{name}_{column.name}.png" in plots, column.name


# ------------------------------------------------------------------------- toys: defined here only


class ToyNoise(Technique):
    """Gaussian noise on every Linear weight, scaled to each weight's RMS: a real (if useless) compression."""

    name = "toy_noise"
    summary = "toy: relative Gaussian noise on every Linear weight"
    order = 900
    axes = (Axis("toy_std", [0.0, 0.1], float, "noise std relative to each weight's RMS"),)
    columns = (Column("toy_rel_change", "measured ||dW|| / ||W|| over Linear weights", label="relative change",
                      better="lower"),)  # fmt: skip
    plot_x = "toy_std"

    def apply(self, unet: nn.Module, setting: Setting, calibration: object = None) -> Compressed:
        gen = torch.Generator().manual_seed(0)
        change = norm = 0.0
        with torch.no_grad():
            for m in unet.modules():
                if isinstance(m, nn.Linear):
                    noise = torch.randn(m.weight.shape, generator=gen) * setting.params["toy_std"]
                    noise = noise.to(m.weight) * m.weight.pow(2).mean().sqrt()
                    m.weight.add_(noise)
                    change, norm = change + noise.pow(2).sum().item(), norm + m.weight.pow(2).sum().item()
        return Compressed(unet, {"toy_rel_change": math.sqrt(change / norm), "kernels": "dense fp32"})


class ToyBrightness(Metric):
    name = "toy_brightness"
    order = 900
    columns = (Column("toy_brightness", "mean pixel value in [0, 1]", label="mean brightness"),)

    def compute(self, images: torch.Tensor, prompts: list[str], baseline: torch.Tensor | None) -> dict[str, float]:
        return {"toy_brightness": float(images.mean())}


class _Resettable(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.resets = inner, 0

    def reset_sampling_state(self) -> None:
        self.resets += 1

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.inner(x, t, context)


class ToySteps(Modifier):
    """Samples its rows with `toy_steps` steps (0: the plan's) through a UNet wrapper with a resettable state."""

    name = "toy_steps"
    summary = "toy: sample with this many steps"
    axis = Axis("toy_steps", [0], int, "sampling steps of this row (0: --steps)")
    default = 0
    wrapped: ClassVar[list[_Resettable]] = []

    def apply(self, compressed: Compressed, setting: Setting, ctx: object) -> Compressed:
        if not self.value(setting):
            return compressed
        module = _Resettable(compressed.module)
        self.wrapped.append(module)
        return Compressed(module, compressed.fields, {**compressed.sampling, "steps": self.value(setting)})


@pytest.fixture
def toys():
    with TECHNIQUES.temporarily(ToyNoise), METRICS.temporarily(ToyBrightness), MODIFIERS.temporarily(ToySteps):
        yield


def test_toys_get_flags_columns_readme_rows_and_plots(toys, tmp_path):
    parser = argparse.ArgumentParser()
    add_sweep_args(parser)
    args = parser.parse_args(["--sweep", "toy_noise", "--toy-std", "0.1", "--toy-steps", "0,1"])
    options = options_from_args(args, None)
    assert options.axes == {"toy_std": [0.1], "toy_steps": [0, 1]}
    for key, value in {**FAST, "out": tmp_path}.items():
        setattr(options, key, value)

    readme = docs.render(README)
    assert "| `toy_noise` | toy: relative Gaussian noise" in readme and "`--toy-std` = 0.0,0.1" in readme
    assert "| `toy_steps` |" in readme and "| `toy_brightness` | `toy_brightness` |" in readme
    columns = docs.section(readme, "columns") or ""
    assert "| `toy_rel_change` |" in columns and "| `toy_brightness` |" in columns

    plan = SweepPlan(options, device="cpu")
    assert [s.id for s in plan.settings] == ["baseline", "toy_noise[toy_std=0.1]", "toy_noise[toy_std=0.1,toy_steps=1]"]
    run_dir = Runner(plan, PartialState(cpu=True)).run()
    header = (run_dir / "results.csv").read_text().split("\n", 1)[0].split(",")
    assert header == schema.column_names() and {"toy_rel_change", "toy_brightness"} <= set(header)
    rows = report.read_rows(run_dir / "results.csv")
    assert [r["steps"] for r in rows] == ["2", "2", "1"]
    assert float(rows[1]["toy_rel_change"]) == pytest.approx(0.1, rel=0.05)
    assert [m.resets for m in ToySteps.wrapped] == [2]  # reset before each of the 2 images
    for row in rows:  # the metric against an outside computation: the saved PNGs
        folder = run_dir / "images" / next(s.slug for s in plan.settings if s.id == row["setting_id"])
        pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])
        assert float(row["toy_brightness"]) == pytest.approx(pixels.mean() / 255, abs=1e-6)
    plots = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert {"toy_noise_toy_rel_change.png", "toy_noise_toy_brightness.png"} <= plots
