"""Plots, W&B logging and W&B sweep files, all built from a finished `results.csv`.

Why a separate step: the sweep runner must never lose a row to a plotting or W&B problem, so it only
writes the CSV; everything here reads it back and can be re-run on any results dir. Figures are made
with matplotlib's object API on the Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from bench.schema import COLUMN_NAMES, parse_float

logger = logging.getLogger(__name__)

Row = Mapping[str, str]

# Columns that identify or describe a row (protocol, knobs, CI bounds) rather than measure it.
_NOT_METRICS = {
    "run_id", "setting_id", "technique", "params", "backend", "kernels", "status", "model", "n_images",
    "resolution", "sampler", "steps", "guidance", "seed", "prompts", "ratio", "mode", "bits_weights",
    "bits_activations", "calib_prompts", "fid_ci_low", "fid_ci_high", "fid_n", "fid_features",
    "clip_score_std", "clip_model", "extra", "unet_params", "size_dense_bytes", "prompt_acc_n", "shapes_fid_ci_low",
    "shapes_fid_ci_high", "shapes_fid_n", "shapes_fid_features",
}  # fmt: skip
# metric -> (axis label with unit, scale applied to the value before plotting)
_LABELS: dict[str, tuple[str, float]] = {
    "psnr": ("PSNR vs FP32 images (dB)", 1.0), "ssim": ("SSIM vs FP32 images", 1.0),
    "lpips": ("LPIPS vs FP32 images", 1.0), "mse": ("pixel MSE vs FP32 images ([0,1] range)", 1.0),
    "fid": ("FID vs reference set", 1.0), "clip_score": ("CLIP score (100·cos)", 1.0),
    "latency_step_p50_ms": ("UNet step latency p50 (ms)", 1.0),
    "latency_step_p90_ms": ("UNet step latency p90 (ms)", 1.0),
    "latency_image_p50_s": ("image latency p50 (s)", 1.0), "latency_image_p90_s": ("image latency p90 (s)", 1.0),
    "size_bytes": ("UNet size on disk (MB)", 1e-6), "size_dense_bytes": ("UNet dense size on disk (MB)", 1e-6),
    "sparsity": ("sparsity of targeted weights (fraction)", 1.0),
    "sparsity_unet": ("sparsity of all UNet weights (fraction)", 1.0),
    "peak_rss_mb": ("peak RSS (MB)", 1.0), "nonzeros": ("non-zero UNet parameters (M)", 1e-6),
    "gflops_per_step": ("GFLOPs per UNet call", 1.0), "weight_error_max_rel": ("max relative weight error", 1.0),
    "nonfinite_images": ("images with NaN/Inf", 1.0),
    "prompt_accuracy": ("prompt accuracy, all attributes (shapes classifier)", 1.0),
    "shapes_fid": ("shapes-FID vs held-out generator images", 1.0),
}  # fmt: skip
_LOWER_IS_BETTER = {"fid", "lpips", "mse", "shapes_fid"}
_PROTOCOL = [("n_images", "{} images"), ("resolution", "{}"), ("sampler", "{}"), ("steps", "{} steps"),
             ("guidance", "guidance {}"), ("seed", "seed {}")]  # fmt: skip
_MARKERS = ["o", "s", "^", "D", "v", "P"]
_SIMULATED_NOTE = "simulated: latency not a speed claim"


def read_rows(csv_path: Path | str) -> list[dict[str, str]]:
    """Rows as written by the runner; every schema column present (older files may lack some)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        return [{name: row.get(name) or "" for name in COLUMN_NAMES} for row in csv.DictReader(f)]


def _value(row: Row | None, column: str) -> float | None:
    return None if row is None else parse_float(row.get(column, ""))


def _finite(row: Row | None, column: str) -> float | None:
    return v if (v := _value(row, column)) is not None and math.isfinite(v) else None


def _params(row: Row) -> dict[str, Any]:
    try:
        params = json.loads(row.get("params") or "{}")
    except json.JSONDecodeError:
        return {}
    return params if isinstance(params, dict) else {}


def _ratio(row: Row) -> float | None:
    ratio = _params(row).get("ratio")
    return _value(row, "ratio") if not isinstance(ratio, int | float) or isinstance(ratio, bool) else float(ratio)


