"""`speedup_vs_fp32` and `speedup_vs_best_dense`: every row's UNet step latency against this run's dense rows.

Dense rows are the fp32 baseline (eager) and the `precision` rows (fp32/bf16/fp16 x eager/compiled): the
strongest of them is what a compression technique must beat (peers such as SVDQuant and MLPerf compare
to 16-bit, not to fp32). A speedup is reference latency / row latency (2.0 = twice as fast). Simulated
rows get none: their latency is not a speed claim. Computed when a sweep finishes, over all its rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench import schema
from bench.results import ResultsFile, write_atomic

DENSE_TECHNIQUES = ("baseline", "precision")
LATENCY = "latency_step_p50_ms"


def _latency(row: dict[str, str]) -> float | None:
    value = schema.parse_float(row.get(LATENCY, ""))
    return value if value is not None and value > 0 else None


def best_dense(rows: Sequence[dict[str, str]]) -> dict[str, str] | None:
    """The dense row with the lowest step latency (None when no dense row has one)."""
    dense = [r for r in rows if r.get("technique") in DENSE_TECHNIQUES and _latency(r) is not None]
    return min(dense, key=lambda r: _latency(r) or 0.0, default=None)


def with_speedups(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Copies of `rows` with both speedup columns filled (empty where not measurable)."""
    fp32 = next((_latency(r) for r in rows if r.get("technique") == "baseline"), None)
    best = best_dense(rows)
    ref = _latency(best) if best else None
    out = []
    for row in rows:
        row = dict(row)
        lat = _latency(row)
        real = lat is not None and row.get("kernels") != "simulated"
        row["speedup_vs_fp32"] = schema.cell(fp32 / lat) if real and fp32 else ""
        row["speedup_vs_best_dense"] = schema.cell(ref / lat) if real and ref else ""
        out.append(row)
    return out


def rewrite_with_speedups(results: ResultsFile) -> list[dict[str, str]]:
    """Fill the speedup columns of `results.csv` in place (atomic rewrite; the caller holds the run lock)."""
    rows = with_speedups(results.rows())
    write_atomic(results.path, schema.header_line() + "".join(schema.row_line(r) for r in rows))
    return rows
