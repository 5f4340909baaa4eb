"""`python main.py --sweep prune|quant|all ...`: sweep options from the command line and/or a TOML file.

Every technique's sweep axes become flags taking one value or a comma list (`--ratios 0,0.3,0.5`,
`--target all,attn`, `--mode dynamic-int8`); a `--config-file sweep.toml` may hold the same keys
(`[sweep]` for run options, `[<technique>]` for axes). Flags given on the command line win. The flags
come from what each registered technique and modifier declares (`bench.registry`).
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from stable_diffusion.errors import InputError

from . import protocols
from .modifiers.base import modifier_axes
from .registry import TECHNIQUES, Axis
from .sweep import RESOLVED, SweepOptions

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
    ("--batch-size", int, "prompts per UNet call (default 1); images keep their seeds, so they do not change"),
    ("--latency-repeats", int, "timed UNet calls per setting (after one warmup)"),
    ("--wandb-project", str, "W&B project (default sdbench)"),
    ("--wandb-mode", str, "offline (default), online or disabled"),
]


def technique_axes() -> dict[str, Axis]:
    """Every registered technique's and modifier's axes (an axis name shared by two techniques: the first)."""
    axes: dict[str, Axis] = {}
    for technique in TECHNIQUES.classes():
        for axis in technique.axes:
            axes.setdefault(axis.name, axis)
    return {**axes, **modifier_axes()}


def axis_flag(name: str, axis: Axis, taken: set[str]) -> str:
    """`--<axis>`, or `--<technique>-<axis>` where that would shadow a run flag (distilled's `steps` axis is
    `--distilled-steps`, since `--steps` is the reference step count)."""
    if axis.flag not in taken:
        return axis.flag
    owner = next(t.name for t in TECHNIQUES.classes() if axis in t.axes)
    return f"--{owner}-{name.replace('_', '-')}"


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sweep")
    names = ", ".join(TECHNIQUES.names())
    g.add_argument("--sweep", help=f"technique(s) to sweep: {names}, all, or a comma list")
    g.add_argument("--config-file", type=Path, help="TOML file with [sweep] options and [<technique>] axes")
    g.add_argument("--resume", action="store_true", help="continue a run (re-running the same command does too)")
    g.add_argument("--setting", dest="only", action="append", help="run only this setting id (repeatable)")
    g.add_argument("--allow-download", action="store_true", help="let metrics download missing weights")
    g.add_argument(
        "--fp32-reference", action="store_true", help="PSNR/SSIM/LPIPS vs FP32 images (default: --dtype's own)"
    )
    for flag, typ, help_text in RUN_FLAGS:
        g.add_argument(flag, type=typ, help=help_text)
    a = parser.add_argument_group("sweep axes (one value or a comma list)")
    taken = {flag for flag, _, _ in RUN_FLAGS}
    for name, axis in technique_axes().items():
        flags = [axis_flag(name, axis, taken)] + (["--ratios"] if name == "ratio" else [])
        choices = f"; one of {'|'.join(map(str, axis.choices))}" if axis.choices else ""
        default = ",".join(map(str, axis.default))
        a.add_argument(*flags, dest=f"axis_{name}", metavar="V", help=f"{axis.help}{choices} (default: {default})")


def parse_resolution(text: str) -> tuple[int, int]:
    """'512' or '768x512' (width x height) -> (height, width), both positive."""
    try:
        w, _, h = text.lower().partition("x")
        height, width = int(h or w), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be N or WxH, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {text!r}")
    return height, width


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"config file {path} is a directory, not a TOML file") from None
    except OSError as e:
        raise InputError(f"cannot read config file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"config file {path} is not valid TOML: {e}") from None


def _resolution_value(value: Any) -> tuple[int, int] | None:
    if isinstance(value, str):
        try:
            return parse_resolution(value)
        except argparse.ArgumentTypeError:
            return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    return None


_TOML_TYPES: dict[str, Any] = {
    "int": lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None,
    "float": lambda v: float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None,
    "str": lambda v: v if isinstance(v, str) else None,
    "bool": lambda v: v if isinstance(v, bool) else None,
    "Path": lambda v: Path(v) if isinstance(v, str) and v else None,
    "list[str]": lambda v: v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None,
    "tuple[int, int]": _resolution_value,
}


def _typed(key: str, value: Any, where: Path) -> Any:
    """A `[sweep]` value as its SweepOptions field's type; a wrong type is a one-line InputError."""
    kind = {f.name: str(f.type) for f in dataclasses.fields(SweepOptions)}[key].replace(" | None", "")
    if key == "techniques":
        kind = "str" if isinstance(value, str) else "list[str]"
    got = _TOML_TYPES[kind](value) if kind in _TOML_TYPES else value
    if got is None:
        raise InputError(
            f"[sweep] {key} in {where} must be {kind.replace('tuple[int, int]', 'N or WxH')}, got {value!r}"
        )
    return got