def _varying(rows: Sequence[Row], skip: Collection[str] = ()) -> list[str]:
    """Param keys that take more than one value among `rows`: only they are worth a legend entry."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for key, value in _params(row).items():
            values.setdefault(key, set()).add(json.dumps(value, sort_keys=True))
    return sorted(k for k, v in values.items() if k not in skip and len(v) > 1)


def _label(row: Row, keys: Sequence[str], backends: Collection[str] = ()) -> str:
    """`k=v` of the varying params, plus the backend when the rows span several."""
    params = _params(row)
    parts = [f"{k}={params.get(k, '-')}" for k in keys] + ([row.get("backend", "")] if len(backends) > 1 else [])
    return ", ".join(parts)


def _constants(rows: Sequence[Row], skip: Collection[str]) -> str:
    """Params shared by all `rows` (e.g. method=l1): said once in the title instead of in every label."""
    varying = set(_varying(rows)) | skip
    return ", ".join(f"{k}={v}" for k, v in sorted(_params(rows[0]).items()) if k not in varying) if rows else ""


def _protocol(rows: Sequence[Row]) -> str:
    """How the numbers were made, from the rows themselves, so a plot carries its own protocol."""
    parts = []
    for column, fmt in _PROTOCOL:
        values = list(dict.fromkeys(r.get(column, "") for r in rows if r.get(column, "")))
        if values:
            parts.append(fmt.format("/".join(values)))
    return ", ".join(parts) or "protocol not recorded"


def _metric_label(metric: str) -> tuple[str, float]:
    return _LABELS.get(metric, (metric, 1.0))


def metric_columns(rows: Sequence[Row]) -> list[str]:
    """Numeric metric columns with at least one finite value in `rows`, known metrics first."""
    columns = list(dict.fromkeys([*_LABELS, *COLUMN_NAMES, *(k for r in rows for k in r)]))
    return [
        c
        for c in columns
        if c not in _NOT_METRICS and not _is_statistic(c) and any(_finite(r, c) is not None for r in rows)
    ]


def _new_figure(size: tuple[float, float] = (7.5, 4.8)) -> Figure:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _is_statistic(column: str) -> bool:
    """Interval bounds, p-values and the `differs` list describe a metric column; they get no plot of their own."""
    return column.endswith(("_ci_low", "_ci_high", "_p")) or column == "differs"


def _has_ci(rows: Sequence[Row], metric: str) -> bool:
    return any(_finite(r, f"{metric}_ci_low") is not None for r in rows)


def _err(row: Row, metric: str, y: float) -> tuple[float, float]:
    """Error-bar lengths below/above y from the row's `<metric>_ci_low/high` (0 where missing)."""
    low, high = _finite(row, f"{metric}_ci_low"), _finite(row, f"{metric}_ci_high")
    return (max(y - low, 0.0) if low is not None else 0.0, max(high - y, 0.0) if high is not None else 0.0)


def _ci_note(metric: str) -> str:
    kind = "Wilson" if metric.startswith("prompt_acc") else "bootstrap"
    return f"\n(bars: 95% {kind} CI)"


