"""The sweep harness end to end on the embedded default: rows, schema, resume after SIGKILL, sharding, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import schema

REPO = Path(__file__).resolve().parent.parent
FAST = ["--num-images", "2", "--steps", "2", "--latency-repeats", "1", "--wandb-mode", "offline"]


def run_main(*args: str, timeout: int = 600, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    # the child uses this process's thread count, so images compared pixel for pixel are computed alike
    env = {
        **os.environ,
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    cmd = (launcher or [sys.executable]) + ["main.py", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def rows_of(out: Path) -> list[dict[str, str]]:
    [csv_path] = out.glob("*/results.csv")
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def prune_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    proc = run_main("--sweep", "prune", "--ratios", "0,0.5", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_prune_sweep_rows_and_schema(prune_run):
    [run_dir] = [p for p in prune_run.iterdir() if p.is_dir()]
    with (run_dir / "results.csv").open(newline="") as f:
        assert next(csv.reader(f)) == schema.COLUMN_NAMES
    rows = rows_of(prune_run)
    assert [r["setting_id"] for r in rows] == [
        "baseline",
        "prune[method=l1,ratio=0.0,scope=global,target=all]",
        "prune[method=l1,ratio=0.5,scope=global,target=all]",
    ]
    base, zero, half = rows
    assert base["psnr"] == "inf" and zero["psnr"] == "inf"  # ratio 0 is the baseline model
    assert math.isfinite(float(half["psnr"])) and float(half["ssim"]) < 1
    assert abs(float(half["sparsity"]) - 0.5) < 1e-6
    assert int(half["nonzeros"]) < int(half["unet_params"])
    assert int(half["size_bytes"]) < int(half["size_dense_bytes"])
    for row in rows:
        for col in ("latency_step_p50_ms", "latency_image_p50_s", "peak_rss_mb", "gflops_per_step", "n_images"):
            assert float(row[col]) > 0, col
        assert row["fid"] == "" and row["clip_score"] == ""  # no weights offline: empty, not zero
        assert row["sampler"] == "ddim" and row["steps"] == "2" and row["resolution"] == "64x64"


def test_prune_sweep_outputs(prune_run):
    [run_dir] = [p for p in prune_run.iterdir() if p.is_dir()]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("git_sha", "versions", "model", "protocol", "prompts", "metrics"):
        assert key in manifest
    assert len(manifest["model"]["sha256"]) == 64 and manifest["protocol"]["seed"] == 0
    assert len(list((run_dir / "images" / "baseline").glob("*.png"))) == 2
    assert len(list((run_dir / "images").glob("*-grid.png"))) == 3
    assert list((run_dir / "plots").glob("prune_psnr*.png")) and list((run_dir / "plots").glob("pareto_*.png"))
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "wandb_sweep_prune.yaml").exists()


def test_rerun_skips_finished_rows(prune_run):
    proc = run_main("--sweep", "prune", "--ratios", "0,0.5", "--out", str(prune_run), *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 already finished, 0 to go" in proc.stderr
    assert len(rows_of(prune_run)) == 3


def test_resume_after_sigkill(tmp_path):
    args = ["--sweep", "prune", "--ratios", "0.1,0.3,0.5,0.7", "--out", str(tmp_path), *FAST]
    env = {**os.environ, "WANDB_SILENT": "true"}
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it mid-sweep, as soon as 2 rows are down
        csvs = list(tmp_path.glob("*/results.csv"))
        if csvs and csvs[0].read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = rows_of(tmp_path)
    assert 2 <= len(killed) < 5
    with next(tmp_path.glob("*/results.csv")).open("a") as f:
        f.write("prune-tiny,half a line cut by the kill")  # a torn last line is repaired on resume
    proc = run_main(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = [r["setting_id"] for r in rows_of(tmp_path)]
    assert len(ids) == len(set(ids)) == 5
    assert ids[: len(killed)] == [r["setting_id"] for r in killed]


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None, reason="no accelerate")
def test_accelerate_two_processes_equal_single(prune_run, tmp_path):
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = run_main("--sweep", "prune", "--ratios", "0,0.5", "--out", str(tmp_path), *FAST, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded, single = rows_of(tmp_path), rows_of(prune_run)
    exact = ["setting_id", "sparsity", "nonzeros", "status", "n_images"]
    assert [{k: r[k] for k in exact} for r in sharded] == [{k: r[k] for k in exact} for r in single]
    # 1 thread per process vs 2 threads changes float summation order: a pixel may move by one 8-bit step.
    for a, b in zip(sharded, single, strict=True):
        for k in ("psnr", "ssim", "mse"):
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-4), k


@pytest.mark.parametrize(
    "args, words",
    [
        (["--sweep", "distill"], "unknown technique"),
        (["--sweep", "prune", "--ratios", "0.5,1.0"], "ratio"),
        (["--sweep", "prune", "--ratios", "-0.1"], "ratio"),
        (["--sweep", "prune", "--target", "decoder"], "target"),
        (["--sweep", "prune", "--prompts", "EMPTY"], "no prompts"),
        (["--sweep", "prune", "--reference", "MISSING"], "does not exist"),
        (["--sweep", "prune", "--out", "FILE/sub"], "cannot write"),
        (["--sweep", "prune", "--num-images", "0"], "num-images"),
        (["--sweep", "prune", "--fid-size", "0"], "fid-size"),
        (["--sweep", "prune", "--config-file", "MISSING"], "does not exist"),
    ],
)
def test_bad_input(tmp_path, caplog, args, words):
    import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    subst = {"EMPTY": str(empty), "MISSING": str(tmp_path / "missing"), "FILE/sub": str(afile / "sub")}
    argv = [subst.get(a, a) for a in args] + ["--out", str(tmp_path / "out")] * ("--out" not in args)
    assert main.main(argv) == 2
    assert words in caplog.text
    assert not list(tmp_path.glob("out/*/results.csv"))  # nothing half-written


def test_quant_sweep_from_config_file(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text(
        '[sweep]\ntechniques = ["quant"]\nnum_images = 2\nsteps = 2\nlatency_repeats = 1\nwandb_mode = "disabled"\n'
        '[quant]\nmode = ["dynamic-int8", "static-w8a8-timestep"]\ncalib_prompts = [2]\n'
    )
    proc = run_main("--config-file", str(config), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["setting_id"].split("mode=")[-1].rstrip("]").split(",")[0]: r for r in rows_of(tmp_path / "out")}
    assert set(rows) == {"baseline", "dynamic-int8", "static-w8a8-timestep"}
    assert rows["dynamic-int8"]["kernels"] == "int8"
    assert (
        rows["static-w8a8-timestep"]["kernels"] == "simulated" and rows["static-w8a8-timestep"]["calib_prompts"] == "2"
    )
    for mode in ("dynamic-int8", "static-w8a8-timestep"):
        assert 0 < float(rows[mode]["psnr"]) < float("inf") and int(rows[mode]["size_bytes"]) > 0


def test_single_setting_for_sweep_agents(tmp_path):
    setting = "prune[method=random,ratio=0.25,scope=layer,target=attn]"
    proc = run_main("--sweep", "prune", "--setting", setting, "--out", str(tmp_path), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["setting_id"] for r in rows_of(tmp_path)] == ["baseline", setting]