def _check_tables(file: dict[str, Any], names: list[str], where: Path) -> None:
    """Every table is [sweep] or a swept technique's, and every key one of its axes (typos are not ignored)."""
    for table, body in file.items():
        if table == "sweep":
            continue
        if table not in TECHNIQUES:
            known = ", ".join(f"[{n}]" for n in TECHNIQUES.names())
            raise InputError(f"unknown table [{table}] in {where}; tables: [sweep], {known}")
        if table not in names:
            raise InputError(f"[{table}] in {where} is not swept (--sweep {','.join(names)}); sweep it too or drop it")
        if not isinstance(body, dict):
            raise InputError(f"[{table}] in {where} must be a table of axes")
        axes = [a.name for a in TECHNIQUES.get(table).axes] + list(modifier_axes())
        if unknown := sorted(set(body) - set(axes)):
            raise InputError(f"unknown axis {unknown[0]!r} in [{table}] of {where}; it has: {', '.join(axes)}")


def _check_axis_flags(args: argparse.Namespace, names: list[str]) -> None:
    """An axis flag must belong to a technique being swept (else it would be silently ignored)."""
    swept = {axis.name for name in names for axis in TECHNIQUES.get(name).axes} | set(modifier_axes())
    for axis in technique_axes():
        if getattr(args, f"axis_{axis}") is not None and axis not in swept:
            owners = [n for n in TECHNIQUES.names() if axis in {a.name for a in TECHNIQUES.get(n).axes}]
            raise InputError(
                f"--{axis.replace('_', '-')} is an axis of {', '.join(owners)}, which --sweep {','.join(names)} "
                "does not sweep"
            )


def options_from_args(args: argparse.Namespace, resolution: tuple[int, int] | None) -> SweepOptions:
    """CLI flags over `[sweep]`/`[<technique>]` tables of the config file over SweepOptions defaults."""
    file = _read_toml(args.config_file) if args.config_file else {}
    if not isinstance(file.get("sweep", {}), dict):
        raise InputError(f"[sweep] in {args.config_file} must be a table")
    run = dict(file.get("sweep", {}))
    fields = {f.name for f in dataclasses.fields(SweepOptions)} - {"axes", "protocol_overrides", *RESOLVED}
    if unknown := set(run) - fields:
        raise InputError(f"unknown [sweep] keys in {args.config_file}: {', '.join(sorted(unknown))}")
    run = {key: _typed(key, value, args.config_file) for key, value in run.items()}
    for key in fields:
        value = getattr(args, key, None)
        if value is not None and value is not False:
            run[key] = value
    if resolution:
        run["resolution"] = resolution
    for key in ("accuracy_window", "clip_window"):
        if run.get(key) is not None:
            run[key] = protocols.parse_window(run[key], "--" + key.replace("_", "-"))
    if run.get("protocol"):
        run["protocol_overrides"] = protocols.fill(run["protocol"], run)
    sweep = args.sweep or run.get("techniques")
    if not sweep:
        raise InputError(f"say what to sweep: --sweep {', '.join(TECHNIQUES.names())} or all")
    names = TECHNIQUES.names() if sweep == "all" else (sweep if isinstance(sweep, list) else sweep.split(","))
    for name in names:
        TECHNIQUES.get(name)  # an unknown technique fails here, with the valid names
    run["techniques"] = list(names)
    for key in PATH_FIELDS & set(run):
        run[key] = Path(run[key])
    _check_tables(file, list(names), args.config_file)
    _check_axis_flags(args, list(names))

    axes_spec = technique_axes()
    axes: dict[str, list[Any]] = {}
    given: dict[str, str] = {}  # axis -> the table that set it
    for name in names:
        for axis, raw in file.get(name, {}).items():
            values = axes_spec[axis].values(raw)
            if axis in axes and axes[axis] != values:  # one axis namespace per sweep: the last table would win
                raise InputError(
                    f"[{given[axis]}] and [{name}] in {args.config_file} both set {axis!r}, to different values; "
                    f"an axis is shared by every technique of a sweep: give one value or run them as two sweeps"
                )
            axes[axis], given[axis] = values, name
    for axis, spec in axes_spec.items():
        raw = getattr(args, f"axis_{axis}")
        if raw is not None:
            axes[axis] = spec.values(raw)
    if "mode" not in axes:  # e.g. `--sweep quant` also runs the precision rungs its speedups are measured against
        expanded = [n for name in names for n in (*TECHNIQUES.get(name).sweeps_with, name)]
        run["techniques"] = list(dict.fromkeys(expanded))
    return SweepOptions(axes=axes, **run)


def agent_args(o: SweepOptions, run_id: str) -> list[str]:
    """CLI flags that reproduce a sweep's protocol and run folder (for W&B sweep agents)."""
    args = ["--num-images", str(o.num_images), "--steps", str(o.steps), "--sampler", o.sampler]
    args += ["--guidance", str(o.guidance), "--seed", str(o.seed), "--prompts", o.prompts]
    args += ["--resolution", f"{o.width}x{o.height}", "--run-id", run_id]
    args += ["--dtype", o.dtype, "--batch-size", str(o.batch_size)] + ["--fp32-reference"] * o.fp32_reference
    if o.checkpoint:
        args += ["--checkpoint", str(o.checkpoint)]
    if o.protocol:
        args += ["--protocol", o.protocol]
    return args
