"""A run folder written before the registries (main at 276beb8) still resumes with today's code.

tests/data/old-main-prune holds what that code wrote for
`main.py --sweep prune --ratios 0,0.5 --num-images 2 --steps 2 --latency-repeats 1 --wandb-mode disabled
--run-id old-main-prune` (results.csv, manifest.json, images/; plots and W&B left out), re-made with that
commit's code and today's `data/weights/tiny-shapes.safetensors` whenever the embedded default is retrained
(a folder of another model is rightly refused: the model's sha256 is in the protocol digest). Resuming it with
one more ratio must keep its three rows cell for cell (header upgraded), add only the new one, compare that one with
the old run's baseline images read back from disk.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

from bench import report
from bench.sweep import DIGEST_V1, SweepOptions
from tests.test_sweep import run_main

OLD = Path(__file__).resolve().parent / "data" / "old-main-prune"
# `shapes` meant the held-out captions then (today's `shapes` is shapes-val): the digest spells that set `shapes`
ARGS = ["--sweep", "prune", "--num-images", "2", "--steps", "2", "--latency-repeats", "1", "--wandb-mode", "disabled",
        "--prompts", "shapes-heldout"]  # fmt: skip


def test_old_run_folder_resumes(tmp_path):
    run_dir = tmp_path / "old-main-prune"
    shutil.copytree(OLD, run_dir)
    old_rows = report.read_rows(run_dir / "results.csv")
    proc = run_main(*ARGS, "--ratios", "0,0.3,0.5", "--run-id", "old-main-prune", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 settings, 3 already finished, 1 to go" in proc.stderr
    rows = report.read_rows(run_dir / "results.csv")
    assert len(rows) == len(old_rows) + 1  # the old rows kept cell for cell (columns added since: empty)
    for old, now in zip(old_rows, rows, strict=False):
        derived = {"speedup_vs_fp32", "speedup_vs_best_dense"}  # filled over all rows when a sweep ends
        assert {k: v for k, v in now.items() if v != "" and k not in derived} == {
            k: v for k, v in old.items() if v != ""
        }
    new = rows[-1]
    assert new["setting_id"] == "prune[method=l1,ratio=0.3,scope=global,target=all]"
    assert math.isfinite(float(new["psnr"])) and float(new["ssim"]) < 1  # vs the old baseline's PNGs


def test_old_protocol_digest_from_its_options():
    """The old manifest's options give its protocol digest today (with `shapes` spelled `shapes-heldout`): every
    option added since, `[]`-defaulted ones included, stays out of the digest at its default, enters it otherwise."""
    manifest = json.loads((OLD / "manifest.json").read_text())
    old = {k: Path(v) if k == "out" else v for k, v in manifest["options"].items()}
    options = SweepOptions(**{**old, "prompts": "shapes-heldout"})
    model = manifest["model"]["sha256"]
    assert options.digest(model, with_settings=False) == manifest["protocol_digest"]
    changed = {"protocol_overrides": ["steps"], "accuracy_window": (1.0, 2.0), "fid_size": 256, "batch_size": 2}
    for key, value in changed.items():
        assert key not in DIGEST_V1
        assert replace(options, **{key: value}).digest(model, with_settings=False) != manifest["protocol_digest"], key