def plot_metrics(rows: Sequence[Row], out_dir: Path | str) -> list[Path]:
    """One `<technique>_<metric>.png` per technique and metric with data: metric vs ratio, or per setting.

    Techniques whose rows all have a numeric ratio get a line per combination of the other varying params;
    the others (quant: mode/observer...) get one point per setting. The baseline is a dashed reference line.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline = next((r for r in rows if r.get("technique") == "baseline"), None)
    techniques = list(dict.fromkeys(r.get("technique", "") for r in rows if r.get("technique") != "baseline"))
    paths = []
    for technique in techniques:
        trows = [r for r in rows if r.get("technique") == technique]
        by_ratio = all(_ratio(r) is not None for r in trows)
        for metric in metric_columns(trows):
            label, scale = _metric_label(metric)
            fig = _new_figure()
            ax = fig.add_subplot()
            if by_ratio:
                _draw_vs_ratio(ax, trows, metric, scale)
                ax.set_xlabel(f"{technique} ratio asked for (fraction of targeted weights)")
            else:
                _draw_per_setting(ax, trows, metric, scale)
            base = _value(baseline, metric)
            if base is not None and math.isfinite(base):
                ax.axhline(base * scale, ls="--", color="0.35", lw=1, label="FP32 baseline")
                low, high = _finite(baseline, f"{metric}_ci_low"), _finite(baseline, f"{metric}_ci_high")
                if low is not None and high is not None:
                    ax.axhspan(low * scale, high * scale, color="0.35", alpha=0.12, lw=0, label="FP32 95% CI")
            elif base is not None:  # psnr of the baseline vs itself: nothing to draw, say why
                ax.plot([], [], ls="--", color="0.35", label=f"FP32 baseline: {base:g} (identical images)")
            ax.set_ylabel(label + (_ci_note(metric) if _has_ci(trows, metric) else ""))
            ax.grid(alpha=0.3)
            constants = _constants(trows, {"ratio"})
            ax.set_title(f"{technique}{f' ({constants})' if constants else ''}: {label}\n{_protocol(rows)}", fontsize=9)
            ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            path = out_dir / f"{technique}_{metric}.png"
            fig.savefig(path, dpi=110)
            paths.append(path)
    return paths


def _draw_vs_ratio(ax: Any, rows: Sequence[Row], metric: str, scale: float) -> None:
    keys, backends = _varying(rows, skip={"ratio"}), {r.get("backend", "") for r in rows}
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if _finite(row, metric) is not None:
            groups.setdefault(_label(row, keys, backends), []).append(row)
    for name, group in groups.items():
        group = sorted(group, key=lambda r: _ratio(r) or 0.0)
        ys = [_finite(r, metric) or 0.0 for r in group]
        errs = [_err(r, metric, y) for r, y in zip(group, ys, strict=True)]
        yerr = [[e[0] * scale for e in errs], [e[1] * scale for e in errs]] if _has_ci(group, metric) else None
        ax.errorbar([_ratio(r) for r in group], [y * scale for y in ys], yerr=yerr, marker="o", ms=4, capsize=3,
                    lw=1.2, label=name or None)  # fmt: skip


def _draw_per_setting(ax: Any, rows: Sequence[Row], metric: str, scale: float) -> None:
    keys, backends = _varying(rows), {r.get("backend", "") for r in rows}
    labels, any_simulated = [], False
    for i, row in enumerate(rows):
        labels.append((_label(row, keys, backends) or row.get("setting_id", "?")).replace(", ", "\n"))
        y = _finite(row, metric)
        if y is None:
            ax.annotate("not measured", (i, 0), xycoords=("data", "axes fraction"), ha="center", fontsize=7,
                        xytext=(0, 4), textcoords="offset points", color="0.4")  # fmt: skip
            continue
        simulated = row.get("kernels") == "simulated"
        any_simulated |= simulated
        yerr = [[v * scale] for v in _err(row, metric, y)] if _has_ci([row], metric) else None
        ax.errorbar([i], [y * scale], yerr=yerr, marker="o", ms=7, capsize=3, color="C0",
                    mfc="none" if simulated else "C0")  # fmt: skip
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("setting")
    if any_simulated:
        note = "; latency not a speed claim" if metric.startswith("latency") else ""
        ax.plot([], [], "o", color="C0", mfc="none", label=f"simulated kernels (fake quant){note}")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (quality, cost) points, higher quality and lower cost being better.

    A point is dominated when another is at least as good on both and strictly better on one; exact ties
    are all kept. Returned in order of increasing cost (the order to draw the front in). NaN never compares
    true, so the caller drops NaN points first.
    """
    front = [
        i for i, (q, c) in enumerate(points) if not any(q2 >= q and c2 <= c and (q2 > q or c2 < c) for q2, c2 in points)
    ]
    return sorted(front, key=lambda i: (points[i][1], -points[i][0]))


def pick_quality(rows: Sequence[Row], quality: str = "psnr", cost: str = "latency_step_p50_ms") -> str:
    """`quality` if some row has a finite value and a cost, else fid, else ssim (offline runs lack fid)."""
    for candidate in dict.fromkeys([quality, "fid", "ssim"]):
        if any(_finite(r, candidate) is not None and _finite(r, cost) is not None for r in rows):
            return candidate
    return quality


def pareto_rows(rows: Sequence[Row], quality: str, cost: str) -> list[int]:
    """Indices of `rows` on the quality/cost Pareto front, cheapest first (fid, lpips, mse: lower is better).

    Rows with `kernels == "simulated"` are left out: their latency is not a speed claim, so they may neither
    sit on the front nor push a real row off it.
    """
    sign = -1.0 if quality in _LOWER_IS_BETTER else 1.0
    idx = [i for i, r in enumerate(rows) if _plottable(r, quality, cost) and r.get("kernels") != "simulated"]
    points = [(sign * (_value(rows[i], quality) or 0.0), _finite(rows[i], cost) or 0.0) for i in idx]
    return [idx[j] for j in pareto_front(points)]


def _plottable(row: Row, quality: str, cost: str) -> bool:
    q = _value(row, quality)
    return q is not None and not math.isnan(q) and _finite(row, cost) is not None


