"""The `results.csv` schema: one row per sweep setting, a fixed column order documented in README.

Empty cells mean "not measured" (e.g. FID without Inception weights), never zero. Technique fields that
have no column of their own land in `extra` (JSON).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from typing import Any

from .metrics.base import interval_columns

_HEADS = ("shape", "colour", "size", "count", "position", "background")


def _ci(column: str, what: str, paired: bool) -> list[tuple[str, str]]:
    """The interval (and paired-test) columns of one per-image metric column, with their meanings."""
    meanings = [f"95% {what} interval, low", f"95% {what} interval, high"]
    meanings += ["paired test vs the FP32 baseline's images (same seeds): two-sided p; < 0.05 lands in `differs`"]
    return list(zip(interval_columns(column, paired), meanings, strict=False))


# (column, meaning) in CSV order.
COLUMNS: list[tuple[str, str]] = [
    ("run_id", "results/<run_id>/ this row belongs to"),
    ("setting_id", "unique id of the setting, e.g. prune[method=l1,ratio=0.3,scope=global,target=all]"),
    ("technique", "baseline, prune, quant, onnx"),
    ("params", "the setting's parameters (JSON)"),
    ("backend", "pytorch or onnxruntime"),
    ("kernels", "what really ran: dense fp32, int8, int8-weight-only, int4..., or simulated (fake quant)"),
    ("status", "ok, or nonfinite (NaN/Inf in some outputs; the sweep goes on)"),
    # protocol: every quality number carries how it was made
    ("model", "preset name and checkpoint file"),
    ("n_images", "images generated for this setting (same prompts and seeds in every row)"),
    ("resolution", "WxH pixels"),
    ("sampler", "sampler name"),
    ("steps", "sampling steps"),
    ("guidance", "classifier-free guidance scale"),
    ("seed", "seed of image 0; image i uses seed + i"),
    ("prompts", "prompt set and its sha256 prefix"),
    ("protocol", "--protocol preset (bench/protocols.py), +overrides(...) when options departed from it"),
    # technique fields
    ("ratio", "pruning ratio asked for"),
    ("sparsity", "measured fraction of zeros among the targeted weights"),
    ("sparsity_unet", "measured fraction of zeros among all UNet Linear/Conv weights"),
    ("mode", "quantization mode"),
    ("bits_weights", "weight bit width (empty = fp32)"),
    ("bits_activations", "activation bit width (empty = fp32)"),
    ("calib_prompts", "calibration prompts used"),
    ("weight_error_max_rel", "max over layers of max|w - deq(q(w))| / max|w|"),
    # fidelity to the uncompressed model (same prompts and seeds): the primary quality signal
    ("psnr", "dB vs the FP32 baseline images (mean over images)"),
    *_ci("psnr", "bootstrap (images)", False),
    ("ssim", "SSIM vs the FP32 baseline images"),
    *_ci("ssim", "bootstrap (images)", False),
    ("lpips", "LPIPS vs the FP32 baseline images (empty without backbone weights)"),
    ("mse", "pixel MSE vs baseline, [0,1] range"),
    # distribution / text alignment
    ("fid", "FID vs the reference set (empty without Inception weights); small N is biased and noisy"),
    ("fid_ci_low", "bootstrap 95% CI, low"),
    ("fid_ci_high", "bootstrap 95% CI, high"),
    ("fid_n", "generated images in the FID"),
    ("fid_features", "feature extractor and weights sha256 prefix"),
    ("clip_score", "100 * cos(image, text), torchmetrics semantics (empty without CLIP weights)"),
    *_ci("clip_score", "bootstrap (images)", True),
    ("clip_score_std", "std over images"),
    ("clip_model", "open_clip model and weights sha256 prefix"),
    # in-domain stand-ins from the built-in shapes dataset (issue #6): need no download
    ("prompt_accuracy", "images whose shapes-classifier attributes all match the prompt (chance 1/1800)"),
    *_ci("prompt_accuracy", "Wilson", True),
    *[
        c
        for h in _HEADS
        for c in [
            (f"prompt_acc_{h}", f"prompt accuracy of the {h} attribute alone"),
            *_ci(f"prompt_acc_{h}", "Wilson", True),
        ]
    ],
    ("prompt_acc_n", "prompts parsed as shapes captions"),
    ("shapes_fid", "FID on shapes-classifier features vs held-out generator images (not comparable with FID)"),
    ("shapes_fid_ci_low", "bootstrap 95% CI, low"),
    ("shapes_fid_ci_high", "bootstrap 95% CI, high"),
    ("shapes_fid_n", "generated images in the shapes-FID"),
    ("shapes_fid_features", "shapes-classifier weights sha256 prefix"),
    ("differs", "metrics whose paired test vs FP32 gives p < 0.05 (comma list; empty: none detected)"),
    ("in_accuracy_window", "True/False: FID and CLIP score inside --accuracy-window / --clip-window (empty: no gate)"),
    # cost
    ("latency_step_p50_ms", "one UNet call (batch 2 = one image with guidance), median after warmup"),
    ("latency_step_p90_ms", "90th percentile of the same"),
    ("latency_image_p50_s", "one whole image (text encoder, all steps, VAE decode), median"),
    ("latency_image_p90_s", "90th percentile of the same"),
    ("peak_rss_mb", "peak resident memory of the process while sampling this setting"),
    ("unet_params", "UNet parameters"),
    ("nonzeros", "non-zero UNet parameters"),
    ("size_bytes", "UNet size on disk in this setting's storage format"),
    ("size_dense_bytes", "UNet size on disk as dense safetensors"),
    ("gflops_per_step", "GFLOPs of one UNet call (torch FlopCounterMode; dense count)"),
    ("nonfinite_images", "images with NaN/Inf"),
    ("extra", "other technique fields (JSON)"),
]
COLUMN_NAMES = [name for name, _ in COLUMNS]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(value) if not math.isinf(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def make_row(values: Mapping[str, Any]) -> dict[str, str]:
    """Known keys go to their column, unknown ones into `extra`; every value becomes a CSV string."""
    row = {name: "" for name in COLUMN_NAMES}
    extra = {}
    for key, value in values.items():
        if key in row and key != "extra":
            row[key] = _cell(value)
        elif value is not None:
            extra[key] = value
    row["extra"] = _cell(extra) if extra else ""
    return row


def row_line(row: Mapping[str, str]) -> str:
    """One complete CSV line (written with a single write call, so a kill cannot split it)."""
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=COLUMN_NAMES, lineterminator="\n").writerow(row)
    return buf.getvalue()


def header_line() -> str:
    return ",".join(COLUMN_NAMES) + "\n"


def parse_float(cell: str) -> float | None:
    """A CSV cell as a float (None when empty or not a number)."""
    try:
        return float(cell) if cell != "" else None
    except ValueError:
        return None
