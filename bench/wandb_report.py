"""W&B logging and W&B sweep files, built from a finished `results.csv` (offline by default).

Any W&B problem is a warning, never a lost row: the CSV is the record.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import schema
from .report import Row, finite
from .results import write_atomic
from .schema import parse_float

logger = logging.getLogger(__name__)


def _table_data(rows: Sequence[Row]) -> tuple[list[str], list[list[Any]]]:
    """Schema columns (unique: W&B needs unique names) and cells; numeric columns as floats.

    A column is numeric when every non-empty cell parses as a float; empty and non-finite cells become
    None (the W&B frontend cannot read JSON Infinity, so the baseline's psnr=inf shows as empty there).
    """
    columns = list(dict.fromkeys(schema.column_names()))
    cells = {c: [r.get(c, "") for r in rows if r.get(c, "")] for c in columns}
    numeric = {c for c, v in cells.items() if v and all(parse_float(x) is not None for x in v)}
    return columns, [[finite(r, c) if c in numeric else r.get(c, "") for c in columns] for r in rows]


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
    write_atomic(path, _SWEEP_HEADER.format(technique=technique, name=path.name) + body)
    return path