def plot_pareto(
    rows: Sequence[Row], out_dir: Path | str, quality: str = "psnr", cost: str = "latency_step_p50_ms"
) -> Path:
    """Quality vs cost of every row (all techniques and backends) with the Pareto front labelled.

    Colour = technique, marker = backend, hollow = simulated kernels. A quality of inf (psnr of the baseline
    against itself) is drawn just above the highest finite value and said so in the legend.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quality = pick_quality(rows, quality, cost)
    (qlabel, qscale), (clabel, cscale) = _metric_label(quality), _metric_label(cost)
    better = "lower" if quality in _LOWER_IS_BETTER else "higher"
    fig = _new_figure((9.5, 5.5))
    ax = fig.add_subplot()
    ax.set_title(f"{qlabel} vs {clabel}, all settings; Pareto front labelled\n{_protocol(rows)}", fontsize=9)
    ax.set_xlabel(clabel)
    ax.set_ylabel(f"{qlabel} ({better} is better)")
    path = out_dir / f"pareto_{quality}_{cost}.png"
    rows = [r for r in rows if _plottable(r, quality, cost)]
    if not rows:
        ax.text(0.5, 0.5, f"no row has both {quality} and {cost}", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(path, dpi=110)
        return path
    qs = [(_value(r, quality) or 0.0) * qscale for r in rows]
    finite = [q for q in qs if math.isfinite(q)] or [0.0]
    lo, hi = min(finite), max(finite)
    pad = 0.08 * (hi - lo) if hi > lo else 1.0
    ys = [q if math.isfinite(q) else (hi + pad if q > 0 else lo - pad) for q in qs]
    xs = [(_finite(r, cost) or 0.0) * cscale for r in rows]
    techniques = list(dict.fromkeys(r.get("technique", "") for r in rows))
    backends = list(dict.fromkeys(r.get("backend", "") for r in rows))
    handles: dict[str, Line2D] = {}
    for row, x, y in zip(rows, xs, ys, strict=True):
        colour = f"C{techniques.index(row.get('technique', '')) % 10}"
        marker = _MARKERS[backends.index(row.get("backend", "")) % len(_MARKERS)]
        hollow = row.get("kernels") == "simulated"
        ax.scatter([x], [y], marker=marker, s=45, zorder=3, edgecolors=colour, facecolors="none" if hollow else colour)
        name = f"{row.get('technique', '')} / {row.get('backend', '') or '?'}"
        handles.setdefault(name, Line2D([], [], ls="", marker=marker, color=colour, label=name))
    if any(r.get("kernels") == "simulated" for r in rows):
        handles["sim"] = Line2D([], [], ls="", marker="o", color="0.3", mfc="none", label=_SIMULATED_NOTE)
    if any(not math.isfinite(q) for q in qs):
        handles["inf"] = Line2D([], [], ls="", label=f"{quality} = ∞ (identical to baseline): drawn at the top")
    front = pareto_rows(rows, quality, cost)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "-o", color="k", lw=1, alpha=0.5, ms=14, mfc="none",
            zorder=2, label="Pareto front (real kernels)")  # fmt: skip
    handles["front"] = ax.lines[-1]
    varying = {t: _varying([r for r in rows if r.get("technique") == t]) for t in techniques}
    for i in front:
        values = [str(_params(rows[i]).get(k, "-")) for k in varying[rows[i].get("technique", "")]]
        short = " ".join([rows[i].get("technique", ""), *values]) + ("" if math.isfinite(qs[i]) else " (∞)")
        ax.annotate(short, (xs[i], ys[i]), xytext=(7, 6), textcoords="offset points", fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(handles=list(handles.values()), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def make_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Tile same-size images row-major into `cols` columns (fewer when there are fewer images)."""
    if not images or cols < 1:
        raise ValueError("make_grid needs at least one image and cols >= 1")
    size = images[0].size
    if any(im.size != size for im in images):
        raise ValueError(f"make_grid: all images must be {size[0]}x{size[1]}")
    cols = min(cols, len(images))
    nrows = math.ceil(len(images) / cols)
    grid = Image.new(images[0].mode, (cols * size[0], nrows * size[1]), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert(images[0].mode), ((i % cols) * size[0], (i // cols) * size[1]))
    return grid


def _table_data(rows: Sequence[Row]) -> tuple[list[str], list[list[Any]]]:
    """Schema columns (unique: W&B needs unique names) and cells; numeric columns as floats.

    A column is numeric when every non-empty cell parses as a float; empty and non-finite cells become
    None (the W&B frontend cannot read JSON Infinity, so the baseline's psnr=inf shows as empty there).
    """
    columns = list(dict.fromkeys(COLUMN_NAMES))
    cells = {c: [r.get(c, "") for r in rows if r.get(c, "")] for c in columns}
    numeric = {c for c, v in cells.items() if v and all(parse_float(x) is not None for x in v)}
    return columns, [[_finite(r, c) if c in numeric else r.get(c, "") for c in columns] for r in rows]


def log_wandb(
    run_dir: Path | str,
    project: str = "sdbench",
    mode: str = "offline",
    config: Mapping[str, Any] | None = None,
    rows: Sequence[Row] = (),
    image_grids: Mapping[str, Path | str] | None = None,
    plots: Sequence[Path | str] = (),
    run_name: str | None = None,
) -> str | None:
    """Log one W&B run (results table, per-setting grids, plots); return its offline dir or URL.

    Offline by default: the run lands in `run_dir/wandb/offline-run-*` and `wandb sync` uploads it later.
    Any W&B failure (missing package, init error, ...) is a warning and None: the CSV is the record.
    """
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"W&B mode must be offline, online or disabled, not {mode!r}")
    try:
        import wandb
    except Exception as exc:
        logger.warning("W&B not available (%s); results are in results.csv only", exc)
        return None
    run = None
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, mode=mode, dir=str(run_dir), config=dict(config or {}), name=run_name,
                         reinit="finish_previous")  # fmt: skip
        columns, data = _table_data(rows)
        payload: dict[str, Any] = {"results": wandb.Table(columns=columns, data=data)}
        for setting_id, grid in (image_grids or {}).items():
            payload[f"grid/{setting_id}"] = wandb.Image(str(grid), caption=setting_id)
        for plot in map(Path, plots):
            payload[f"plot/{plot.stem}"] = wandb.Image(str(plot), caption=plot.name)
        run.log(payload)
        where = {"offline": str(Path(run.dir).parent), "online": run.url}.get(mode)
        run.finish()
        return where
    except Exception as exc:
        logger.warning("W&B logging failed (%s: %s); results are in results.csv", type(exc).__name__, exc)
        if run is not None:
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)
        return None


