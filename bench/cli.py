"""`python main.py --sweep prune|quant|all ...`: sweep options from the command line and/or a TOML file.

Every technique's sweep axes become flags taking one value or a comma list (`--ratios 0,0.3,0.5`,
`--target all,attn`, `--mode dynamic-int8`); a `--config-file sweep.toml` may hold the same keys
(`[sweep]` for run options, `[prune]`/`[quant]` for axes). Flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from stable_diffusion.errors import InputError

from . import protocols
from .sweep import ALL_TECHNIQUES, SweepOptions
from .techniques import technique_class
from .techniques.base import parse_axis

PATH_FIELDS = {
    "checkpoint",
    "unet",
    "out",
    "reference",
    "reference_captions",
    "fid_weights",
    "clip_weights",
    "lpips_weights",
}
RUN_FLAGS: list[tuple[str, type, str]] = [
    (
        "--protocol",
        str,
        "published evaluation preset: coco2017-5k, coco2014-30k-bk, mlperf-sdxl-5k (bench/protocols.py)",
    ),
    (
        "--prompts",
        str,
        "shapes (default: in-distribution shapes-val captions), shapes-heldout (held-out "
        "compositions), coco (captions of the reference set), parti, coco2017-val-5k, or a .txt/.tsv/.csv/.json file",
    ),
    ("--num-images", int, "images per setting (same prompts and seeds in every setting; default 64)"),
    ("--steps", int, "sampling steps"),
    ("--sampler", str, "ddim (default), pndm, ddpm or euler"),
    ("--guidance", float, "classifier-free guidance scale"),
    ("--seed", int, "seed of image 0 (image i uses seed + i)"),
    ("--out", Path, "results folder (default: results/)"),
    ("--run-id", str, "run folder name (default: a digest of the sweep, so re-runs resume it)"),
    ("--reference", Path, "folder of real images for FID (default: data/coco/images)"),
    ("--reference-captions", Path, "captions.json for the reference folder"),
    ("--fid-weights", Path, "Inception weights for FID (pt_inception-2015-12-05-6726825d.pth)"),
    ("--clip-weights", Path, "open_clip checkpoint for the CLIP score"),
    ("--clip-model", str, "open_clip model name (default ViT-L-14)"),
    ("--fid-size", int, "resize generated and reference images to this square size before FID (BK-SDM: 256)"),
    ("--accuracy-window", str, "FID_LO,FID_HI: rows with FID outside get in_accuracy_window=False (MLPerf-style)"),
    ("--clip-window", str, "CLIP_LO,CLIP_HI: the same gate on the CLIP score"),
    ("--lpips-weights", Path, "AlexNet backbone weights for LPIPS"),
    ("--latency-repeats", int, "timed UNet calls per setting (after one warmup)"),
    ("--wandb-project", str, "W&B project (default sdbench)"),
    ("--wandb-mode", str, "offline (default), online or disabled"),
]


def technique_axes() -> dict[str, tuple[list[Any], Any]]:
    """axis -> (defaults, parser) over all techniques (an axis name shared by two applies to both)."""
    axes: dict[str, tuple[list[Any], Any]] = {}
    for name in ALL_TECHNIQUES:
        axes.update(technique_class(name).axes)
    return axes


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sweep")
    g.add_argument("--sweep", help=f"technique(s) to sweep: {', '.join(ALL_TECHNIQUES)}, all, or a comma list")
    g.add_argument("--config-file", type=Path, help="TOML file with [sweep] options and [prune]/[quant] axes")
    g.add_argument("--resume", action="store_true", help="continue a run (re-running the same command does too)")
    g.add_argument("--setting", dest="only", action="append", help="run only this setting id (repeatable)")
    g.add_argument("--allow-download", action="store_true", help="let metrics download missing weights")
    for flag, typ, help_text in RUN_FLAGS:
        g.add_argument(flag, type=typ, help=help_text)
    a = parser.add_argument_group("sweep axes (one value or a comma list)")
    for axis, (defaults, _) in technique_axes().items():
        flags = [f"--{axis.replace('_', '-')}"] + (["--ratios"] if axis == "ratio" else [])
        a.add_argument(*flags, dest=f"axis_{axis}", help=f"default: {','.join(map(str, defaults))}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"config file {path} is not valid TOML: {e}") from None


def options_from_args(args: argparse.Namespace, resolution: tuple[int, int] | None) -> SweepOptions:
    """CLI flags over `[sweep]`/`[<technique>]` tables of the config file over SweepOptions defaults."""
    file = _read_toml(args.config_file) if args.config_file else {}
    run = dict(file.get("sweep", {}))
    fields = {f.name for f in dataclasses.fields(SweepOptions)} - {"axes"}
    if unknown := set(run) - fields:
        raise InputError(f"unknown [sweep] keys in {args.config_file}: {', '.join(sorted(unknown))}")
    for key in fields:
        value = getattr(args, key, None)
        if value is not None and value is not False:
            run[key] = value
    if resolution:
        run["resolution"] = resolution
    elif isinstance(run.get("resolution"), int):
        run["resolution"] = (run["resolution"], run["resolution"])
    for key in ("accuracy_window", "clip_window"):
        if run.get(key) is not None:
            run[key] = protocols.parse_window(run[key], "--" + key.replace("_", "-"))
    if run.get("protocol"):
        run["protocol_overrides"] = protocols.fill(run["protocol"], run)
    sweep = args.sweep or run.get("techniques")
    if not sweep:
        raise InputError("say what to sweep: --sweep prune, quant or all")
    names = ALL_TECHNIQUES if sweep == "all" else (sweep if isinstance(sweep, list) else sweep.split(","))
    for name in names:
        technique_class(name)  # an unknown technique fails here, with the valid names
    run["techniques"] = list(names)
    for key in PATH_FIELDS & set(run):
        run[key] = Path(run[key])

    axes_spec = technique_axes()
    axes: dict[str, list[Any]] = {}
    for name in names:
        for axis, raw in file.get(name, {}).items():
            if axis not in axes_spec:
                raise InputError(f"unknown axis {axis!r} in [{name}] of {args.config_file}")
            axes[axis] = parse_axis(axis, raw, axes_spec[axis][1])
    for axis, (_, parser) in axes_spec.items():
        raw = getattr(args, f"axis_{axis}")
        if raw is not None:
            axes[axis] = parse_axis(axis, raw, parser)
    return SweepOptions(axes=axes, **run)
