"""Plots and image grids, all built from a finished `results.csv` (W&B: `bench.wandb_report`).

Why a separate step: the sweep runner must never lose a row to a plotting or W&B problem, so it only
writes the CSV; everything here reads it back and can be re-run on any results dir. Figures are made
with matplotlib's object API on the Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

import io
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

from . import schema
from .accel.speedup import LATENCY, best_dense
from .registry import TECHNIQUES
from .results import (
    read_rows,  # noqa: F401  (report.read_rows: the plots' and callers' reader)
    write_atomic,
)
from .schema import parse_float
from .techniques.base import BASELINE

logger = logging.getLogger(__name__)

Row = Mapping[str, str]

_PROTOCOL = [("n_images", "{} images"), ("resolution", "{}"), ("sampler", "{}"), ("steps", "{} steps"),
             ("guidance", "guidance {}"), ("seed", "seed {}")]  # fmt: skip
_MARKERS = ["o", "s", "^", "D", "v", "P"]
_SIMULATED_NOTE = "simulated: latency not a speed claim"


def _savefig(fig: Any, path: Path) -> None:
    """PNG written atomically: a full disk leaves the old plot, never half a file."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    write_atomic(path, buf.getvalue())


def _value(row: Row | None, column: str) -> float | None:
    return None if row is None else parse_float(row.get(column, ""))


def finite(row: Row | None, column: str) -> float | None:
    return v if (v := _value(row, column)) is not None and math.isfinite(v) else None


def _params(row: Row) -> dict[str, Any]:
    try:
        params = json.loads(row.get("params") or "{}")
    except json.JSONDecodeError:
        return {}
    return params if isinstance(params, dict) else {}


def _x(row: Row, axis: str) -> float | None:
    """The row's value of its technique's `plot_x` axis: from its params, else from the column of that name."""
    x = _params(row).get(axis)
    return _value(row, axis) if not isinstance(x, int | float) or isinstance(x, bool) else float(x)


def _plot_x(technique: str) -> tuple[str, str] | None:
    """(axis, x label) a registered technique declares for its plots; None: one point per setting."""
    cls = TECHNIQUES.get(technique) if technique in TECHNIQUES else None
    if cls is None or cls.plot_x is None:
        return None
    declared = {c.name: c.axis_label for c in cls.columns}
    return cls.plot_x, declared.get(cls.plot_x) or cls.axis(cls.plot_x).help


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
    column = schema.column(metric)
    return (column.axis_label, column.scale) if column else (metric, 1.0)


def _lower_is_better(metric: str) -> bool:
    column = schema.column(metric)
    return column is not None and column.better == "lower"


def metric_columns(rows: Sequence[Row]) -> list[str]:
    """Numeric measured columns (declared `plot`, or unknown to the schema) with a finite value in `rows`."""
    known = {c.name: c for c in schema.columns()}
    columns = list(dict.fromkeys([*known, *(k for r in rows for k in r)]))
    plotted = [c for c in columns if c not in known or known[c].plot]
    return [c for c in plotted if any(finite(r, c) is not None for r in rows)]


def _new_figure(size: tuple[float, float] = (7.5, 4.8)) -> Figure:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _ci(metric: str) -> tuple[str, str] | None:
    column = schema.column(metric)
    return column.ci if column else None


def _ci_err(row: Row, y: float, ci: tuple[str, str]) -> tuple[float, float]:
    """Error-bar lengths below/above y from the row's CI columns (0 where missing)."""
    low, high = finite(row, ci[0]), finite(row, ci[1])
    return (max(y - low, 0.0) if low is not None else 0.0, max(high - y, 0.0) if high is not None else 0.0)


def _ci_note(ci: tuple[str, str]) -> str:
    """The y-label note naming the interval: Wilson (proportions) or bootstrap, as the CI column says."""
    column = schema.column(ci[0])
    kind = "Wilson" if column is not None and "Wilson" in column.meaning else "bootstrap"
    return f"\n(bars: 95% {kind} CI)"