_SWEEP_HEADER = """\
# W&B sweep for `main.py --sweep {technique}`: spreads the settings of one grid over machines.
#   wandb sweep {name}        # prints a sweep ID
#   wandb agent <ID>          # on each machine; each agent runs settings one by one
# Each agent gets one `--setting=<id>` (or one value per axis as --<axis>=<value>) and also computes the
# FP32 baseline it compares against. The command keeps this run's --run-id: on a shared filesystem all rows
# land in one results/<run_id>/results.csv (run the baseline first so agents reuse it instead of racing).
"""


def write_wandb_sweep(
    path: Path | str, technique: str, axes: Mapping[str, Sequence[Any]], base_args: Sequence[str] = ()
) -> Path:
    """A grid-sweep YAML whose parameters are the technique's axes, as CLI flags (`_` becomes `-`)."""
    path = Path(path)
    parameters: dict[str, Any] = {}
    for axis, values in axes.items():
        values = [v if isinstance(v, bool | int | float) else str(v) for v in values]
        splits = axis != "setting"  # --setting takes one whole setting id; axis flags split on commas
        if not values or (splits and any(isinstance(v, str) and "," in v for v in values)):
            raise ValueError(f"sweep axis {axis!r} needs values without commas (the CLI splits on them)")
        parameters[axis.replace("_", "-")] = {"values": values}
    spec = {
        "program": "main.py",
        "name": f"sdbench-{technique}",
        "method": "grid",
        "command": ["${env}", "python", "${program}", "--sweep", technique, *map(str, base_args), "${args}"],
        "parameters": parameters,
    }
    try:
        import yaml

        body = yaml.safe_dump(spec, sort_keys=False, default_flow_style=None)
    except ImportError:  # JSON is valid YAML
        body = json.dumps(spec, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_SWEEP_HEADER.format(technique=technique, name=path.name) + body, encoding="utf-8")
    return path


def write_report(run_dir: Path | str, rows: Sequence[Row]) -> list[Path]:
    """All plots of a run into `run_dir/plots/`: per-technique metric plots, then the Pareto plot."""
    if not rows:
        return []
    plots_dir = Path(run_dir) / "plots"
    return [*plot_metrics(rows, plots_dir), plot_pareto(rows, plots_dir)]
