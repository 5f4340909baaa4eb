"""The `results.csv` schema: one row per sweep setting, a fixed column order documented in README.

Empty cells mean "not measured" (e.g. FID without Inception weights), never zero. Technique fields that
have no column of their own land in `extra` (JSON). The runner's own columns are declared here; technique
and metric columns are declared by each technique and metric (`bench.registry`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Collection, Mapping
from typing import Any

from .registry import METRICS, TECHNIQUES, Column

# Columns the runner fills, in CSV order: identity and protocol first, cost last. Technique and metric
# columns come from the registries and sit between them (`columns()`).
HEAD: tuple[Column, ...] = (
    Column("run_id", "results/<run_id>/ this row belongs to", plot=False),
    Column("setting_id", "unique id of the setting, e.g. prune[method=l1,ratio=0.3,scope=global,target=all]",
           plot=False),
    Column("technique", "baseline or a technique name (see Techniques)", plot=False),
    Column("params", "the setting's parameters (JSON)", plot=False),
    Column("backend", "pytorch or onnxruntime", plot=False),
    Column("kernels", "what really ran: dense fp32, int8, int8-weight-only, int4..., or simulated (fake quant)",
           plot=False),
    Column("dtype", "pipeline dtype (fp32, fp16, bf16): what the uncompressed parts and the baseline ran in",
           plot=False),
    Column("status", "ok, or nonfinite (NaN/Inf in some outputs; the sweep goes on; quality columns left empty)",
           plot=False),
    # protocol: every quality number carries how it was made
    Column("model", "preset name and checkpoint file", plot=False),
    Column("n_images", "images generated for this setting (same prompts and seeds in every row)", plot=False),
    Column("resolution", "WxH pixels", plot=False),
    Column("sampler", "sampler name", plot=False),
    Column("steps", "sampling steps this row took (steps/distilled rows: their own; the reference's in extra)",
           plot=False),
    Column("guidance", "classifier-free guidance scale this row sampled with (distilled: 1, guidance baked in)",
           plot=False),
    Column("seed", "seed of image 0; image i uses seed + i", plot=False),
    Column("prompts", "prompt set and its sha256 prefix", plot=False),
    Column("device", "device type the pipeline sampled on (cpu, cuda)", plot=False),
    Column("reference_dtype", "dtype of the images psnr/ssim/lpips compare against (--dtype's, or fp32 if asked)",
           plot=False),
    Column("batch_size", "prompts per UNet call while sampling (--batch-size); images do not depend on it",
           plot=False),
    Column("protocol", "--protocol preset (bench/protocols.py), +overrides(...) when options departed from it",
           plot=False),
)  # fmt: skip
# The runner's verdicts over all metric columns (after them): paired tests and the accuracy gate.
VERDICT: tuple[Column, ...] = (
    Column("differs", "metrics whose paired test vs the baseline row gives p < 0.05 (comma list; empty: none detected)",
           plot=False),
    Column("in_accuracy_window",
           "True/False: FID and CLIP score inside --accuracy-window / --clip-window (empty: no gate)", plot=False),
)  # fmt: skip
COST: tuple[Column, ...] = (
    Column("latency_step_p50_ms", "one UNet call (batch 2 = one image with guidance), median after warmup",
           label="UNet step latency p50 (ms)", better="lower"),
    Column("latency_step_p90_ms", "90th percentile of the same", label="UNet step latency p90 (ms)", better="lower"),
    Column("latency_image_p50_s", "one whole image (text encoder, all steps, VAE decode), median; batched: call / N",
           label="image latency p50 (s)", better="lower"),
    Column("latency_image_p90_s", "90th percentile of the same", label="image latency p90 (s)", better="lower"),
    Column("images_per_s", "images sampled per second over the whole setting (all processes, batching included)",
           label="images per second", better="higher"),
    Column("speedup_vs_fp32", "fp32 eager step latency / this row's (empty for simulated rows); filled at sweep end",
           label="speedup vs fp32 eager", better="higher"),
    Column("speedup_vs_best_dense", "best dense (fp32/bf16/fp16 x eager/compiled) step latency of this run / "
           "this row's; filled at sweep end", label="speedup vs best dense", better="higher"),
    Column("peak_rss_mb", "peak resident memory of the process while sampling this setting", label="peak RSS (MB)",
           better="lower"),
    Column("peak_mem_mb", "peak memory of the sampling device: CUDA allocator peak on cuda, process RSS on cpu",
           label="peak device memory (MB)", better="lower"),
    Column("unet_params", "UNet parameters", plot=False),
    Column("nonzeros", "non-zero UNet parameters", label="non-zero UNet parameters (M)", scale=1e-6),
    Column("size_bytes", "UNet size on disk in this setting's storage format", label="UNet size on disk (MB)",
           better="lower", scale=1e-6),
    Column("size_dense_bytes", "UNet size on disk as dense safetensors", label="UNet dense size on disk (MB)",
           plot=False, scale=1e-6),
    Column("gflops_per_step", "GFLOPs of one UNet call (torch FlopCounterMode; dense count)",
           label="GFLOPs per UNet call"),
    Column("nonfinite_images", "images with NaN/Inf", label="images with NaN/Inf", better="lower"),
    Column("extra", "other technique fields (JSON)", plot=False),
)  # fmt: skip
CORE = {c.name: c for c in (*HEAD, *VERDICT, *COST)}
# Core columns a technique may set without declaring them: they say what it ran and how it is stored.
TECHNIQUE_SET = frozenset({"backend", "kernels", "size_bytes"})


def columns() -> list[Column]:
    """Every results.csv column in order: head, technique columns (registry order), metric columns, verdicts, cost.

    A column declared by several techniques appears once (the first declaration); a technique's
    declaration of a core column only lets it overwrite that column (see `runner.assemble_row`).
    """
    out = {c.name: c for c in HEAD}
    for technique in TECHNIQUES.classes():
        for c in technique.columns:
            if c.name not in CORE:
                out.setdefault(c.name, c)
    for metric in METRICS.classes():
        for c in metric.columns:
            out.setdefault(c.name, c)
    out.update((c.name, c) for c in (*VERDICT, *COST))
    return list(out.values())


def column_names() -> list[str]:
    return [c.name for c in columns()]


def column(name: str) -> Column | None:
    return next((c for c in columns() if c.name == name), None)


def __getattr__(name: str) -> Any:
    """`COLUMNS` ((name, meaning) pairs) and `COLUMN_NAMES`, computed from the registries on each access."""
    if name == "COLUMNS":
        return [(c.name, c.meaning) for c in columns()]
    if name == "COLUMN_NAMES":
        return column_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def assemble_row(
    protocol: Mapping[str, Any],
    params: Mapping[str, Any],
    cost: Mapping[str, Any],
    technique: Mapping[str, Any],
    quality: Mapping[str, Any],
    declared: Collection[str] = (),
) -> dict[str, Any]:
    """One row's values with explicit precedence: protocol < params < cost < technique fields < quality.

    A technique field may overwrite a runner column (protocol, cost) only if the technique declares that
    column (or it is one every technique may set: backend, kernels, size_bytes); anything else is a bug
    in the technique, not a silent override.
    """
    guarded = (set(protocol) | set(cost) | set(CORE)) - TECHNIQUE_SET - set(declared)
    if clash := sorted(k for k in technique if k in guarded):
        raise ValueError(f"technique fields {clash} would overwrite runner columns; declare them in its `columns`")
    return {**protocol, **params, **cost, **technique, **quality}


def cell(value: Any) -> str:
    """One value as its CSV string (empty for None and NaN)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(value) if not math.isinf(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return " ".join(str(value).splitlines())  # one row per line: what lets a resume read row by row


def make_row(values: Mapping[str, Any]) -> dict[str, str]:
    """Known keys go to their column, unknown ones into `extra`; every value becomes a CSV string."""
    row = {name: "" for name in column_names()}
    extra = {}
    for key, value in values.items():
        if key in row and key != "extra":
            row[key] = cell(value)
        elif value is not None:
            extra[key] = value
    row["extra"] = cell(extra) if extra else ""
    return row


def row_line(row: Mapping[str, str]) -> str:
    """One complete CSV line (written with a single write call, so a kill cannot split it)."""
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=column_names(), lineterminator="\n").writerow(row)
    return buf.getvalue()


def header_line() -> str:
    return ",".join(column_names()) + "\n"


def parse_float(cell: str) -> float | None:
    """A CSV cell as a float (None when empty or not a number)."""
    try:
        return float(cell) if cell != "" else None
    except ValueError:
        return None