def plot_metrics(rows: Sequence[Row], out_dir: Path | str) -> list[Path]:
    """One `<technique>_<metric>.png` per technique and metric with data: metric vs `plot_x`, or per setting.

    Techniques that declare a `plot_x` axis, when all their rows have a numeric value of it, get a line per
    combination of the other varying params; the others (quant: mode/observer...) get one point per
    setting. The baseline is a dashed reference line.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline = next((r for r in rows if r.get("technique") == BASELINE), None)
    techniques = list(dict.fromkeys(r.get("technique", "") for r in rows if r.get("technique") != BASELINE))
    paths = []
    for technique in techniques:
        trows = [r for r in rows if r.get("technique") == technique]
        x = _plot_x(technique)
        if x is not None and any(_x(r, x[0]) is None for r in trows):
            x = None
        for metric in metric_columns(trows):
            label, scale = _metric_label(metric)
            fig = _new_figure()
            ax = fig.add_subplot()
            if x is not None:
                _draw_vs_x(ax, trows, metric, scale, x[0])
                ax.set_xlabel(f"{technique} {x[1]}")
            else:
                _draw_per_setting(ax, trows, metric, scale)
            base = _value(baseline, metric)
            if base is not None and math.isfinite(base):
                ax.axhline(base * scale, ls="--", color="0.35", lw=1, label="FP32 baseline")
                ci = _ci(metric)
                low, high = (finite(baseline, ci[0]), finite(baseline, ci[1])) if ci else (None, None)
                if low is not None and high is not None:
                    ax.axhspan(low * scale, high * scale, color="0.35", alpha=0.12, lw=0, label="FP32 95% CI")
            elif base is not None:  # psnr of the baseline vs itself: nothing to draw, say why
                ax.plot([], [], ls="--", color="0.35", label=f"FP32 baseline: {base:g} (identical images)")
            ci = _ci(metric)
            ax.set_ylabel(label + (_ci_note(ci) if ci else ""))
            ax.grid(alpha=0.3)
            constants = _constants(trows, {x[0]} if x else set())
            ax.set_title(f"{technique}{f' ({constants})' if constants else ''}: {label}\n{_protocol(rows)}", fontsize=9)
            if ax.get_legend_handles_labels()[0]:  # no baseline value (e.g. an empty column): no legend
                ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            path = out_dir / f"{technique}_{metric}.png"
            _savefig(fig, path)
            paths.append(path)
    return paths


def _draw_vs_x(ax: Any, rows: Sequence[Row], metric: str, scale: float, axis: str) -> None:
    keys, backends, ci = _varying(rows, skip={axis}), {r.get("backend", "") for r in rows}, _ci(metric)
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if finite(row, metric) is not None:
            groups.setdefault(_label(row, keys, backends), []).append(row)
    for name, group in groups.items():
        group = sorted(group, key=lambda r: _x(r, axis) or 0.0)
        ys = [finite(r, metric) or 0.0 for r in group]
        errs = [_ci_err(r, y, ci) for r, y in zip(group, ys, strict=True)] if ci else []
        yerr = [[e[0] * scale for e in errs], [e[1] * scale for e in errs]] if ci else None
        ax.errorbar([_x(r, axis) for r in group], [y * scale for y in ys], yerr=yerr, marker="o", ms=4, capsize=3,
                    lw=1.2, label=name or None)  # fmt: skip


def _draw_per_setting(ax: Any, rows: Sequence[Row], metric: str, scale: float) -> None:
    keys, backends, ci = _varying(rows), {r.get("backend", "") for r in rows}, _ci(metric)
    labels, any_simulated = [], False
    for i, row in enumerate(rows):
        labels.append((_label(row, keys, backends) or row.get("setting_id", "?")).replace(", ", "\n"))
        y = finite(row, metric)
        if y is None:
            ax.annotate("not measured", (i, 0), xycoords=("data", "axes fraction"), ha="center", fontsize=7,
                        xytext=(0, 4), textcoords="offset points", color="0.4")  # fmt: skip
            continue
        simulated = row.get("kernels") == "simulated"
        any_simulated |= simulated
        yerr = [[v * scale] for v in _ci_err(row, y, ci)] if ci else None
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
        if any(finite(r, candidate) is not None and finite(r, cost) is not None for r in rows):
            return candidate
    return quality


def pareto_rows(rows: Sequence[Row], quality: str, cost: str) -> list[int]:
    """Indices of `rows` on the quality/cost Pareto front, cheapest first (the quality column's `better`).

    Rows with `kernels == "simulated"` are left out: their latency is not a speed claim, so they may neither
    sit on the front nor push a real row off it.
    """
    sign = -1.0 if _lower_is_better(quality) else 1.0
    idx = [i for i, r in enumerate(rows) if _plottable(r, quality, cost) and r.get("kernels") != "simulated"]
    points = [(sign * (_value(rows[i], quality) or 0.0), finite(rows[i], cost) or 0.0) for i in idx]
    return [idx[j] for j in pareto_front(points)]


def _plottable(row: Row, quality: str, cost: str) -> bool:
    q = _value(row, quality)
    return q is not None and not math.isnan(q) and finite(row, cost) is not None


def plot_pareto(
    rows: Sequence[Row], out_dir: Path | str, quality: str = "psnr", cost: str = "latency_step_p50_ms"
) -> Path:
    """Quality vs cost of every row (all techniques and backends) with the Pareto front labelled.

    Colour = technique, marker = backend, hollow = simulated kernels; the dashed line is the fastest dense
    row (fp32/bf16/fp16, eager or compiled), the reference of `speedup_vs_best_dense`. A quality of inf
    (psnr of the baseline against itself) is drawn just above the highest finite value and said so.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quality = pick_quality(rows, quality, cost)
    (qlabel, qscale), (clabel, cscale) = _metric_label(quality), _metric_label(cost)
    better = "lower" if _lower_is_better(quality) else "higher"
    fig = _new_figure((9.5, 5.5))
    ax = fig.add_subplot()
    ax.set_title(f"{qlabel} vs {clabel}, all settings; Pareto front labelled\n{_protocol(rows)}", fontsize=9)
    ax.set_xlabel(clabel)
    ax.set_ylabel(f"{qlabel} ({better} is better)")
    path = out_dir / f"pareto_{quality}_{cost}.png"
    rows = [r for r in rows if _plottable(r, quality, cost)]
    if not rows:
        ax.text(0.5, 0.5, f"no row has both {quality} and {cost}", ha="center", va="center", transform=ax.transAxes)
        _savefig(fig, path)
        return path
    qs = [(_value(r, quality) or 0.0) * qscale for r in rows]
    finite_qs = [q for q in qs if math.isfinite(q)] or [0.0]
    lo, hi = min(finite_qs), max(finite_qs)
    pad = 0.08 * (hi - lo) if hi > lo else 1.0
    ys = [q if math.isfinite(q) else (hi + pad if q > 0 else lo - pad) for q in qs]
    xs = [(finite(r, cost) or 0.0) * cscale for r in rows]
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
    best = best_dense(rows) if cost == LATENCY else None
    if best is not None:
        ref = (finite(best, cost) or 0.0) * cscale
        handles["dense"] = ax.axvline(ref, ls="--", color="0.35", lw=1, label=f"best dense: {best.get('setting_id')}")
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
    _savefig(fig, path)
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


def write_report(run_dir: Path | str, rows: Sequence[Row]) -> list[Path]:
    """All plots of a run into `run_dir/plots/`: per-technique metric plots, then the Pareto plots (quality vs
    UNet-step latency, and vs image latency: the one where fewer steps and cheaper steps meet)."""
    if not rows:
        return []
    plots_dir = Path(run_dir) / "plots"
    by_image = plot_pareto(rows, plots_dir, cost="latency_image_p50_s")  # fewer steps show only per image
    return [*plot_metrics(rows, plots_dir), plot_pareto(rows, plots_dir), by_image]
